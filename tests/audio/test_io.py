import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

import kd_tune.audio.io as audio_module
from kd_tune.audio.features import SAMPLE_RATE
from kd_tune.audio.io import AudioFile, read_recording, resample
from kd_tune.errors import DataError
from kd_tune.signing import SpecialFileError, open_regular
from test_data import TONE_HZ, noise, peak_hz, tone


@pytest.mark.parametrize("rate", [191_999, 44_101, 11_025])
def test_any_rate_in_range_resamples_in_bounded_memory(rate):
    # Rule: a rate that shares no large factor with 16 kHz (191999 Hz: torchaudio's kernel would be 16000 x 192000)
    # is resampled by FFT, keeping the tone's pitch; usual rates still use torchaudio.
    assert resample(torch.zeros(rate // 2), rate, SAMPLE_RATE).shape == (SAMPLE_RATE // 2,)
    audio = torch.from_numpy(tone(1.0, rate))
    resampled = resample(audio, rate, SAMPLE_RATE)
    assert abs(len(resampled) - SAMPLE_RATE) <= 1
    assert abs(peak_hz(resampled[:SAMPLE_RATE]) - TONE_HZ) < 2
    assert math.isclose(float(resampled[1000:-1000].abs().max()), 0.5, abs_tol=0.02)


@pytest.mark.parametrize("rate", [22_050, 44_100, 8_000])
def test_block_resampling_equals_resampling_the_whole_file(tmp_path, monkeypatch, rate):
    # Rule: reading a long file in blocks (with context on both sides) gives the samples that resampling it whole
    # gives, so block boundaries leave no seams.
    monkeypatch.setattr(audio_module, "BLOCK_SECONDS", 1)
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


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["FIFO", "directory", "device"])
def test_a_recording_that_is_no_file_is_refused_without_blocking(tmp_path, kind):
    # Rule: a FIFO (libsndfile's open would wait for a writer forever), a folder or a device among the long
    # recordings is refused by a stat before any open, in one line naming it; a clip of that kind is unreadable.
    path = Path("/dev/zero") if kind == "device" else tmp_path / "long.wav"
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(DataError, match=f"^{path}: not a regular file \\(a {kind}\\); allowed: a WAV or FLAC file$"):
        read_recording(path, max_samples=SAMPLE_RATE)
    clip = AudioFile.read(path)
    assert not clip.usable and clip.problems == [("unreadable", f"not a regular file (a {kind})")]
    with pytest.raises(SpecialFileError):
        open_regular(path)
