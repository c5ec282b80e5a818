"""Audio files read within bounds: a clip's checks (`AudioFile`), and a long recording decoded and resampled block
by block (`read_recording`), with detection's resampler (audio.samples).

Every header is checked before decoding, so a tiny file that claims a huge rate, length or channel count costs
nothing; memory stays proportional to the 16 kHz audio however long or fast a file is.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from kd_tune.audio.features import SAMPLE_RATE
from kd_tune.audio.samples import BlockResampler, header_problem, sample_problem
from kd_tune.errors import DataError
from kd_tune.signing import SpecialFileError, open_regular, read_regular

AUDIO_SUFFIXES = (".wav", ".flac")
# `check` thresholds; files with an UNUSABLE problem are skipped by `load_dataset`, the others only reported
SILENT_PEAK = 1e-4
CLIPPED_LEVEL = 0.999
CLIPPED_FRACTION = 0.01
MIN_SECONDS = 0.3
MAX_SECONDS = 10.0
MAX_FILE_BYTES = 128 * 2**20  # a clip of 10 s at 192 kHz in 8 channels of 64-bit float is 123 MB; more: "too large"
UNUSABLE = frozenset({"unreadable", "not audio", "too large", "bad sample rate", "bad channel count", "empty",
                      "non-finite", "out of range", "silent", "too long"})
MAX_STREAM_HOURS = 8  # per split: 8 h at 16 kHz is 1.8 GB of float32
BLOCK_FRAMES = 2**18  # decoded and resampled at a time: 1 MiB per channel, 32 MiB at most (MAX_CHANNELS)
MAX_FOLDER_DEPTH = 32  # levels of folders under a class or long/ folder; a data set nests two or three


def files_under(folder: Path, *, max_depth: int = MAX_FOLDER_DEPTH) -> list[Path]:
    """Every entry under `folder` that is not a folder, sorted, hidden names left out: FIFOs and devices included, for
    the caller to count (AudioFile.read refuses them unopened). Links to folders are not followed, as in rglob.

    Walked with a stack, not by recursion: 1,500 nested folders cannot reach Python's recursion limit; past
    max_depth the folder is refused (DataError), since no data set nests that deep.
    """
    found, stack = [], [(Path(folder), 0)]
    while stack:
        current, depth = stack.pop()
        try:
            entries = list(os.scandir(current))
        except PermissionError:  # rglob skips a folder it may not list: so does this walk
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if depth >= max_depth:
                    raise DataError(f"{folder}: folders nested deeper than {max_depth} levels; allowed: at most "
                                    f"{max_depth} levels of folders in a data set")
                stack.append((Path(entry.path), depth + 1))
            elif not entry.is_dir() and not entry.name.startswith("."):
                found.append(Path(entry.path))
    return sorted(found)


def find_problems(audio: np.ndarray, sample_rate: int) -> list[tuple[str, str]]:
    """(problem, detail) pairs of decoded audio [T, C]; see the thresholds at the top of the module."""
    if audio.size == 0:
        return [("empty", "no samples")]
    if refused := sample_problem(audio):
        return [refused]
    magnitude = np.abs(audio)
    problems = []
    if magnitude.max() < SILENT_PEAK:
        problems.append(("silent", f"peak {magnitude.max():.1e} < {SILENT_PEAK:.0e}"))
    clipped = float(np.mean(magnitude >= CLIPPED_LEVEL))
    if clipped >= CLIPPED_FRACTION:
        problems.append(("clipped", f"{clipped:.1%} of samples at |x| >= {CLIPPED_LEVEL}"))
    seconds = audio.shape[0] / sample_rate
    if seconds < MIN_SECONDS:
        problems.append(("too short", f"{seconds:.2f} s < {MIN_SECONDS} s"))
    if seconds > MAX_SECONDS:
        problems.append(("too long", f"{seconds:.1f} s > {MAX_SECONDS} s"))
    return problems


def header_problems(sample_rate: int, channels: int, frames: int) -> list[tuple[str, str]]:
    """What the header alone shows to be unusable: checked before decoding, so nothing huge is allocated."""
    if refused := header_problem(sample_rate, channels):
        return [refused]
    if frames > MAX_SECONDS * sample_rate:
        return [("too long", f"{frames / sample_rate:.1f} s > {MAX_SECONDS} s")]
    return []


@dataclass(frozen=True)
class AudioFile:
    """One decoded audio file: samples [T, C] (None when unreadable), its problems and the sha256 of its bytes."""

    path: Path
    audio: np.ndarray | None
    sample_rate: int
    problems: list[tuple[str, str]]
    sha256: str

    @staticmethod
    def read(path: Path) -> AudioFile:
        """The file read once (the bytes hashed are the bytes decoded); its header checked before decoding."""
        try:
            data = read_regular(path, MAX_FILE_BYTES)  # None past it
        except SpecialFileError as error:  # a FIFO, device or folder named like a clip: refused unopened
            return AudioFile(path, None, 0, [("unreadable", f"not a regular file ({error.kind})")], "unreadable")
        except (OSError, ValueError) as error:  # ValueError: a NUL in the path
            return AudioFile(path, None, 0, [("unreadable", str(error))], "unreadable")
        if data is None:
            return AudioFile(path, None, 0, [("too large", f"over {MAX_FILE_BYTES // 2**20} MiB")], "unread")
        digest = hashlib.sha256(data).hexdigest()
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                problems = header_problems(f.samplerate, f.channels, f.frames)
                if problems:
                    return AudioFile(path, None, f.samplerate, problems, digest)
                audio, sample_rate = f.read(dtype="float32", always_2d=True), f.samplerate
        except sf.SoundFileError as error:  # error_string: libsndfile's own words, without the BytesIO's repr
            detail = getattr(error, "error_string", "") or str(error).strip() or type(error).__name__
            return AudioFile(path, None, 0, [("unreadable", detail)], digest)
        return AudioFile(path, audio, sample_rate, find_problems(audio, sample_rate), digest)

    @property
    def usable(self) -> bool:
        return self.audio is not None and not any(problem in UNUSABLE for problem, _ in self.problems)


def read_recording(path: Path, *, max_samples: int) -> Tensor:
    """Mono float32 [T] at 16 kHz from a long recording, refused (DataError) when bad or over max_samples."""
    try:  # opened here, not by libsndfile: a FIFO or device is refused before any open that could block
        with open_regular(path) as raw, sf.SoundFile(raw) as f:
            check_header(path, f.samplerate, f.channels, round(f.frames * SAMPLE_RATE / f.samplerate), max_samples)
            return resample_blocks(f, path)
    except SpecialFileError as error:
        raise DataError(f"{path}: not a regular file ({error.kind}); allowed: a WAV or FLAC file") from None
    except (sf.SoundFileError, RuntimeError, OSError) as error:
        detail = getattr(error, "error_string", "") or getattr(error, "strerror", "") or str(error)
        raise DataError(f"{path}: cannot read audio ({detail}); allowed: a WAV or FLAC file") from None


def check_header(path: Path, rate: int, channels: int, n_samples: int, max_samples: int) -> None:
    if refused := header_problem(rate, channels):
        raise DataError(f"{path}: {refused}")
    if n_samples > max_samples:
        raise DataError(f"{path}: the split's long recordings pass {MAX_STREAM_HOURS} h; allowed: at most "
                        f"{MAX_STREAM_HOURS} h per split")


def resample_blocks(f: sf.SoundFile, path: Path) -> Tensor:
    """The file's mono audio at 16 kHz [T], decoded and resampled BLOCK_FRAMES at a time (the samples of one
    resampling of the whole file: audio.samples.BlockResampler)."""
    resampler = BlockResampler(f.samplerate, SAMPLE_RATE) if f.samplerate != SAMPLE_RATE else None
    out = []
    for start in range(0, f.frames, BLOCK_FRAMES):
        block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)  # [t, C]
        if refused := sample_problem(block):
            raise DataError(f"{path}: {refused} near {start / f.samplerate:.1f} s")
        mono = block.mean(axis=1)
        out.append(resampler.push(mono) if resampler else mono)
    if resampler:
        out.append(resampler.finish())
    return torch.from_numpy(np.concatenate(out)) if out else torch.zeros(0)
