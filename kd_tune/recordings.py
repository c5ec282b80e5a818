"""Long negative recordings, `<root>/long/<split>/*.wav`: the audio that false activations per hour are counted on.

A detector that must fire at most once an hour is only measured on hours of audio, so a data set carries long
recordings for its val and test splits (`kd-tune data synth` renders them). They are read in name order, their
headers checked before decoding, mixed to mono and resampled to 16 kHz block by block, so memory stays proportional to
the 16 kHz stream however long or fast a file is. A split without recordings falls back to its negative and
background clips joined end to end, never its hard negatives: "hey" then "nova" would join into the wake word.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor

from kd_tune.data import AUDIO_SUFFIXES, MAX_ABS_SAMPLE, MAX_CHANNELS, MAX_RESAMPLE_KERNEL, MAX_SAMPLE_RATE_HZ, \
    MIN_SAMPLE_RATE_HZ, SPLITS, DataError, WakewordData
from kd_tune.features import SAMPLE_RATE

LONG_FOLDER = "long"
MAX_STREAM_HOURS = 8  # per split: 8 h at 16 kHz is 1.8 GB of float32
BLOCK_SECONDS = 10  # decoded and resampled at a time
RESAMPLE_MARGIN_PERIODS = 64  # rate-ratio periods of context on each side of a block: wider than the sinc kernel


def recording_paths(root: Path, split: str) -> list[Path]:
    """The long recordings of a split, in name order."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    folder = Path(root) / LONG_FOLDER / split
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES) if folder.is_dir() else []


def negative_stream(data: WakewordData, split: str = "val") -> Tensor:
    """A split's negative audio [T] at 16 kHz: its long recordings end to end, or else its negative and background
    clips end to end."""
    paths = recording_paths(data.root, split)
    if not paths:
        part = getattr(data, split)
        joined = part.audio[[k in ("negative", "background") for k in part.kinds]]
        return (joined if len(joined) else part.audio[part.labels == 0]).reshape(-1)
    budget = MAX_STREAM_HOURS * 3600 * SAMPLE_RATE
    streams = []
    for path in paths:
        streams.append(read_recording(path, max_samples=budget))
        budget -= len(streams[-1])
    return torch.cat(streams)


def read_recording(path: Path, *, max_samples: int) -> Tensor:
    """Mono float32 [T] at 16 kHz from a long recording, refused (DataError) when bad or over max_samples."""
    try:
        with sf.SoundFile(path) as f:
            check_header(path, f.samplerate, f.channels, round(f.frames * SAMPLE_RATE / f.samplerate), max_samples)
            return resample_blocks(f, path)
    except (sf.SoundFileError, RuntimeError, OSError) as error:
        raise DataError(f"{path}: cannot read audio ({error}); allowed: a WAV or FLAC file") from None


def check_header(path: Path, rate: int, channels: int, n_samples: int, max_samples: int) -> None:
    g = math.gcd(rate, SAMPLE_RATE)
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ or (rate // g) * (SAMPLE_RATE // g) > MAX_RESAMPLE_KERNEL:
        raise DataError(f"{path}: sample rate {rate} Hz; allowed: {MIN_SAMPLE_RATE_HZ}-{MAX_SAMPLE_RATE_HZ} Hz with "
                        "a large common factor with 16 kHz (8, 11.025, 16, 22.05, 32, 44.1, 48, 96 kHz, ...)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise DataError(f"{path}: {channels} channels; allowed: 1 to {MAX_CHANNELS}")
    if n_samples > max_samples:
        raise DataError(f"{path}: the split's long recordings pass {MAX_STREAM_HOURS} h; allowed: at most "
                        f"{MAX_STREAM_HOURS} h per split")


def resample_blocks(f: sf.SoundFile, path: Path) -> Tensor:
    """The file's mono audio at 16 kHz [T], decoded and resampled BLOCK_SECONDS at a time.

    Blocks start on whole rate-ratio periods and carry a margin of context on both sides, so every output sample is
    the one resampling the whole file at once gives (up to float rounding).
    """
    g = math.gcd(f.samplerate, SAMPLE_RATE)
    period_in, period_out = f.samplerate // g, SAMPLE_RATE // g
    periods = max(1, BLOCK_SECONDS * g)  # per block
    margin = RESAMPLE_MARGIN_PERIODS * period_in
    out = []
    for start in range(0, f.frames, periods * period_in):
        low = max(0, start - margin)
        f.seek(low)
        block = f.read(start - low + periods * period_in + margin, dtype="float32", always_2d=True)  # [t, C]
        if not np.isfinite(block).all() or np.abs(block).max(initial=0) > MAX_ABS_SAMPLE:
            raise DataError(f"{path}: non-finite or out-of-range samples near {start / f.samplerate:.1f} s; allowed: "
                            "finite audio within full scale")
        mono = torch.from_numpy(block.mean(axis=1))
        resampled = AF.resample(mono, f.samplerate, SAMPLE_RATE) if period_in != period_out else mono
        skip = (start - low) // period_in * period_out
        out.append(resampled[skip:skip + periods * period_out])
    n_out = math.ceil(f.frames * SAMPLE_RATE / f.samplerate)
    return torch.cat(out)[:n_out] if out else torch.zeros(0)
