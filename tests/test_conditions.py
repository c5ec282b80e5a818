"""kd_tune.conditions: every condition does what its name says, the same way every time, without torch."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from kd_tune.conditions import (CLEAN, DISTANCES_M, NOISE_TYPES, ROOM_RT60_S, SAMPLE_RATE, Condition, ConditionError,
                                Conditioner, default_grid, noise_condition, parse_grid, read_noise_folders,
                                room_response)


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
def test_noise_is_mixed_at_the_named_snr_over_the_whole_clip(conditioner, noise, snr_db):
    # Rule: an SNR condition means 10 log10(P_speech / P_noise) over the whole 1 s clip, for every noise type.
    clean = tone(440.0)
    noisy = conditioner.clip(clean, noise_condition(noise, snr_db), key=3)
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    assert power_db(clean) - power_db(noisy - clean) == pytest.approx(snr_db, abs=0.01)


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
def test_image_source_rooms_reverberate_for_their_nominal_rt60(rt60_s, distance):
    # Rule: a room condition's RT60, measured on its impulse response (Schroeder), is the nominal one within 10%.
    import pyroomacoustics as pra

    measured = pra.experimental.measure_rt60(room_response(rt60_s, distance), fs=SAMPLE_RATE)
    assert measured == pytest.approx(rt60_s, rel=0.10)


def test_a_room_keeps_the_level_and_smears_the_sound(conditioner):
    # Rule: a room condition changes reverberation, not level (levels are their own conditions).
    click = np.zeros(SAMPLE_RATE, np.float32)
    click[1000] = 0.5
    wet = conditioner.clip(click, Condition("room", "room", rt60_s=0.3, distance="far"), key=0)
    assert power_db(wet) == pytest.approx(power_db(click), abs=0.01)
    assert np.count_nonzero(np.abs(wet) > 1e-3) > 500  # the click rings on


def test_long_audio_gets_the_snr_block_by_block(conditioner):
    # Rule: in long audio the SNR holds for every block, so speech that comes and goes is not drowned or spared.
    speech = np.concatenate([tone(300.0, peak=0.5, seconds=10), tone(300.0, peak=0.05, seconds=10)])
    noisy = conditioner.recording(speech, noise_condition("pink", 10.0), key=0)
    for start in (0, 10 * SAMPLE_RATE):
        block = slice(start, start + 10 * SAMPLE_RATE)
        assert power_db(speech[block]) - power_db((noisy - speech)[block]) == pytest.approx(10.0, abs=0.01)


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
    code = "import sys, kd_tune.conditions; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
