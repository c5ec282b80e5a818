import numpy as np
import pytest
import torch

from kd_tune.config import ALPHA_SCHEDULES, TEMPERATURE_SCHEDULES
from kd_tune.training.distill import alpha_at, combine_teachers, distillation_loss, temperature_at


def _logits(batch=8, classes=5, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, classes, generator=generator)


def _labels(batch=8, classes=5, seed=0):
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))


def test_kl_of_identical_logits_is_zero():
    # rule: the KD term vanishes when the student matches the teacher
    logits = _logits()
    parts = distillation_loss(logits, logits.clone(), _labels(), alpha=0.5, temperature=3.0)
    assert parts.distillation_loss.abs().item() < 1e-6


def test_loss_matches_explicit_reference():
    # rule: KD = T^2 * mean_b sum_c p_t (log p_t - log p_s); student loss = mean cross-entropy; total mixes by alpha
    student, teacher, labels, temperature, alpha = _logits(seed=1), _logits(scale=3.0, seed=2), _labels(), 4.0, 0.3
    p_teacher = torch.softmax(teacher / temperature, dim=-1)
    p_student = torch.softmax(student / temperature, dim=-1)
    kd = temperature**2 * (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=-1).mean()
    ce = -torch.log_softmax(student, dim=-1)[torch.arange(len(labels)), labels].mean()

    parts = distillation_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(parts.distillation_loss, kd)
    torch.testing.assert_close(parts.student_loss, ce)
    torch.testing.assert_close(parts.total, (1 - alpha) * ce + alpha * kd)


def test_alpha_endpoints_select_one_term():
    # rule: alpha is the KD weight: alpha=0 is pure cross-entropy, alpha=1 pure distillation
    student, teacher, labels = _logits(seed=1), _logits(seed=2), _labels()
    hard = distillation_loss(student, teacher, labels, alpha=0.0, temperature=2.0)
    soft = distillation_loss(student, teacher, labels, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(hard.total, hard.student_loss)
    torch.testing.assert_close(soft.total, soft.distillation_loss)


def test_unit_sample_weight_equals_unweighted():
    # rule: all-ones sample_weight is the plain mean
    student, teacher, labels = _logits(seed=1), _logits(seed=2), _labels()
    plain = distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0)
    weighted = distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0, sample_weight=torch.ones(8))
    torch.testing.assert_close(weighted.total, plain.total)


def test_weight_two_equals_duplicating_the_sample():
    # rule: the student loss is sum(w * ce) / sum(w), so weight 2 counts a sample twice
    student, teacher, labels = _logits(seed=1), _logits(seed=2), _labels()
    weight = torch.ones(8)
    weight[3] = 2.0
    weighted = distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0, sample_weight=weight)
    order = torch.cat([torch.arange(8), torch.tensor([3])])
    duplicated = distillation_loss(student[order], teacher[order], labels[order], alpha=0.5, temperature=2.0)
    torch.testing.assert_close(weighted.student_loss, duplicated.student_loss)



def test_unlabelled_clips_add_to_the_kd_term_alone():
    # Rule: a clip labelled < 0 (a straddle window) adds nothing to the cross-entropy, weighted or not, and counts in
    # the KD term like any clip; a batch of unlabelled clips has a student loss of 0, not nan.
    student, teacher, labels = _logits(seed=1), _logits(seed=2), _labels()
    weight = torch.linspace(0.5, 2.0, 8)
    unlabelled = labels.clone()
    unlabelled[[1, 5]] = -1
    keep = unlabelled >= 0
    parts = distillation_loss(student, teacher, unlabelled, alpha=0.5, temperature=2.0, sample_weight=weight)
    labelled_only = distillation_loss(student[keep], teacher[keep], labels[keep], alpha=0.5, temperature=2.0,
                                      sample_weight=weight[keep])
    every_clip = distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0)
    torch.testing.assert_close(parts.student_loss, labelled_only.student_loss)
    torch.testing.assert_close(parts.distillation_loss, every_clip.distillation_loss)
    assert not torch.allclose(parts.distillation_loss, labelled_only.distillation_loss)
    none = distillation_loss(student, teacher, torch.full((8,), -1), alpha=0.5, temperature=2.0)
    assert none.student_loss.item() == 0.0 and torch.isfinite(none.total)
    unlabelled[1] = -2  # only UNLABELLED is skipped: any other label out of range is still an error
    with pytest.raises(IndexError, match="-2"):
        distillation_loss(student, teacher, unlabelled, alpha=0.5, temperature=2.0)


def test_t_squared_keeps_gradient_scale_for_large_temperature():
    # rule: the T^2 factor makes the KD gradient w.r.t. student logits roughly independent of T
    teacher = _logits(scale=0.5, seed=2)
    norms = []
    for temperature in (4.0, 16.0):
        student = _logits(scale=0.5, seed=1).requires_grad_()
        distillation_loss(student, teacher, _labels(), alpha=1.0, temperature=temperature).total.backward()
        norms.append(student.grad.norm().item())
    assert 1 / 1.5 < norms[0] / norms[1] < 1.5


def test_teacher_gets_no_gradient():
    # rule: teacher logits are detached inside the loss
    student, teacher = _logits(seed=1).requires_grad_(), _logits(seed=2).requires_grad_()
    distillation_loss(student, teacher, _labels(), alpha=0.7, temperature=2.0).total.backward()
    assert teacher.grad is None
    assert student.grad is not None


@pytest.mark.parametrize(
    "alpha, temperature, bad",
    [(1.5, 2.0, "1.5"), (-0.1, 2.0, "-0.1"), (float("nan"), 2.0, "nan"), (0.5, 0.0, "0.0"), (0.5, -3.0, "-3.0")],
)
def test_invalid_alpha_or_temperature_names_the_value(alpha, temperature, bad):
    # rule: alpha in [0, 1] and temperature > 0, errors name the bad value
    with pytest.raises(ValueError, match=bad):
        distillation_loss(_logits(), _logits(), _labels(), alpha=alpha, temperature=temperature)


def test_half_precision_inputs_give_finite_float32_outputs():
    # rule: the loss is computed in float32, so fp16/bf16 logits (even large ones) are safe
    student = (_logits(seed=1) * 1000).half().requires_grad_()
    teacher = (_logits(seed=2) * 1000).bfloat16()
    parts = distillation_loss(student, teacher, _labels(), alpha=0.5, temperature=2.0)
    parts.total.backward()
    for value in parts:
        assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(student.grad).all()


RAMPS = [("linear", {}), ("cosine", {}), ("step", {"step_points": (0.3, 0.6)})]


@pytest.mark.parametrize("schedule, extra", RAMPS)
@pytest.mark.parametrize("start, end", [(0.1, 0.9), (0.9, 0.1)])
def test_alpha_schedule_endpoints_and_monotonic(schedule, extra, start, end):
    # rule: ramps go from alpha_start at progress 0 to alpha_end at 1, monotonically in either direction
    values = [alpha_at(schedule, p, alpha_start=start, alpha_end=end, **extra) for p in np.linspace(0, 1, 101)]
    assert values[0] == pytest.approx(start) and values[-1] == pytest.approx(end)
    steps = np.diff(values) * np.sign(end - start)
    assert (steps >= -1e-12).all()


def test_constant_alpha_ignores_end_and_progress():
    # rule: the constant schedule always returns alpha_start
    assert {alpha_at("constant", p, alpha_start=0.4, alpha_end=0.9) for p in (0.0, 0.5, 1.0)} == {0.4}


def test_step_schedule_jumps_at_configured_points():
    # rule: step moves alpha by equal steps exactly at each step point
    def alpha(p):
        return alpha_at("step", p, alpha_start=0.0, alpha_end=1.0, step_points=(0.25, 0.75))

    assert [alpha(p) for p in (0.0, 0.2499, 0.25, 0.7499, 0.75, 1.0)] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("points", [(), (0.6, 0.3), (0.0, 0.5), (0.5, 1.0)])
def test_step_points_validated(points):
    # rule: step points must be a non-empty sorted sequence inside (0, 1)
    with pytest.raises(ValueError, match="step_points"):
        alpha_at("step", 0.5, alpha_start=0.0, alpha_end=1.0, step_points=points)


@pytest.mark.parametrize("schedule", ALPHA_SCHEDULES)
def test_alpha_progress_is_clamped(schedule):
    # rule: progress outside [0, 1] is clamped
    def alpha(p):
        return alpha_at(schedule, p, alpha_start=0.2, alpha_end=0.8)

    assert alpha(-0.5) == alpha(0.0) and alpha(1.7) == alpha(1.0)


@pytest.mark.parametrize("schedule", TEMPERATURE_SCHEDULES)
def test_temperature_schedule_endpoints_clamping_and_decay(schedule):
    # rule: temperature goes from start to end (constant stays at start), monotonically, with clamped progress
    values = [temperature_at(schedule, p, temperature_start=8.0, temperature_end=2.0) for p in np.linspace(0, 1, 51)]
    assert values[0] == 8.0 and values[-1] == pytest.approx(2.0 if schedule != "constant" else 8.0)
    assert (np.diff(values) <= 1e-12).all()
    assert temperature_at(schedule, 3.0, temperature_start=8.0, temperature_end=2.0) == values[-1]


def test_unknown_schedule_lists_allowed():
    # rule: unknown names raise an error listing the known ones
    with pytest.raises(ValueError, match="constant, linear, cosine, step"):
        alpha_at("exponential", 0.5, alpha_start=0.0, alpha_end=1.0)
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        temperature_at("step", 0.5, temperature_start=4.0, temperature_end=1.0)


def test_combine_mean_is_the_mean_of_logits():
    # rule: "mean" averages the teachers' logits; a list and a stacked tensor give the same result
    teachers = [_logits(seed=s) for s in range(3)]
    expected = (teachers[0] + teachers[1] + teachers[2]) / 3
    torch.testing.assert_close(combine_teachers(teachers), expected)
    torch.testing.assert_close(combine_teachers(torch.stack(teachers)), expected)


def test_combine_confidence_favours_the_confident_teacher():
    # rule: "confidence" weighs each teacher by inverse entropy, so a sharp teacher dominates an unsure one
    confident = torch.tensor([[6.0, -6.0]])
    unsure = torch.tensor([[0.1, -0.1]])
    combined = combine_teachers([confident, unsure], method="confidence")
    mean = combine_teachers([confident, unsure], method="mean")
    assert (combined - confident).abs().sum() < (combined - unsure).abs().sum()
    assert combined[0, 0] > mean[0, 0]


@pytest.mark.parametrize("method", ["mean", "confidence"])
def test_combining_identical_teachers_returns_that_teacher(method):
    # rule: an ensemble of copies of one teacher is that teacher
    teacher = _logits()
    torch.testing.assert_close(combine_teachers([teacher, teacher.clone(), teacher.clone()], method=method), teacher)


def test_unknown_combination_lists_allowed():
    # rule: unknown names raise an error listing the known ones
    with pytest.raises(ValueError, match="mean, confidence"):
        combine_teachers([_logits()], method="vote")
