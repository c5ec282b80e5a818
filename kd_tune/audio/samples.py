"""Audio samples wherever kd_tune reads them: the rates, channels and levels a file may hold, and resampling.

Training (audio.io, datasets.data) and detection (deploy.detect) resample with the same libsoxr call, so a
recording at 44.1 kHz becomes the same 16 kHz samples in both; numpy only, no torch, as detection needs. soxr's
stream gives, block by block, exactly the samples of one call on the whole recording (tests check both).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import soxr

MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ = 8_000, 192_000  # telephone audio to studio masters
MAX_CHANNELS = 32  # a microphone array; channels are averaged to mono
# Full scale is +-1 and float files may exceed it a little; beyond 60 dB over full scale a file is broken or
# mis-scaled (e.g. 16-bit integer values stored as floats), and the front end's power spectrum would overflow.
MAX_ABS_SAMPLE = 1e3
QUALITY = "HQ"  # soxr's default: 20-bit precision, a pass band to 91% of the lower Nyquist frequency


class AudioFault(NamedTuple):
    """Why audio is refused: a short kind that reports count by, and what was found against what is allowed."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})"


def header_problem(rate: int, channels: int) -> AudioFault | None:
    """What a recording's header alone shows to be outside the rates and channels kd_tune takes; None if nothing."""
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        return AudioFault("bad sample rate", f"{rate} Hz; allowed: {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        return AudioFault("bad channel count", f"{channels}; allowed: 1 to {MAX_CHANNELS}")
    return None


def sample_problem(samples: np.ndarray) -> AudioFault | None:
    """NaN, infinite or absurdly large samples [any shape]: no answer at all rather than a wrong one; None if fine."""
    peak = float(np.max(np.abs(samples), initial=0.0))
    if not math.isfinite(peak):
        return AudioFault("non-finite", "NaN or infinite samples; allowed: finite samples")
    if peak > MAX_ABS_SAMPLE:
        return AudioFault("out of range", f"peak |x| {peak:.3g}; allowed: at most {MAX_ABS_SAMPLE:g}, full scale is 1")
    return None


def resample(audio: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Mono float32 audio [T] at from_hz, band-limited and resampled to to_hz [round(T * to_hz / from_hz)]."""
    audio = np.ascontiguousarray(audio, np.float32)
    return audio if from_hz == to_hz else soxr.resample(audio, from_hz, to_hz, quality=QUALITY)


class BlockResampler:
    """resample() of audio that arrives block by block: push() returns what each block settles, finish() the rest.
    Memory stays that of one block, however long the recording."""

    def __init__(self, from_hz: int, to_hz: int):
        self.stream = soxr.ResampleStream(from_hz, to_hz, 1, dtype="float32", quality=QUALITY)

    def push(self, block: np.ndarray) -> np.ndarray:
        return self.stream.resample_chunk(np.ascontiguousarray(block, np.float32))

    def finish(self) -> np.ndarray:
        return self.stream.resample_chunk(np.zeros(0, np.float32), last=True)
