import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kd_tune.audio.features import SAMPLE_RATE
from kd_tune.audio.io import AudioFile, read_recording
from kd_tune.errors import DataError
from kd_tune.signing import SpecialFileError, open_regular
from test_data import noise


@pytest.mark.parametrize(("audio", "rate", "message"), [
    (np.full((16_000, 1), np.nan, np.float32), SAMPLE_RATE, "non-finite"),
    (noise(1, 7_999), 7_999, "bad sample rate \\(7999 Hz"),
    (noise(0.1, SAMPLE_RATE, channels=33), SAMPLE_RATE, "bad channel count \\(33;"),
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
