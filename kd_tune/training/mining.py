"""Hard negatives mined by the student itself: at each epoch's start, the windows of the training split's long audio
that it scores highest, at every validation hop, not only the consecutive windows the training split holds.

A false activation on an hour of speech is the one window in tens of thousands that the detector takes for the wake
word. The training split cuts its long audio into consecutive 1 s windows, so the student never sees most alignments
of that audio; mining shows it the ones it gets most wrong, as negatives with hard labels (no teacher output: the
teacher-output cache holds the training split's own windows only, and nothing here is a wake word).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from kd_tune.audio.features import N_SAMPLES, LogMel
from kd_tune.metrics import sliding_windows
from kd_tune.training.scoring import stream_scores


class Miner:
    """The `count` highest-scoring windows of `stream` [T] every hop_samples, at most one per window length of audio
    (so one loud moment does not fill the set with its shifted copies), handed out a slice per training step."""

    def __init__(self, stream: Tensor, *, count: int, hop_samples: int):
        if count < 0:
            raise ValueError(f"count: got {count!r}; allowed: an integer >= 0")
        if not 0 < hop_samples <= N_SAMPLES:
            raise ValueError(f"hop_samples: got {hop_samples!r}; allowed: 1 to {N_SAMPLES}")
        self.stream, self.count, self.hop_samples = stream, count, hop_samples
        self.windows = stream.new_zeros(0, N_SAMPLES)  # [M, N_SAMPLES] the current mined set

    @property
    def enabled(self) -> bool:
        return self.count > 0 and len(self.stream) >= N_SAMPLES

    @torch.no_grad()
    def mine(self, model: nn.Module, log_mel: LogMel) -> Tensor:
        """Score every window with the model as it is now and keep the hardest; returns their probabilities [M]."""
        scores = stream_scores(model, self.stream, hop_samples=self.hop_samples, log_mel=log_mel)  # [W]
        keep = spaced_top(scores, self.count, spacing=N_SAMPLES // self.hop_samples)  # [M]
        windows = sliding_windows(self.stream, window_samples=N_SAMPLES, hop_samples=self.hop_samples)
        self.windows = windows[keep].to(next(model.parameters()).device)  # [M, N_SAMPLES]
        return scores[keep]

    def batch(self, step: int, steps: int) -> Tensor:
        """Step `step` of an epoch of `steps` gets its share of the mined windows [~M / steps, N_SAMPLES]."""
        size = -(-len(self.windows) // max(steps, 1))
        return self.windows[step % max(steps, 1) * size:][:size]


def spaced_top(scores: Tensor, count: int, *, spacing: int) -> Tensor:
    """Indices of the `count` highest scores [<= count], highest first, no two closer than `spacing` positions."""
    taken = np.zeros(len(scores), dtype=bool)
    keep: list[int] = []
    for i in np.argsort(-scores.numpy(), kind="stable"):
        if len(keep) == count:
            break
        if not taken[max(0, i - spacing + 1):i + spacing].any():
            keep.append(int(i))
            taken[i] = True
    return torch.tensor(keep, dtype=torch.long)

