"""Training loops: `fit` distils a student from frozen teachers; `fit_teacher` fine-tunes one teacher.

Neither knows about Ray. `fit(config, report)` calls `report(metrics, checkpoint_dir)` once per epoch: training.record
writes TensorBoard scalars and checkpoints from it, and tuning.trial forwards it to `ray.train.report`. Both loops
share their set-up (`prepare`), their optimizer step (`Stepper`) and their epoch (`train_epoch`); they differ only in
the loss of a batch. When torch.distributed is initialised (Ray Train's DDP workers), each rank trains on its shard
and the metrics are all-reduced first.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kd_tune.audio.features import (CLIP_SECONDS, N_SAMPLES, Augment, LogMel, SpecAugment, front_end, render_view,
                                   samples)
from kd_tune.config import Config, DistillationConfig, TeacherConfig
from kd_tune.datasets.data import WINDOW_KIND, WakewordData, load_data, sample_weights
from kd_tune.errors import ConfigError, InputError, KdTuneError
from kd_tune.progress import progress_bar
from kd_tune.store.checkpoint import Checkpoint
from kd_tune.training.cache import cached_teachers
from kd_tune.training.distill import alpha_at, distillation_loss, temperature_at, weighted_cross_entropy
from kd_tune.training.mining import Miner
from kd_tune.training.models import build_student
from kd_tune.training.resume import TrainState, restore, save_training_checkpoint
from kd_tune.training.scoring import Validation, evaluate, validation_conditions
from kd_tune.training.teachers import Teachers, initial_teacher, save_teacher, teacher_ensemble, teacher_recipe

Report = Callable[[dict[str, float], "Path | None"], None]
# The loss of one batch: (waveforms [B, N_SAMPLES], clip indices [B], view, SpecAugment generator, progress in
# [0, 1]) -> the loss to minimise first, then any parts to average over the epoch.
BatchLoss = Callable[[Tensor, Tensor, int, torch.Generator, float], tuple[Tensor, ...]]
# BatchNorm in train mode needs more than one value per channel: no batch of one clip ever reaches a model.
MIN_TRAIN_BATCH = 2
MIB = 2**20
RU_MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024  # getrusage's unit: bytes on macOS, KiB on Linux


class NonFiniteLossError(KdTuneError, RuntimeError):
    """Raised after `max_nonfinite_steps` consecutive steps with a non-finite loss or gradient."""


class TooFewClipsError(InputError):
    """A training split or batch too small for a training step: refused before training starts."""


@dataclass(frozen=True)
class Setup:
    """What the student and the teacher loop prepare alike, once per run."""

    device: torch.device
    log_mel: LogMel
    augment: Augment | None
    spec_augment: SpecAugment
    audio: Tensor  # [N, N_SAMPLES] training clips, on the device
    labels: Tensor  # [N]
    weights: Tensor  # [N] loss weight per clip: hard negatives count more


# ---------------------------------------------------------------- set-up


def prepare(config: Config, data: WakewordData) -> Setup:
    torch.manual_seed(config.training.seed)
    device = pick_device(config.training.device)
    log_mel, augment, spec_augment = front_end(config, data.train.of_kind("background"), device)
    weights = sample_weights(data.train.kinds, hard_negative_weight=config.data.hard_negative_weight)
    return Setup(device, log_mel, augment, spec_augment, audio=data.train.audio.to(device),
                 labels=data.train.labels.to(device), weights=weights.to(device))


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device", ["'cuda', but no CUDA device is available; allowed: auto, cpu"])
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_batching(n: int, *, workers: int = 1) -> None:
    """Refuse up front a training split that would feed a model a batch of one clip (the config refuses a batch
    size of one)."""
    if n // workers < MIN_TRAIN_BATCH:
        raise TooFewClipsError(f"data.root: the training split has {n} clip(s), {n // workers} per worker over "
                               f"{workers} worker(s); allowed: at least {MIN_TRAIN_BATCH} per worker (add clips)")


def steps_per_epoch(n: int, batch_size: int) -> int:
    return sum(1 for _ in batches(n, batch_size, seed=0, epoch=0))


def batches(n: int, batch_size: int, *, seed: int, epoch: int) -> Iterator[Tensor]:
    """Shuffled index batches, sharded over DDP ranks; the order depends only on (seed, epoch). Whole batches only,
    or every clip of the shard in one batch when it is smaller than a batch; never a batch of one."""
    rank, world = rank_and_world()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    per_rank = n // world  # every rank takes the same number of steps, or DDP's all-reduce would hang
    order = order[rank * per_rank:(rank + 1) * per_rank]
    if per_rank < MIN_TRAIN_BATCH or batch_size < MIN_TRAIN_BATCH:
        return  # check_batching refuses this before training starts
    for start in range(0, per_rank - batch_size + 1 if per_rank >= batch_size else 1, batch_size):
        yield order[start:start + batch_size]


def epoch_pool(is_window: Tensor, per_epoch: int | None, *, seed: int, epoch: int) -> Tensor:
    """The clip indices [M] an epoch trains on: every clip that is not a long window [N], and a fresh share of
    per_epoch long windows, taken in turn from one seeded order so that W / per_epoch epochs read them all."""
    windows = is_window.nonzero().squeeze(1)  # [W]
    if per_epoch is None or per_epoch >= len(windows):
        return torch.arange(len(is_window))
    windows = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))]
    share = windows.roll(-(epoch * per_epoch % len(windows)))[:per_epoch]  # [per_epoch]
    return torch.cat([(~is_window).nonzero().squeeze(1), share]).sort().values


def lr_at(step: int, *, total_steps: int, base_lr: float, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to 10% of base_lr; a pure function of the optimizer step."""
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- one step, one evaluation


def optimizer_step(loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   *, clip: float) -> bool:
    """Backward, clip and step; a non-finite loss or gradient skips the step and returns False."""
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return False
    scaler.step(optimizer)
    scaler.update()
    return True


def guard(ok: bool, state: TrainState, *, limit: int) -> None:
    state.skipped_steps += not ok
    state.consecutive_skips = 0 if ok else state.consecutive_skips + 1
    if state.consecutive_skips >= limit:
        raise NonFiniteLossError(f"stopped at step {state.step}: {limit} consecutive steps had a non-finite loss or "
                                 f"gradient (distillation.max_nonfinite_steps = {limit}); lower training.lr or "
                                 "check the data with `kd-tune data check`")


def probe_batch_size(step: Callable[[int], None], device: torch.device, *, start: int = 4096,
                     smallest: int = 8) -> int:
    """Largest batch whose training step fits in GPU memory, halving on out-of-memory; 64 off the GPU."""
    if device.type != "cuda":
        return 64
    batch = start
    while batch >= smallest:
        try:
            step(batch)
            return batch
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError(f"even a batch of {smallest} does not fit on {device}; set training.batch_size")


def all_reduce_mean(metrics: dict[str, float], *, peak: bool = False) -> dict[str, float]:
    """Average the metrics over DDP ranks (or, with peak, take their maximum), so what rank 0 reports speaks for
    every worker."""
    if rank_and_world()[1] == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX if peak else dist.ReduceOp.SUM)
    return dict(zip(keys, (values if peak else values / dist.get_world_size()).tolist(), strict=True))


def reset_memory_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_metrics(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory so far, and on CUDA the peak allocated and reserved memory since
    reset_memory_peaks (the epoch's start), in MiB."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_BYTES / MIB}
    if device.type == "cuda":
        out |= {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
                "cuda_max_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB}
    return out


def probe_step(student: nn.Module, teachers: Teachers, log_mel: LogMel, batch: int,
               device: torch.device) -> None:
    wave = torch.randn(batch, N_SAMPLES, device=device)  # [B, N_SAMPLES]
    feats = log_mel(wave)  # [B, n_mels, T]
    teachers({"waveform": wave, "features": feats}, view=None, index=torch.zeros(batch, dtype=torch.long))  # any clip
    student(feats).sum().backward()
    student.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- the loops


def distillation_teachers(config: Config, data: WakewordData, device: torch.device) -> Teachers:
    """The live teachers, or their cached logits when distillation.teacher_mode is 'cache'."""
    # Building a teacher module draws initial weights that loading then replaces: forked, so that the student's
    # initialisation and dropout see the same random stream in both modes.
    with torch.random.fork_rng(devices=[]):
        if config.distillation.teacher_mode == "cache":
            return cached_teachers(config, data, device)
        return teacher_ensemble(config, device, data)


def teacher_batch(s: Setup, wave: Tensor, feats: Tensor, idx: Tensor, view: int, *, hears: str,
                  kinds: frozenset[str]) -> tuple[dict[str, Tensor], int | None]:
    """The teachers' inputs for a batch and the view they are of: what the student hears, or the clean clips (their
    log-mels only for teachers that read them)."""
    if hears == "augmented" or s.augment is None:
        return {"waveform": wave, "features": feats}, view
    clean = s.audio[idx]  # [B, N_SAMPLES]
    return {"waveform": clean} | ({"features": s.log_mel(clean)} if "features" in kinds else {}), None


def schedule(d: DistillationConfig, progress: float) -> tuple[float, float]:
    """(alpha, temperature) at a fraction of training."""
    alpha = alpha_at(d.alpha_schedule, progress, alpha_start=d.alpha_start, alpha_end=d.alpha_end,
                     step_points=d.alpha_step_points)
    return alpha, temperature_at(d.temperature_schedule, progress, temperature_start=d.temperature_start,
                                 temperature_end=d.temperature_end)


class Stepper:
    """One optimizer step as both loops take it: AdamW at the step's learning rate (warm-up, then cosine), AMP on
    CUDA, gradient clipping, and the guard that skips non-finite steps and stops after too many in a row."""

    def __init__(self, model: nn.Module, params, *, lr: float, weight_decay: float, total_steps: int,
                 config: Config, device: torch.device):
        t = config.training
        self.model, self.total_steps, self.base_lr = model, total_steps, lr
        self.warmup_fraction, self.clip = t.warmup_fraction, t.grad_clip_norm
        self.limit = config.distillation.max_nonfinite_steps
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.use_amp = t.mixed_precision and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp)

    def __call__(self, loss: Tensor, state: TrainState) -> bool:
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(state.step, total_steps=self.total_steps, base_lr=self.base_lr,
                            warmup_fraction=self.warmup_fraction)
        ok = optimizer_step(loss, self.model, self.optimizer, self.scaler, clip=self.clip)
        guard(ok, state, limit=self.limit)
        state.step += 1
        return ok


def train_epoch(s: Setup, stepper: Stepper, state: TrainState, batch_loss: BatchLoss, *, batch_size: int,
                seed: int, views: int, desc: str, pool: Tensor | None = None) -> list[float]:
    """One pass over the training clips in this epoch's augmentation view (or over the indices `pool` [M] of them);
    returns each loss part's mean over the steps that counted."""
    view = state.epoch % views
    pool = torch.arange(len(s.labels)) if pool is None else pool  # [M]
    wave = render_view(s.audio, s.augment, view=view, seed=seed)  # [N, N_SAMPLES]
    stepper.model.train()
    sums, counted = None, 0
    bar = progress_bar(steps_per_epoch(len(pool), batch_size), desc, "step", enabled=rank_and_world()[0] == 0,
                       iterable=batches(len(pool), batch_size, seed=seed, epoch=state.epoch), leave=False)
    for idx in map(pool.__getitem__, bar):
        generator = torch.Generator(device=s.device).manual_seed(seed * 7919 + state.step)
        parts = batch_loss(wave[idx], idx, view, generator, state.step / stepper.total_steps)
        if stepper(parts[0], state):
            values = torch.tensor([p.item() for p in parts], dtype=torch.float64)
            sums, counted = values if sums is None else sums + values, counted + 1
        bar.set_postfix(loss=f"{parts[0].item():.3f}")
    return [0.0] * len(parts) if sums is None else (sums / counted).tolist()


def fit(config: Config, report: Report, *, data: WakewordData | None = None, resume: Checkpoint | None = None,
        teachers: Teachers | None = None, run_name: str | None = None) -> dict[str, float]:
    """Distil the configured teachers into the configured student; returns the last epoch's metrics.

    run_name: the run or sweep trial every checkpoint is saved for (see kd_tune.store.checkpoint.Identity)."""
    t, d = config.training, config.distillation
    data = data or load_data(config.data)
    rank, world = rank_and_world()
    check_batching(len(data.train.labels), workers=world)
    s = prepare(config, data)
    teachers = teachers or distillation_teachers(config, data, s.device)
    student = build_student(config.student.name, width=config.student.width, n_mels=config.features.n_mels)
    student = student.to(s.device)
    model = DistributedDataParallel(student) if world > 1 else student
    teachers.check_inputs({"waveform": s.audio[:1], "features": s.log_mel(s.audio[:1])})
    batch_size = t.batch_size if t.batch_size != "auto" else probe_batch_size(
        lambda b: probe_step(student, teachers, s.log_mel, b, s.device), s.device)
    is_window = torch.tensor([k == WINDOW_KIND for k in data.train.kinds])  # [N]
    per_epoch = None if t.long_hours_per_epoch is None else round(t.long_hours_per_epoch * 3600 / CLIP_SECONDS)
    total_steps = t.epochs * steps_per_epoch(len(epoch_pool(is_window, per_epoch, seed=t.seed, epoch=0)), batch_size)
    stepper = Stepper(model, student.parameters(), lr=t.lr, weight_decay=t.weight_decay, total_steps=total_steps,
                      config=config, device=s.device)
    state = restore(resume, student, stepper.optimizer) if resume else TrainState()
    long_train = data.train.of_kind(WINDOW_KIND) if t.mined_negatives else s.audio[:0]  # a copy: only to mine
    miner = Miner(long_train.reshape(-1), count=t.mined_negatives, hop_samples=samples(t.eval_hop_ms))
    # the conditions' audio only lives until it is featurized
    validation = Validation.of(data.val, data.val_stream, validation_conditions(data.val), s.log_mel,
                               hop_samples=samples(t.eval_hop_ms), device=s.device)

    def batch_loss(wave: Tensor, idx: Tensor, view: int, generator: torch.Generator, progress: float):
        alpha, temperature = schedule(d, progress)
        feats = s.log_mel(wave)  # [B, n_mels, T]
        heard, heard_view = teacher_batch(s, wave, feats, idx, view, hears=d.teacher_hears,
                                          kinds=teachers.input_kinds)
        teacher_logits = teachers(heard, view=heard_view, index=idx)  # [B, 2]
        mined = miner.batch(state.step, total_steps // t.epochs)  # [M, N_SAMPLES], M = 0 without mining
        feats = torch.cat([feats, s.log_mel(mined)]) if len(mined) else feats  # [B + M, n_mels, T]
        with torch.autocast(s.device.type, enabled=stepper.use_amp):
            logits = model(s.spec_augment(feats, generator=generator))  # [B + M, 2]
        return distillation_loss(logits[:len(idx)], teacher_logits, s.labels[idx], alpha=alpha,
                                 temperature=temperature, sample_weight=s.weights[idx], negatives=logits[len(idx):],
                                 negative_weight=config.data.hard_negative_weight)  # (total, student, distillation)

    metrics: dict[str, float] = {}
    while state.epoch < t.epochs:
        started = time.perf_counter()
        reset_memory_peaks(s.device)
        if miner.enabled:  # the windows the student now gets most wrong
            miner.mine(student, s.log_mel)
        total, student_loss, kd_loss = train_epoch(
            s, stepper, state, batch_loss, batch_size=batch_size, seed=t.seed, views=config.augment.views,
            desc=f"epoch {state.epoch + 1}/{t.epochs}",
            pool=epoch_pool(is_window, per_epoch, seed=t.seed, epoch=state.epoch))
        state.epoch += 1
        alpha, temperature = schedule(d, (state.step - 1) / total_steps)  # as the epoch's last step used them
        metrics = {"total_loss": total, "student_loss": student_loss, "distillation_loss": kd_loss, "alpha": alpha,
                   "temperature": temperature, "lr": stepper.optimizer.param_groups[0]["lr"],
                   "skipped_steps": state.skipped_steps, "epoch_seconds": time.perf_counter() - started,
                   "epoch": state.epoch, "step": state.step}
        validated = time.perf_counter()
        scores = evaluate(student, validation, config)
        scores["validation_seconds"] = time.perf_counter() - validated
        metrics = all_reduce_mean({**metrics, **scores}) | all_reduce_mean(memory_metrics(s.device), peak=True)
        with tempfile.TemporaryDirectory(prefix="kd_tune_ckpt_") as tmp:  # report() copies it before returning
            report(metrics, save_training_checkpoint(Path(tmp), student, stepper.optimizer, state, config, metrics,
                                                     name=run_name)
                   if rank == 0 else None)
    return metrics


def fit_teacher(config: Config, teacher: TeacherConfig, *, data: WakewordData | None = None,
                report: Report | None = None) -> dict[str, float]:
    """Fine-tune one teacher on the labels and save it to <storage>/teachers/<name>; returns its last metrics."""
    config = teacher_recipe(config, teacher)
    t = config.training
    data = data or load_data(config.data)
    labelled = dataclasses.replace(data, train=data.train.labelled())  # a teacher learns from hard labels alone
    check_batching(len(labelled.train.labels))
    s = prepare(config, labelled)
    model = initial_teacher(teacher, n_mels=config.features.n_mels).to(s.device)
    if teacher.freeze_feature_encoder and (freeze := getattr(model, "freeze_feature_encoder", None)) is not None:
        freeze()  # the convolutional encoder of a speech model: fine-tuning it rarely pays
    stepper = Stepper(model, [p for p in model.parameters() if p.requires_grad], lr=teacher.lr,
                      weight_decay=teacher.weight_decay, config=config, device=s.device,
                      total_steps=teacher.epochs * steps_per_epoch(len(s.labels), teacher.batch_size))
    takes_features = model.input_kind == "features"
    validation = Validation.of(data.val, data.val_stream, validation_conditions(data.val),
                               s.log_mel if takes_features else None, hop_samples=samples(t.eval_hop_ms),
                               device=s.device)

    def batch_loss(wave: Tensor, idx: Tensor, view: int, generator: torch.Generator, progress: float):
        x = s.spec_augment(s.log_mel(wave), generator=generator) if takes_features else wave
        with torch.autocast(s.device.type, enabled=stepper.use_amp):
            logits = model(x)  # [B, 2]
        return (weighted_cross_entropy(logits.float(), s.labels[idx], s.weights[idx]),)

    state, metrics = TrainState(), {}
    while state.epoch < teacher.epochs:
        reset_memory_peaks(s.device)
        train_epoch(s, stepper, state, batch_loss, batch_size=teacher.batch_size, seed=t.seed,
                    views=config.augment.views, desc=f"teacher {teacher.name} epoch {state.epoch + 1}/{teacher.epochs}")
        state.epoch += 1
        # the hour-long stream only for the teacher saved (the last epoch): an epoch's report needs no more
        metrics = evaluate(model, validation, config, with_stream=state.epoch == teacher.epochs)
        if report:
            report({**metrics, **memory_metrics(s.device), "epoch": state.epoch}, None)
    save_teacher(config, teacher, model, data, epoch=teacher.epochs, step=state.step, metrics=metrics)
    return metrics
