"""Wake-word metrics: clip accuracy, ROC AUC, EER, and false accepts per hour when sliding over long audio.

numpy only at import time (torch only inside sliding_windows), so the exported model's detector can share the
activation rule without torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

SECONDS_PER_HOUR = 3600.0
MAX_THRESHOLD_CANDIDATES = 512


@dataclass(frozen=True)
class Metric:
    """One figure a training epoch reports: where TensorBoard shows it and how the sweep, leaderboard and console
    use it."""

    tag: str  # TensorBoard tag; the group before "/" orders the charts
    goal: str | None = None  # "min" or "max" where a sweep may rank trials by it
    column: bool = False  # a column of the leaderboard files
    shown: bool = False  # a column of the leaderboard printed on the terminal
    echo: bool = False  # printed on the console after each epoch


# Every metric `fit` reports besides "epoch" and "step" (the cuda_* ones on CUDA only), in display order. The loop,
# TensorBoard, the leaderboard, the console, bench and the config's `tune.metric` all read this table.
METRICS = {
    # the mean of frr_at_target_fa (clean) and the frr_<condition> figures: what a sweep selects on by default
    "frr_conditions": Metric("eval/frr_conditions", "min", column=True, shown=True, echo=True),
    "frr_at_target_fa": Metric("eval/frr_at_target_fa", "min", column=True, shown=True, echo=True),
    # the validation positives under a fixed, seeded mix of acoustic conditions (training.scoring.VALIDATION_MIX), at
    # the clean stream's threshold for the target FA/h
    "frr_snr10": Metric("eval/frr_snr10", "min", column=True),
    "frr_snr0": Metric("eval/frr_snr0", "min", column=True),
    "frr_room": Metric("eval/frr_room", "min", column=True),
    "frr_level": Metric("eval/frr_level", "min", column=True),
    "frr_mic": Metric("eval/frr_mic", "min", column=True),
    "fa_per_hour": Metric("eval/fa_per_hour", "min", column=True, shown=True, echo=True),
    "accuracy": Metric("eval/accuracy", "max", column=True, shown=True, echo=True),
    "auc": Metric("eval/auc", "max", column=True, shown=True, echo=True),
    "eer": Metric("eval/eer", "min", column=True, echo=True),
    "threshold": Metric("eval/threshold", column=True),
    "student_loss": Metric("loss/student", "min", column=True, echo=True),
    "distillation_loss": Metric("loss/distillation", "min", column=True, echo=True),
    "total_loss": Metric("loss/total", "min", echo=True),
    "alpha": Metric("schedule/alpha"),
    "temperature": Metric("schedule/temperature"),
    "lr": Metric("schedule/lr"),
    "skipped_steps": Metric("system/skipped_steps"),
    "epoch_seconds": Metric("system/epoch_seconds"),  # training: augmentation, mining and steps
    "validation_seconds": Metric("system/validation_seconds"),  # the epoch's validation pass, streams included
    "peak_rss_mib": Metric("system/peak_rss_mib"),  # the worker process's peak resident memory so far
    "cuda_max_allocated_mib": Metric("system/cuda_max_allocated_mib"),  # CUDA only: the epoch's peak
    "cuda_max_reserved_mib": Metric("system/cuda_max_reserved_mib"),  # CUDA only: the epoch's peak
}
RANKABLE = tuple(name for name, m in METRICS.items() if m.goal)
def epoch_key(result: Mapping[str, object], metric: str, mode: str) -> tuple[float, float]:
    """The one rule that picks a best epoch, and ranks trials by theirs: sort by this key, best first. `metric` in
    `mode`'s direction (missing or NaN last), then the later epoch: Ray's checkpoint retention in a sweep keeps the
    later of tied checkpoints, so any other tie-breaker (AUC, the earlier epoch) could pick one it deleted."""
    value, epoch = _number(result.get(metric)), _number(result.get("epoch"))
    return (math.inf if math.isnan(value) else value if mode == "min" else -value,
            math.inf if math.isnan(epoch) else -epoch)


def _number(value: object) -> float:
    # numbers.Real: numpy's int64 and float64 too (a pandas row's), never a bool
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan


class BestEpoch:
    """The best of the epochs offered so far by epoch_key: its whole result, None before the first."""

    result: dict[str, Any] | None

    def __init__(self, metric: str, mode: str):
        self.metric, self.mode, self.result = metric, mode, None

    def offer(self, result: Mapping[str, object], _checkpoint=None) -> None:
        """Take one epoch's result (also a `fit` report callback, whose second argument it ignores)."""
        key = epoch_key(result, self.metric, self.mode)
        if self.result is None or key < epoch_key(self.result, self.metric, self.mode):
            self.result = dict(result)


def echo_line(metrics: dict) -> str:
    """The metrics a console shows after an epoch, as `name=value` pairs in table order."""
    return " ".join(f"{k}={metrics[k]:.4f}" for k, m in METRICS.items() if m.echo and k in metrics)
LOSSES = tuple(name for name, m in METRICS.items() if m.tag.startswith("loss/"))


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly half precision or on a GPU
        values = values.detach().cpu().float()
    return np.asarray(values, dtype=np.float64).ravel()


def _to_labels(labels) -> np.ndarray:
    labels = _to_numpy(labels)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(labels)[:10].tolist()}")
    return labels.astype(bool)


def roc_auc(scores, labels) -> float:
    """ROC AUC from the rank-sum (Mann-Whitney U) statistic; ties count half. nan if a class is absent."""
    scores, labels = _to_numpy(scores), _to_labels(labels)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    average_rank = (last_rank - (counts - 1) / 2.0)[group]  # [N]
    return float((average_rank[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def equal_error_rate(scores, labels) -> tuple[float, float]:
    """(EER, threshold) where false-accept and false-reject rates are closest; a score >= threshold accepts.

    Thresholds range over the observed scores; the EER is the mean of the two rates there. (nan, nan) if a class is
    absent.
    """
    scores, labels = _to_numpy(scores), _to_labels(labels)
    positives, negatives = np.sort(scores[labels]), np.sort(scores[~labels])
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan, math.nan
    thresholds = np.unique(scores)
    false_reject = np.searchsorted(positives, thresholds, side="left") / len(positives)
    false_accept = 1.0 - np.searchsorted(negatives, thresholds, side="left") / len(negatives)
    best = int(np.argmin(np.abs(false_accept - false_reject)))
    return float((false_accept[best] + false_reject[best]) / 2.0), float(thresholds[best])


def _check_stream_args(probabilities: np.ndarray, hop_seconds: float, refractory_seconds: float) -> None:
    if len(probabilities) == 0:
        raise ValueError("stream probabilities are empty")
    if not hop_seconds > 0:
        raise ValueError(f"hop_seconds must be > 0, got {hop_seconds!r}")
    if not refractory_seconds >= 0:
        raise ValueError(f"refractory_seconds must be >= 0, got {refractory_seconds!r}")


def activation_indices(probabilities: np.ndarray, *, threshold: float, refractory_windows: int) -> list[int]:
    """Windows where a detector fires: a rising edge (>= threshold after a window below it) unless it falls within
    refractory_windows of the previous detection."""
    above = np.asarray(probabilities) >= threshold  # [N]
    # the stream is taken to start below threshold, so an active first window is a rising edge
    rising = np.flatnonzero(above & ~np.concatenate(([False], above[:-1])))
    fired, i = [], 0
    while i < len(rising):
        fired.append(int(rising[i]))
        # jump over the edges inside the refractory period: one step per detection, not per edge
        i = int(np.searchsorted(rising, rising[i] + max(refractory_windows, 1), side="left"))
    return fired


def refractory_window_count(refractory_seconds: float, hop_seconds: float) -> int:
    """The refractory period in whole windows, rounded so that e.g. 2.1 / 0.3 = 7.000000000000001 does not become 8."""
    return math.ceil(round(refractory_seconds / hop_seconds, 9))


def activation_times(
    probabilities, *, threshold: float, hop_seconds: float, refractory_seconds: float = 1.0
) -> list[float]:
    """Start times (s) of the windows where the detector fires over a stream of per-window probabilities.

    It fires on a rising edge (prob >= threshold after a window below it) at least refractory_seconds after the
    previous detection's start, so one sustained activation counts once.
    """
    probabilities = _to_numpy(probabilities)
    _check_stream_args(probabilities, hop_seconds, refractory_seconds)
    fired = activation_indices(probabilities, threshold=threshold,
                               refractory_windows=refractory_window_count(refractory_seconds, hop_seconds))
    return [i * hop_seconds for i in fired]


def count_activations(probabilities, *, threshold: float, hop_seconds: float, refractory_seconds: float = 1.0) -> int:
    """Number of detections in the stream, as defined by activation_times."""
    times = activation_times(
        probabilities, threshold=threshold, hop_seconds=hop_seconds, refractory_seconds=refractory_seconds
    )
    return len(times)


def stream_hours(probabilities, *, hop_seconds: float) -> float:
    """Duration covered by a stream of windows, counted as one hop per window."""
    return len(_to_numpy(probabilities)) * hop_seconds / SECONDS_PER_HOUR


def audio_hours(n_samples: int, sample_rate: int) -> float:
    """The length of audio in hours: what FA/h divides by when the audio is at hand (see false_accepts_per_hour)."""
    return n_samples / sample_rate / SECONDS_PER_HOUR


def false_accepts_per_hour(
    probabilities, *, threshold: float, hop_seconds: float, refractory_seconds: float = 1.0, hours: float | None = None
) -> float:
    """Detections per hour on audio without the wake word. hours: the length of the audio the windows were cut from
    (one hop per window when not given, which undercounts by a window less a hop: then one false activation on an
    hour of audio would read as more than 1 FA/h)."""
    count = count_activations(
        probabilities, threshold=threshold, hop_seconds=hop_seconds, refractory_seconds=refractory_seconds
    )
    return count / (stream_hours(probabilities, hop_seconds=hop_seconds) if hours is None else hours)


def threshold_for_fa_rate(
    stream_probabilities, *, target_fa_per_hour: float, hop_seconds: float, refractory_seconds: float = 1.0,
    hours: float | None = None,
) -> float:
    """Lowest threshold (in float32) from which on the stream's FA/h stays <= target_fa_per_hour.

    FA/h is not monotone in the threshold (a higher one can split a sustained activation into several), so a lone
    dip below the target is not trusted: up to MAX_THRESHOLD_CANDIDATES quantiles of the unique probabilities are
    tried from the top down until one fails, then the gap up to the next candidate is bisected. With no more unique
    values than that the answer is exact. If even the highest probability fires too often, the result lies just
    above it (no detection at all). hours: as in false_accepts_per_hour.
    """
    probabilities = _to_numpy(stream_probabilities)
    _check_stream_args(probabilities, hop_seconds, refractory_seconds)
    if not target_fa_per_hour >= 0:
        raise ValueError(f"target_fa_per_hour must be >= 0, got {target_fa_per_hour!r}")

    def meets_target(threshold: float) -> bool:
        fa_per_hour = false_accepts_per_hour(
            probabilities, threshold=threshold, hop_seconds=hop_seconds, refractory_seconds=refractory_seconds,
            hours=hours,
        )
        return fa_per_hour <= target_fa_per_hour

    values = np.unique(probabilities)  # sorted
    grid = np.unique(np.linspace(0, len(values) - 1, min(len(values), MAX_THRESHOLD_CANDIDATES)).round().astype(int))
    passing = len(values)  # index of the lowest passing candidate so far; len(values) means above the maximum
    # from the top down: high thresholds fire rarely, so they are cheap, and the first failure ends the scan
    for failing in grid[::-1]:
        if not meets_target(values[failing]):
            break
        passing = failing
    else:
        return float(values[0])
    if passing == len(values):
        # next float32 up, so the threshold stays above the maximum when compared in float32 too
        return float(np.nextafter(np.float32(values[-1]), np.float32(np.inf)))
    low, high = int(failing), int(passing)  # values[low] fails, values[high] meets the target
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if meets_target(values[middle]) else (middle, high)
    # No window scores strictly between values[low] and values[high], so every threshold above values[low] fires on
    # the same windows as values[high] does: the lowest of them (the next float32 up) misses the fewest positives.
    return float(np.nextafter(np.float32(values[low]), np.float32(np.inf)))


def clip_metrics(clip_probabilities, clip_labels) -> dict[str, float]:
    """Accuracy at 0.5, ROC AUC and EER of clip probabilities against 0/1 labels."""
    probabilities, labels = _to_numpy(clip_probabilities), _to_labels(clip_labels)
    return {"accuracy": float(np.mean((probabilities >= 0.5) == labels)), "auc": roc_auc(probabilities, labels),
            "eer": equal_error_rate(probabilities, labels)[0]}


def wakeword_metrics(
    clip_probabilities,
    clip_labels,
    stream_probabilities,
    *,
    hop_seconds: float,
    target_fa_per_hour: float,
    refractory_seconds: float = 1.0,
    hours: float | None = None,
) -> dict[str, float]:
    """Clip metrics (accuracy at 0.5, AUC, EER) plus the operating point meeting target FA/h on a negative stream
    (of `hours` of audio, see false_accepts_per_hour)."""
    probabilities, labels = _to_numpy(clip_probabilities), _to_labels(clip_labels)
    stream = _to_numpy(stream_probabilities)
    hours = stream_hours(stream, hop_seconds=hop_seconds) if hours is None else hours
    threshold = threshold_for_fa_rate(stream, target_fa_per_hour=target_fa_per_hour, hop_seconds=hop_seconds,
                                      refractory_seconds=refractory_seconds, hours=hours)
    positives = probabilities[labels]
    return clip_metrics(probabilities, labels) | {
        "threshold": threshold,
        "frr_at_target_fa": float(np.mean(positives < threshold)) if len(positives) else math.nan,
        "fa_per_hour": false_accepts_per_hour(
            stream, threshold=threshold, hop_seconds=hop_seconds, refractory_seconds=refractory_seconds, hours=hours
        ),
        "stream_hours": hours,
    }


def sliding_windows(audio: Tensor, *, window_samples: int, hop_samples: int) -> Tensor:
    """Cut [T] audio into [N, window_samples] windows every hop_samples, zero-padding the tail to a whole window."""
    if audio.ndim != 1 or audio.numel() == 0:
        raise ValueError(f"audio must be a non-empty 1-D tensor [T], got shape {tuple(audio.shape)}")
    if window_samples <= 0 or hop_samples <= 0:
        raise ValueError(f"window_samples and hop_samples must be > 0, got {window_samples!r} and {hop_samples!r}")
    import torch.nn.functional as F

    n_windows = 1 + math.ceil(max(audio.numel() - window_samples, 0) / hop_samples)
    padded = F.pad(audio, (0, (n_windows - 1) * hop_samples + window_samples - audio.numel()))  # [T']
    return padded.unfold(0, window_samples, hop_samples)  # [N, window_samples]
