"""kd_tune.audio.samples: one resampler for training and detection, band-limited, seamless block by block."""

import numpy as np
import pytest
import soundfile as sf
import torch
from test_data import noise

import kd_tune.audio.io as audio_module
from kd_tune.audio.features import SAMPLE_RATE
from kd_tune.audio.io import read_recording
from kd_tune.audio.samples import BlockResampler, header_problem, resample, sample_problem
from kd_tune.deploy.detect import load_audio


def tone(hz: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


@pytest.mark.parametrize("rate", [8_000, 11_025, 22_050, 44_100, 44_101, 48_000, 191_999])
def test_any_rate_in_range_reproduces_a_tone_at_16k(rate):
    # Rule: any input rate in range, even one sharing no factor with 16 kHz (191999 Hz), is brought to 16 kHz
    # without shifting, scaling or stretching the signal: the length is the rate ratio's, the tone the same.
    out = resample(tone(440.0, rate), rate, SAMPLE_RATE)
    assert out.dtype == np.float32 and len(out) == SAMPLE_RATE
    interior = slice(SAMPLE_RATE // 20, -SAMPLE_RATE // 20)  # the edges see the silence around the clip
    assert np.abs(out[interior] - tone(440.0, SAMPLE_RATE)[interior]).max() < 1e-3


def test_downsampling_removes_what_16k_cannot_hold():
    # Rule: downsampling low-passes first, so a tone above the new Nyquist frequency does not alias into the audio.
    out = resample(tone(10_000.0, 44_100), 44_100, SAMPLE_RATE)
    assert np.sqrt(np.mean(out[800:-800] ** 2)) < 1e-3 * np.sqrt(np.mean(tone(10_000.0, 44_100) ** 2))


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 191_999])
def test_blocks_give_the_samples_of_one_call(rate):
    # Rule: audio resampled as it arrives, in blocks of any size, is sample for sample the whole audio resampled.
    audio = noise(2.3, rate, seed=rate)[:, 0]
    blocks = BlockResampler(rate, SAMPLE_RATE)
    pieces = [blocks.push(audio[i:i + 7_777]) for i in range(0, len(audio), 7_777)] + [blocks.finish()]
    np.testing.assert_array_equal(np.concatenate(pieces), resample(audio, rate, SAMPLE_RATE))


@pytest.mark.parametrize("rate", [22_050, 44_100, 48_000])
def test_training_and_detection_read_a_recording_as_the_same_samples(tmp_path, monkeypatch, rate):
    # Rule: train/serve parity: a stereo recording at another rate becomes the same 16 kHz samples when a data set
    # loads it (audio.io, in blocks) as when `kd-tune detect` reads it (deploy.detect, in its own blocks).
    monkeypatch.setattr(audio_module, "BLOCK_FRAMES", 10_000)
    path = tmp_path / "x.wav"
    sf.write(path, noise(4.3, rate, seed=rate, channels=2), rate, subtype="FLOAT")
    training = read_recording(path, max_samples=10**9)
    detection = load_audio(path, sample_rate=SAMPLE_RATE)
    assert training.dtype == torch.float32 and len(training) == round(4.3 * SAMPLE_RATE)
    np.testing.assert_array_equal(training.numpy(), detection)


@pytest.mark.parametrize(("rate", "channels", "fault"), [
    (7_999, 1, "bad sample rate (7999 Hz; allowed: 8000 to 192000 Hz)"),
    (192_001, 2, "bad sample rate (192001 Hz; allowed: 8000 to 192000 Hz)"),
    (16_000, 0, "bad channel count (0; allowed: 1 to 32)"),
    (16_000, 33, "bad channel count (33; allowed: 1 to 32)"),
    (8_000, 1, None), (192_000, 32, None),
])
def test_one_header_rule_for_training_and_detection(rate, channels, fault):
    # rule: the rates and channel counts kd_tune takes are one set, refused in one wording (io, data and detect all
    # raise str(header_problem(...))), naming what was found and what is allowed; the bounds themselves are allowed
    assert (str(found) if (found := header_problem(rate, channels)) else None) == fault


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "non-finite"), (-np.inf, "non-finite"), (1e3 + 1, "out of range"),
                                             (-1e3, None), (0.0, None)])
def test_one_sample_rule_for_training_and_detection(value, kind):
    # rule: NaN, inf and samples beyond +-1e3 are refused by kind; full-scale excursions up to 1e3 and silence pass
    samples = np.zeros((100, 2), np.float32)
    samples[50, 1] = value
    found = sample_problem(samples)
    assert (found.kind if found else None) == kind
    assert sample_problem(np.zeros(0, np.float32)) is None  # an empty block has nothing wrong in it
