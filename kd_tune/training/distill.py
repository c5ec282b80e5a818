"""Knowledge-distillation loss, alpha/temperature schedules and teacher ensembling: pure tensor functions."""

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_tune.config import ALPHA_SCHEDULES, TEACHER_COMBINATIONS, TEMPERATURE_SCHEDULES
from kd_tune.datasets.data import UNLABELLED


class LossParts(NamedTuple):
    total: Tensor  # scalar, the one to backpropagate
    student_loss: Tensor  # scalar, cross-entropy on the hard labels
    distillation_loss: Tensor  # scalar, T^2-scaled KL to the teacher


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    temperature: float,
    sample_weight: Tensor | None = None,
    negatives: Tensor | None = None,
    negative_weight: float = 1.0,
) -> LossParts:
    """Hinton-style KD loss: total = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T).

    alpha is the weight of the distillation term (alpha=1: teacher only). torchdistill's KDLoss uses the opposite
    convention (its alpha weighs the hard-label term). sample_weight [B] weighs the cross-entropy only; the KD term is
    a plain batch mean, over clips labelled UNLABELLED too: the teacher is their only label. negatives [M, C] are
    student logits of windows known to be negatives that have no teacher output (kd_tune.training.mining): they join the
    cross-entropy with label 0 and weight negative_weight. Everything is computed in float32, so fp16/bf16 logits are
    safe; the teacher gets no gradient.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student and teacher logits must both be [B, C], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    student_logits = student_logits.float()  # [B, C]
    teacher_logits = teacher_logits.detach().float()  # [B, C]

    student_loss = weighted_cross_entropy(*with_negatives(student_logits, labels, sample_weight, negatives,
                                                          weight=negative_weight))
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)  # [B, C]
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)  # [B, C]
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=-1)  # [B]
    # T^2 keeps the soft-target gradients on the same scale as the hard-label ones when T changes (Hinton et al.)
    kd_loss = temperature**2 * kl.mean()

    total = (1.0 - alpha) * student_loss + alpha * kd_loss
    return LossParts(total, student_loss, kd_loss)


def with_negatives(logits: Tensor, labels: Tensor, sample_weight: Tensor | None, negatives: Tensor | None, *,
                   weight: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logits [B + M, C], labels [B + M], weights [B + M] or None) with negatives [M, C] appended as label 0."""
    if negatives is None or not len(negatives):
        return logits, labels, sample_weight
    if negatives.ndim != 2 or negatives.shape[1] != logits.shape[1]:
        raise ValueError(f"negatives must be [M, {logits.shape[1]}], got {tuple(negatives.shape)}")
    own = torch.ones(len(logits), device=logits.device) if sample_weight is None else sample_weight.float()
    return (torch.cat([logits.float(), negatives.float()]), torch.cat([labels, labels.new_zeros(len(negatives))]),
            torch.cat([own, own.new_full((len(negatives),), float(weight))]))


def weighted_cross_entropy(logits: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """Cross-entropy [B, C] x [B] -> scalar, as sum(w_i * ce_i) / sum(w_i) over the labelled clips (label not
    UNLABELLED); a plain mean over them without weights, and 0 for a batch with none."""
    labelled = labels != UNLABELLED  # [B]
    # any other label out of range still fails in cross_entropy
    cross_entropy = F.cross_entropy(logits.float(), labels.masked_fill(~labelled, 0), reduction="none")  # [B]
    if sample_weight is not None and sample_weight.shape != cross_entropy.shape:
        raise ValueError(f"sample_weight must be [B] = {tuple(cross_entropy.shape)}, got {tuple(sample_weight.shape)}")
    weight = labelled.float() if sample_weight is None else sample_weight.float() * labelled  # [B]
    return (weight * cross_entropy).sum() / weight.sum().clamp(min=torch.finfo().tiny)


def _clamp_progress(progress: float) -> float:
    if math.isnan(progress):
        raise ValueError("progress must be a number in [0, 1], got nan")
    return min(max(float(progress), 0.0), 1.0)


def _ramp(schedule: str, progress: float, start: float, end: float) -> float:
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    # "cosine": half-cosine, flat at both ends
    return start + (end - start) * (1.0 - math.cos(math.pi * progress)) / 2.0


def alpha_at(
    schedule: str,
    progress: float,
    *,
    alpha_start: float,
    alpha_end: float,
    step_points: Sequence[float] = (0.5,),
) -> float:
    """KD weight at progress = global_step / total_steps (clamped to [0, 1]).

    "step" moves alpha by (alpha_end - alpha_start) / len(step_points) at each point of step_points, so it reaches
    alpha_end once progress passes the last point. Every schedule but "constant" returns alpha_end at progress 1.
    """
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"unknown alpha schedule {schedule!r}; allowed: {', '.join(ALPHA_SCHEDULES)}")
    progress = _clamp_progress(progress)
    if schedule != "step":
        return _ramp(schedule, progress, alpha_start, alpha_end)
    points = list(step_points)
    if not points or points != sorted(points) or not all(0.0 < p < 1.0 for p in points):
        raise ValueError(f"step_points must be a non-empty sorted list of values in (0, 1), got {step_points!r}")
    steps_taken = sum(progress >= p for p in points)
    return alpha_start + (alpha_end - alpha_start) * steps_taken / len(points)


def temperature_at(schedule: str, progress: float, *, temperature_start: float, temperature_end: float) -> float:
    """Temperature at progress = global_step / total_steps (clamped to [0, 1]); usually decays from soft to sharp."""
    if schedule not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"unknown temperature schedule {schedule!r}; allowed: {', '.join(TEMPERATURE_SCHEDULES)}")
    return _ramp(schedule, _clamp_progress(progress), temperature_start, temperature_end)


def combine_teachers(
    teacher_logits: Sequence[Tensor] | Tensor, *, method: str = "mean", eps: float = 1e-6
) -> Tensor:
    """Merge K teachers' logits ([K, B, C] or a list of [B, C]) into one [B, C] float32 target.

    Logits are averaged, not probabilities: the result is a normalised geometric mean of the teachers' distributions
    and stays a logit tensor, so distillation_loss applies the temperature once, to the ensemble.
    "confidence" weighs teacher k on sample i by 1 / (entropy of its softmax + eps), normalised over teachers.
    """
    if method not in TEACHER_COMBINATIONS:
        raise ValueError(f"unknown teacher combination {method!r}; allowed: {', '.join(TEACHER_COMBINATIONS)}")
    logits = teacher_logits if isinstance(teacher_logits, Tensor) else torch.stack(list(teacher_logits))
    if logits.ndim != 3 or logits.shape[0] == 0:
        raise ValueError(f"teacher logits must be [K, B, C] with K >= 1, got shape {tuple(logits.shape)}")
    logits = logits.detach().float()  # [K, B, C]
    if method == "mean":
        return logits.mean(dim=0)
    log_p = F.log_softmax(logits, dim=-1)  # [K, B, C]
    entropy = -(log_p.exp() * log_p).sum(dim=-1)  # [K, B]
    weight = 1.0 / (entropy + eps)  # [K, B]
    weight = weight / weight.sum(dim=0, keepdim=True)
    return (weight.unsqueeze(-1) * logits).sum(dim=0)  # [B, C]
