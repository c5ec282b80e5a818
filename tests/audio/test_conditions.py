"""kd_tune.audio.conditions: every condition does what its name says, the same way every time, without torch."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from kd_tune.audio.conditions import (CLEAN, DISTANCES_M, NOISE_TYPES, ROOM_RT60_S, ROOMS, SAMPLE_RATE, Condition,
                                      ConditionError, Conditioner, active_rms, default_grid, noise_condition,
                                      parse_grid, read_noise_folders, room_response)


def tone(hz: float, peak: float = 0.3, seconds: float = 1.0) -> np.ndarray:
    return (peak * np.sin(2 * np.pi * hz * np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def conditioner():
    rng = np.random.default_rng(0)
    speech = [(rng.standard_normal(SAMPLE_RATE) * 0.1).astype(np.float32) for _ in range(8)]
    return Conditioner(speech=speech)


def power_db(audio: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(audio, dtype=np.float64)))


@pytest.mark.parametrize("noise", NOISE_TYPES)
@pytest.mark.parametrize("snr_db", [20.0, 0.0])
def test_noise_is_mixed_at_the_named_snr_against_its_long_term_power(conditioner, noise, snr_db):
    # Rule: an SNR condition is the clip's power over the noise's long-term power: over many clips the noise added
    # averages out at the named SNR for every noise type, and stationary noise holds it clip by clip.
    clean = tone(440.0)
    added = [conditioner.clip(clean, noise_condition(noise, snr_db), key=k) - clean for k in range(200)]
    assert all(a.dtype == np.float32 and a.shape == clean.shape for a in added)
    # transients are sparse: 200 one-second excerpts of 30 s of knocks average within 2 dB of their power
    assert power_db(clean) - power_db(np.concatenate(added)) == pytest.approx(snr_db,
                                                                             abs=2.0 if noise == "transients" else 1.0)
    if noise in ("white", "pink", "hum"):
        assert power_db(clean) - power_db(added[0]) == pytest.approx(snr_db, abs=1.0)


def test_a_condition_is_the_same_every_time_and_keys_pick_other_excerpts(conditioner):
    # Rule: the grid is seeded: the same condition and key give the same samples, in a fresh conditioner too.
    condition = noise_condition("babble", 5.0)
    first = conditioner.clip(tone(300.0), condition, key=1)
    again = Conditioner(speech=conditioner.speech).clip(tone(300.0), condition, key=1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, conditioner.clip(tone(300.0), condition, key=2))


@pytest.mark.parametrize("peak_dbfs", [-45.0, -3.0])
def test_a_level_condition_sets_the_peak(conditioner, peak_dbfs):
    # Rule: levels are peak levels in dBFS.
    out = conditioner.clip(tone(500.0, peak=0.5), Condition("level", "level", peak_dbfs=peak_dbfs), key=0)
    assert 20 * np.log10(np.abs(out).max()) == pytest.approx(peak_dbfs, abs=0.01)


def test_the_telephone_band_removes_the_bass_and_keeps_the_voice_band(conditioner):
    # Rule: the telephone microphone passes 300-3400 Hz.
    telephone = Condition("mic_telephone", "mic", microphone="telephone")
    bass, voice = (conditioner.clip(tone(hz), telephone, key=0) for hz in (100.0, 1000.0))
    assert power_db(tone(100.0)) - power_db(bass[4000:]) > 20
    assert power_db(tone(1000.0)) - power_db(voice[4000:]) == pytest.approx(0.0, abs=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("rt60_s", ROOM_RT60_S)
@pytest.mark.parametrize("distance", list(DISTANCES_M))
@pytest.mark.parametrize("room", list(ROOMS))
def test_image_source_rooms_reverberate_for_their_nominal_rt60(rt60_s, distance, room):
    # Rule: a room condition's RT60, measured on its impulse response (Schroeder's integral, extrapolated to -60 dB,
    # as pyroomacoustics measures it), is the nominal one within 6%, in the grid's room and in validation's.
    import pyroomacoustics as pra

    measured = pra.experimental.measure_rt60(room_response(rt60_s, distance, room), fs=SAMPLE_RATE)
    assert measured == pytest.approx(rt60_s, rel=0.06)


def test_validation_and_the_grid_never_share_a_room_response():
    # Rule: selection (validation) never sees the evaluation grid's own room responses.
    assert not np.array_equal(room_response(0.3, "far", "living")[:2000], room_response(0.3, "far", "bedroom")[:2000])


def test_a_room_keeps_the_level_and_smears_the_sound(conditioner):
    # Rule: a room condition changes reverberation, not level (levels are their own conditions).
    click = np.zeros(SAMPLE_RATE, np.float32)
    click[1000] = 0.5
    wet = conditioner.clip(click, Condition("room", "room", rt60_s=0.3, distance="far"), key=0)
    assert power_db(wet) == pytest.approx(power_db(click), abs=0.01)
    assert np.count_nonzero(np.abs(wet) > 1e-3) > 500  # the click rings on


def test_noise_in_long_audio_plays_on_through_the_pauses(conditioner):
    # Rule: in long audio the noise is continuous (a fan does not stop when nobody talks), at the named SNR below the
    # recording's active speech level (the louder half of its 100 ms frames).
    speech = np.concatenate([tone(300.0, peak=0.5, seconds=10), np.zeros(10 * SAMPLE_RATE, np.float32)])
    added = conditioner.recording(speech, noise_condition("pink", 10.0), key=0) - speech
    talking, pause = added[:10 * SAMPLE_RATE], added[10 * SAMPLE_RATE:]
    assert power_db(pause) == pytest.approx(power_db(talking), abs=0.5)
    assert power_db(speech[:10 * SAMPLE_RATE]) - power_db(added) == pytest.approx(10.0, abs=0.5)
    assert active_rms(speech) == pytest.approx(np.sqrt(np.mean(np.square(speech[:10 * SAMPLE_RATE]))), rel=1e-3)


def test_a_level_moves_the_whole_recordings_peak(conditioner):
    # Rule: a level condition on long audio is one gain for the whole recording, so its quiet stretches stay quiet.
    speech = np.concatenate([tone(300.0, peak=0.5, seconds=2), tone(300.0, peak=0.05, seconds=2)])
    out = conditioner.recording(speech, Condition("level", "level", peak_dbfs=-20.0), key=0)
    np.testing.assert_allclose(out, speech * (0.1 / 0.5), rtol=1e-5, atol=1e-7)


def test_babble_is_made_from_clips_of_any_length():
    # Rule: babble takes the negatives as they come, shorter than a second or longer.
    speech = [np.full(8000, 0.1, np.float32), np.full(24000, 0.2, np.float32)]
    noisy = Conditioner(speech=speech).clip(tone(440.0), noise_condition("babble", 5.0), key=0)
    assert noisy.shape == (SAMPLE_RATE,) and np.isfinite(noisy).all()


def test_the_default_grid_holds_every_kind_of_condition():
    # Rule: the default grid is clean, noise types x SNR {20, 10, 5, 0}, rooms near and far, levels, microphones.
    grid = default_grid()
    assert grid[0] == CLEAN and len({c.name for c in grid}) == len(grid)
    assert {c.group for c in grid} == {"clean", "noise", "room", "level", "mic"}
    assert len([c for c in grid if c.group == "noise"]) == len(NOISE_TYPES) * 4
    assert len([c for c in grid if c.group == "room"]) == 6


def test_a_grid_is_named_or_listed_and_anything_else_is_one_line():
    # Rule: --conditions takes a grid name or condition names; an unknown one is refused naming what is allowed.
    assert [c.name for c in parse_grid("clean,white_snr10", NOISE_TYPES)] == ["clean", "white_snr10"]
    with pytest.raises(ConditionError, match="unknown .'nosuch'.; allowed: default"):
        parse_grid("nosuch", NOISE_TYPES)


def test_a_users_noise_folder_becomes_a_noise_type(tmp_path, conditioner):
    # Rule: users add their own noise recordings to the grid by folder.
    sf.write(tmp_path / "fan.wav", tone(120.0, seconds=3.0), SAMPLE_RATE)
    recordings = read_noise_folders({"fan": tmp_path}, lambda p: sf.read(p, dtype="float32")[0])
    ours = Conditioner(speech=conditioner.speech, recordings=recordings)
    assert "fan" in ours.noise_types and "fan_snr0" in [c.name for c in parse_grid("default", ours.noise_types)]
    noisy = ours.clip(tone(1000.0), noise_condition("fan", 0.0), key=0)
    _, spectrum = signal.welch(noisy - tone(1000.0), fs=SAMPLE_RATE, nperseg=1024)
    assert np.argmax(spectrum) == round(120 / (SAMPLE_RATE / 1024))  # the fan's hum, not generated noise
    with pytest.raises(ConditionError, match="no .wav"):
        read_noise_folders({"empty": tmp_path / "nothing"}, None)


def test_conditions_load_no_torch():
    # Rule: evaluation stays as light as detection: the condition grid imports no torch.
    code = "import sys, kd_tune.audio.conditions; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
