from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

import kd_tune.recordings as recordings
from kd_tune.data import DataError, Split, WakewordData
from kd_tune.features import N_SAMPLES, SAMPLE_RATE
from kd_tune.recordings import LONG_FOLDER, negative_stream, read_recording

KINDS = ["positive", "hard_negative", "negative", "background"]


def noise(seconds: float, rate: int, *, channels: int = 1, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((round(seconds * rate), channels))).astype(np.float32)


def data_at(root: Path) -> WakewordData:
    """A data set of one clip per kind in every split, each clip filled with its index, rooted at root."""
    audio = torch.arange(len(KINDS), dtype=torch.float32)[:, None].expand(-1, N_SAMPLES).clone()
    split = Split(audio, torch.tensor([1, 0, 0, 0]), KINDS)
    return WakewordData(split, split, split, skipped=0, root=root, manifest_sha256="0" * 64)


def test_long_recordings_are_the_stream_in_name_order_at_16_khz(tmp_path):
    # Rule: a split's long recordings, read in name order, mixed to mono and resampled to 16 kHz, are its stream,
    # and each split reads only its own folder.
    folder = tmp_path / LONG_FOLDER / "val"
    folder.mkdir(parents=True)
    stereo, mono = noise(3, 48_000, channels=2, seed=1), noise(2, SAMPLE_RATE, seed=2)
    sf.write(folder / "b.wav", stereo, 48_000, subtype="FLOAT")
    sf.write(folder / "a.wav", mono, SAMPLE_RATE, subtype="FLOAT")
    stream = negative_stream(data_at(tmp_path), "val")
    expected_b = AF.resample(torch.from_numpy(stereo.mean(axis=1)), 48_000, SAMPLE_RATE)
    assert torch.equal(stream[:len(mono)], torch.from_numpy(mono[:, 0]))
    assert len(stream) == len(mono) + len(expected_b)
    assert torch.allclose(stream[len(mono):], expected_b, atol=1e-5)
    assert len(negative_stream(data_at(tmp_path), "test")) == 2 * N_SAMPLES  # no long/test: the fallback


def test_without_recordings_the_stream_never_joins_hard_negatives(tmp_path):
    # Rule: the fallback stream is the split's negative and background clips end to end; hard negatives ("hey",
    # "nova") stay out, as two of them in a row could say the wake word.
    stream = negative_stream(data_at(tmp_path), "val")
    assert torch.equal(stream, torch.cat([torch.full((N_SAMPLES,), 2.0), torch.full((N_SAMPLES,), 3.0)]))
    with pytest.raises(ValueError, match="'dev'"):
        negative_stream(data_at(tmp_path), "dev")


@pytest.mark.parametrize("rate", [22_050, 44_100, 8_000])
def test_block_resampling_equals_resampling_the_whole_file(tmp_path, monkeypatch, rate):
    # Rule: reading a long file in blocks (with context on both sides) gives the samples that resampling it whole
    # gives, so block boundaries leave no seams.
    monkeypatch.setattr(recordings, "BLOCK_SECONDS", 1)
    audio = noise(4.3, rate, seed=rate)
    sf.write(tmp_path / "x.wav", audio, rate, subtype="FLOAT")
    whole = AF.resample(torch.from_numpy(audio[:, 0]), rate, SAMPLE_RATE)
    blocks = read_recording(tmp_path / "x.wav", max_samples=10**9)
    assert blocks.shape == whole.shape
    assert torch.allclose(blocks, whole, atol=1e-5)


@pytest.mark.parametrize(("audio", "rate", "message"), [
    (np.full((16_000, 1), np.nan, np.float32), SAMPLE_RATE, "non-finite"),
    (noise(1, 44_101), 44_101, "sample rate 44101 Hz"),
    (noise(1, SAMPLE_RATE, channels=9), SAMPLE_RATE, "9 channels"),
    (noise(2, SAMPLE_RATE), SAMPLE_RATE, "pass 8 h"),
])
def test_a_bad_recording_is_refused_naming_the_file(tmp_path, audio, rate, message):
    # Rule: a recording that is not finite audio, has a rate or channel count out of bounds, or passes the split's
    # budget is refused with one message naming the file; the budget is checked on the header, before decoding.
    sf.write(tmp_path / "bad.wav", audio, rate, subtype="FLOAT")
    with pytest.raises(DataError, match=message) as refused:
        read_recording(tmp_path / "bad.wav", max_samples=SAMPLE_RATE)
    assert "bad.wav" in str(refused.value) and "\n" not in str(refused.value)
