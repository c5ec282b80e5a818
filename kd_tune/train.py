"""Training loops: `fit` distils a student from frozen teachers; `fit_teacher` fine-tunes one teacher.

Neither knows about Ray. `fit(config, report)` calls `report(metrics, checkpoint_dir)` once per epoch; the command
line writes TensorBoard scalars from it and the Tune layer forwards it to `ray.train.report`. When torch.distributed
is initialised (Ray Train's DDP workers), each rank trains on its shard and the metrics are all-reduced first.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kd_tune import storage
from kd_tune.config import Config, TeacherConfig, dump_config
from kd_tune.data import Split, WakewordData, load_dataset, sample_weights
from kd_tune.distill import alpha_at, combine_teachers, distillation_loss, temperature_at, weighted_cross_entropy
from kd_tune.features import SAMPLE_RATE, N_SAMPLES, Augment, LogMel, SpecAugment
from kd_tune.metrics import sliding_windows, wakeword_metrics
from kd_tune.models import build_student, build_teacher, count_parameters, hf_config, teacher_input_kind

Report = Callable[[dict[str, float], "Path | None"], None]
# Validation batch. Ray Train runs the loop in a thread, and there, with 256 (or 128) windows a batch, validation
# ran ~17% slower than in a main thread (glibc serves a thread's large allocations from bounded heaps, most likely
# mapped and unmapped again); with 64 it ran as fast as in the main thread, and faster in both. Measured on CPU.
EVAL_BATCH = 64
VIEW_CHUNK = 256  # fixed, so a seeded augmentation view is the same whatever the batch size


class NonFiniteLossError(RuntimeError):
    """Raised after `max_nonfinite_steps` consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0  # non-finite steps skipped so far
    consecutive_skips: int = 0


# ---------------------------------------------------------------- set-up


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but no CUDA device is available (allowed: auto, cpu)")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def front_end(config: Config, data: WakewordData, device: torch.device) -> tuple[LogMel, Augment | None, SpecAugment]:
    f, a = config.features, config.augment
    log_mel = LogMel(n_mels=f.n_mels, window_ms=f.window_ms, hop_ms=f.hop_ms).to(device)
    background = data.train.audio[[k == "background" for k in data.train.kinds]]  # [N_bg, N_SAMPLES]
    augment = Augment(time_shift_ms=a.time_shift_ms, gain_db=a.gain_db, noise_prob=a.noise_prob,
                      snr_db_min=a.snr_db_min, snr_db_max=a.snr_db_max, reverb_prob=a.reverb_prob,
                      noise_bank=background, rir_seed=config.training.seed).to(device) if a.enabled else None
    spec_augment = SpecAugment(freq_mask_bins=a.freq_mask_bins if a.enabled else 0,
                               time_mask_frames=a.time_mask_frames if a.enabled else 0)
    return log_mel, augment, spec_augment


@torch.no_grad()
def render_view(audio: Tensor, augment: Augment | None, *, view: int, seed: int) -> Tensor:
    """Augmented copy number `view` of every clip [N, N_SAMPLES]; the same (seed, view) always gives the same audio."""
    if augment is None:
        return audio
    chunks = []
    for start in range(0, len(audio), VIEW_CHUNK):
        # A CPU generator draws the same numbers on every device, so a view rendered on a GPU worker and in the
        # teacher-output cache (possibly on another machine) is the same audio.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + view * 10_007 + start)
        chunks.append(augment(audio[start:start + VIEW_CHUNK], generator=generator))
    return torch.cat(chunks)


def batches(n: int, batch_size: int, *, seed: int, epoch: int) -> Iterator[Tensor]:
    """Shuffled index batches, sharded over DDP ranks; the order depends only on (seed, epoch)."""
    rank, world = rank_and_world()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    per_rank = n // world  # every rank takes the same number of steps, or DDP's all-reduce would hang
    order = order[rank * per_rank:(rank + 1) * per_rank]
    for start in range(0, per_rank - batch_size + 1 if per_rank >= batch_size else 1, batch_size):
        yield order[start:start + batch_size]


def lr_at(step: int, *, total_steps: int, base_lr: float, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to 10% of base_lr; a pure function of the optimizer step."""
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- teachers


class TeacherEnsemble(nn.Module):
    """Frozen teachers in eval mode; each takes the input it declares, checked once at set-up."""

    def __init__(self, teachers: dict[str, nn.Module], *, combine: str, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.teachers = nn.ModuleDict(teachers).eval().requires_grad_(False)
        self.combine, self.device, self.dtype = combine, device, dtype
        self.to(device=device, dtype=dtype)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)  # teachers stay in eval mode: no dropout, no BatchNorm statistics updates

    @torch.no_grad()
    def forward(self, inputs: dict[str, Tensor], *, view: int | None = None, index: Tensor | None = None) -> Tensor:
        """Combined logits [B, 2] of the live teachers; view and index serve the cached alternative only."""
        logits = []
        for name, teacher in self.teachers.items():
            x = inputs[teacher.input_kind].to(self.device, self.dtype)  # [B, N_SAMPLES] or [B, n_mels, T]
            logits.append(teacher(x).float())  # [B, 2]
        out = logits[0] if len(logits) == 1 else combine_teachers(logits, method=self.combine)
        return out.to(next(iter(inputs.values())).device)

    def check_inputs(self, inputs: dict[str, Tensor]) -> None:
        """Fail at set-up, naming the teacher, when it cannot take the input this run would give it."""
        for name, teacher in self.teachers.items():
            kind = teacher_input_kind(teacher)
            if kind not in inputs:
                raise ValueError(f"teacher {name!r} takes {kind} input, but this run provides only "
                                 f"{' and '.join(sorted(inputs))}")
            x = inputs[kind][:1].to(self.device, self.dtype)  # as forward() feeds it: half-precision teachers too
            try:
                out = teacher(x)  # one probe forward: a wrong shape fails here, not mid-epoch
            except RuntimeError as e:
                raise ValueError(f"teacher {name!r} cannot take {kind} input of shape {tuple(x.shape)}: {e}") from e
            if out.shape != (1, 2):
                raise ValueError(f"teacher {name!r} returned logits of shape {tuple(out.shape)} (expected [B, 2])")


def teacher_checkpoint_dir(name: str) -> str:
    return f"teachers/{name}"


def load_teacher(config: Config, teacher: TeacherConfig) -> nn.Module:
    """A fine-tuned teacher from the storage root, verified before any weight is used."""
    store = storage.Storage.from_config(config.storage)
    ckpt = storage.load_checkpoint(store, teacher_checkpoint_dir(teacher.name))
    model = build_teacher(teacher.arch, source=teacher.source, n_mels=config.features.n_mels,
                          hf_config=ckpt.manifest["extra"].get("hf_config"))
    storage.load_state_dict_strict(model, ckpt.tensors["model"])
    return model


def teacher_ensemble(config: Config, device: torch.device) -> TeacherEnsemble:
    d = config.distillation
    on = torch.device("cpu") if d.teacher_device == "cpu" else device
    dtype = getattr(torch, d.teacher_dtype) if on.type == "cuda" else torch.float32  # half precision only pays on CUDA
    teachers = {t.name: load_teacher(config, t) for t in config.distill_teachers}
    return TeacherEnsemble(teachers, combine=d.combine, device=on, dtype=dtype)


def distillation_teachers(config: Config, data: WakewordData, device: torch.device) -> nn.Module:
    """The live teachers, or their cached logits when distillation.teacher_mode is 'cache'."""
    # Building a teacher module draws initial weights that loading then replaces: forked, so that the student's
    # initialisation and dropout see the same random stream in both modes.
    with torch.random.fork_rng(devices=[]):
        if config.distillation.teacher_mode == "cache":
            from kd_tune.cache import cached_teachers  # kd_tune.cache builds on this module: imported here, not above

            return cached_teachers(config, data, device)
        return teacher_ensemble(config, device)


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


@torch.no_grad()
def predict(model: nn.Module, audio: Tensor, log_mel: LogMel | None) -> Tensor:
    """Wake-word probability per clip [N] for audio [N, N_SAMPLES]; log_mel=None feeds raw audio."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for chunk in audio.split(EVAL_BATCH):
        x = chunk.to(device)
        out.append(model(log_mel(x) if log_mel is not None else x).float().softmax(-1)[:, 1].cpu())
    return torch.cat(out)


def evaluate(model: nn.Module, split: Split, stream: Tensor, config: Config, log_mel: LogMel | None) -> dict:
    t = config.training
    hop_samples = round(t.eval_hop_ms * SAMPLE_RATE / 1000)
    windows = sliding_windows(stream, window_samples=N_SAMPLES, hop_samples=hop_samples)  # [W, N_SAMPLES]
    return wakeword_metrics(predict(model, split.audio, log_mel), split.labels, predict(model, windows, log_mel),
                            hop_seconds=hop_samples / SAMPLE_RATE, target_fa_per_hour=t.target_fa_per_hour,
                            refractory_seconds=t.refractory_seconds)


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


def all_reduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Average the metrics over DDP ranks, so what rank 0 reports speaks for every worker."""
    if rank_and_world()[1] == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))


def probe_step(student: nn.Module, teachers: TeacherEnsemble, log_mel: LogMel, batch: int,
               device: torch.device) -> None:
    wave = torch.randn(batch, N_SAMPLES, device=device)  # [B, N_SAMPLES]
    feats = log_mel(wave)  # [B, n_mels, T]
    teachers({"waveform": wave, "features": feats}, view=None, index=torch.zeros(batch, dtype=torch.long))  # any clip
    student(feats).sum().backward()
    student.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- checkpoints


def save_training_checkpoint(parent: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                             state: TrainState, config: Config, metrics: dict) -> Path:
    """Student, optimizer tensors and RNG state as safetensors; everything else as JSON. No pickle."""
    opt_tensors, opt_json = storage.optimizer_to_safe(optimizer.state_dict())
    storage.save_checkpoint(parent, "checkpoint", {"model": student.state_dict(), "optimizer": opt_tensors,
                                             "rng": {"torch": torch.get_rng_state()}},
                            kind="student", config=config.to_dict(), epoch=state.epoch, step=state.step,
                            metrics=metrics, extra={"optimizer": opt_json, "skipped_steps": state.skipped_steps,
                                                    "student": config.student.model_dump()})
    return parent / "checkpoint"


def restore(checkpoint: storage.Checkpoint, student: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    storage.load_state_dict_strict(student, checkpoint.tensors["model"])
    optimizer.load_state_dict(storage.optimizer_from_safe(checkpoint.tensors["optimizer"],
                                                          checkpoint.manifest["extra"]["optimizer"]))
    torch.set_rng_state(checkpoint.tensors["rng"]["torch"])
    m = checkpoint.manifest
    return TrainState(step=m["step"], epoch=m["epoch"], skipped_steps=m["extra"]["skipped_steps"])


# ---------------------------------------------------------------- the loop


def fit(config: Config, report: Report, *, data: WakewordData | None = None,
        resume: storage.Checkpoint | None = None, teachers: TeacherEnsemble | None = None) -> dict[str, float]:
    """Distil the configured teachers into the configured student; returns the last epoch's metrics."""
    t, d = config.training, config.distillation
    torch.manual_seed(t.seed)
    device, (rank, world) = pick_device(t.device), rank_and_world()
    data = data or load_dataset(config.data.root)
    log_mel, augment, spec_augment = front_end(config, data, device)
    teachers = teachers or distillation_teachers(config, data, device)
    student = build_student(config.student.name, width=config.student.width, n_mels=config.features.n_mels).to(device)
    model = DistributedDataParallel(student) if world > 1 else student
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    use_amp = t.mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    state = restore(resume, student, optimizer) if resume else TrainState()

    train_audio = data.train.audio.to(device)  # [N, N_SAMPLES]
    labels = data.train.labels.to(device)  # [N]
    weights = sample_weights(data.train.kinds, hard_negative_weight=config.data.hard_negative_weight).to(device)
    teachers.check_inputs({"waveform": train_audio[:1], "features": log_mel(train_audio[:1])})
    batch_size = t.batch_size if t.batch_size != "auto" else probe_batch_size(
        lambda b: probe_step(student, teachers, log_mel, b, device), device)
    steps_per_epoch = len(list(batches(len(labels), batch_size, seed=t.seed, epoch=0)))
    total_steps = t.epochs * steps_per_epoch
    stream = data.negative_stream("val")

    metrics: dict[str, float] = {}
    while state.epoch < t.epochs:
        view = state.epoch % config.augment.views
        wave = render_view(train_audio, augment, view=view, seed=t.seed)  # [N, N_SAMPLES]
        model.train()
        sums, started = torch.zeros(4, dtype=torch.float64), time.perf_counter()  # total, student, kd, steps
        bar = tqdm(batches(len(labels), batch_size, seed=t.seed, epoch=state.epoch), total=steps_per_epoch,
                   desc=f"epoch {state.epoch + 1}/{t.epochs}", disable=rank != 0, leave=False)
        for idx in bar:
            progress = state.step / total_steps
            alpha = alpha_at(d.alpha_schedule, progress, alpha_start=d.alpha_start, alpha_end=d.alpha_end,
                             step_points=d.alpha_step_points)
            temperature = temperature_at(d.temperature_schedule, progress, temperature_start=d.temperature_start,
                                         temperature_end=d.temperature_end)
            feats = log_mel(wave[idx])  # [B, n_mels, T]
            teacher_logits = teachers({"waveform": wave[idx], "features": feats}, view=view, index=idx)  # [B, 2]
            generator = torch.Generator(device=device).manual_seed(t.seed * 7919 + state.step)
            with torch.autocast(device.type, enabled=use_amp):
                student_logits = model(spec_augment(feats, generator=generator))  # [B, 2]
            parts = distillation_loss(student_logits, teacher_logits, labels[idx], alpha=alpha,
                                      temperature=temperature, sample_weight=weights[idx])
            for g in optimizer.param_groups:
                g["lr"] = lr_at(state.step, total_steps=total_steps, base_lr=t.lr, warmup_fraction=t.warmup_fraction)
            ok = optimizer_step(parts.total, model, optimizer, scaler, clip=t.grad_clip_norm)
            guard(ok, state, limit=d.max_nonfinite_steps)
            if ok:
                sums += torch.tensor([*(p.item() for p in parts), 1.0], dtype=torch.float64)
            state.step += 1
            bar.set_postfix(loss=f"{parts.total.item():.3f}", alpha=f"{alpha:.2f}", T=f"{temperature:.2f}")
        state.epoch += 1
        total, student_loss, kd_loss = (sums[:3] / sums[3].clamp(min=1)).tolist()
        metrics = {"total_loss": total, "student_loss": student_loss, "distillation_loss": kd_loss,
                   "alpha": alpha, "temperature": temperature,
                   "lr": optimizer.param_groups[0]["lr"], "skipped_steps": state.skipped_steps,
                   "epoch_seconds": time.perf_counter() - started, "epoch": state.epoch, "step": state.step}
        metrics = all_reduce_mean({**metrics, **evaluate(student, data.val, stream, config, log_mel)})
        with tempfile.TemporaryDirectory(prefix="kd_tune_ckpt_") as tmp:  # report() copies it before returning
            report(metrics, save_training_checkpoint(Path(tmp), student, optimizer, state, config, metrics)
                   if rank == 0 else None)
    return metrics


def teacher_is_current(config: Config, teacher: TeacherConfig, data: WakewordData) -> bool:
    """True when the stored teacher was fine-tuned with these settings on this exact data (and verifies)."""
    store = storage.Storage.from_config(config.storage)
    try:
        extra = storage.verify_checkpoint(store, teacher_checkpoint_dir(teacher.name))["extra"]
    except (storage.CheckpointError, FileNotFoundError):
        return False
    if extra.get("teacher") != teacher.model_dump() or extra.get("data_sha256") != data.manifest_sha256:
        return False
    # The same settings can still mean another architecture after an upgrade: compare the parameter counts.
    return extra.get("parameters") == count_parameters(build_teacher(teacher.arch, source=teacher.source,
                                                                      n_mels=config.features.n_mels,
                                                                      hf_config=extra.get("hf_config")))


def fit_teacher(config: Config, teacher: TeacherConfig, *, data: WakewordData | None = None,
                report: Report | None = None) -> dict[str, float]:
    """Fine-tune one teacher on the labels and save it to <storage>/teachers/<name>; returns its last metrics."""
    t = config.training
    torch.manual_seed(t.seed)
    device = pick_device(t.device)
    data = data or load_dataset(config.data.root)
    log_mel, augment, spec_augment = front_end(config, data, device)
    model = build_teacher(teacher.arch, source=teacher.source, n_mels=config.features.n_mels).to(device)
    if teacher.freeze_feature_encoder and hasattr(model, "freeze_feature_encoder"):
        model.freeze_feature_encoder()  # the convolutional encoder of a speech model: fine-tuning it rarely pays
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=teacher.lr,
                                  weight_decay=teacher.weight_decay)
    use_amp = t.mixed_precision and device.type == "cuda"
    scaler, state = torch.amp.GradScaler(device.type, enabled=use_amp), TrainState()
    train_audio, labels = data.train.audio.to(device), data.train.labels.to(device)  # [N, N_SAMPLES], [N]
    weights = sample_weights(data.train.kinds, hard_negative_weight=config.data.hard_negative_weight).to(device)
    steps_per_epoch = len(list(batches(len(labels), teacher.batch_size, seed=t.seed, epoch=0)))
    stream, metrics = data.negative_stream("val"), {}
    for epoch in range(teacher.epochs):
        wave = render_view(train_audio, augment, view=epoch % config.augment.views, seed=t.seed)  # [N, N_SAMPLES]
        model.train()
        for idx in tqdm(batches(len(labels), teacher.batch_size, seed=t.seed, epoch=epoch), total=steps_per_epoch,
                        desc=f"teacher {teacher.name} epoch {epoch + 1}/{teacher.epochs}", leave=False):
            generator = torch.Generator(device=device).manual_seed(t.seed * 7919 + state.step)
            x = wave[idx] if model.input_kind == "waveform" else spec_augment(log_mel(wave[idx]), generator=generator)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(x)  # [B, 2]
            loss = weighted_cross_entropy(logits.float(), labels[idx], weights[idx])
            for g in optimizer.param_groups:
                g["lr"] = lr_at(state.step, total_steps=teacher.epochs * steps_per_epoch, base_lr=teacher.lr,
                                warmup_fraction=t.warmup_fraction)
            guard(optimizer_step(loss, model, optimizer, scaler, clip=t.grad_clip_norm), state,
                  limit=config.distillation.max_nonfinite_steps)
            state.step += 1
        metrics = evaluate(model, data.val, stream, config, log_mel if model.input_kind == "features" else None)
        if report:
            report({**metrics, "epoch": epoch + 1}, None)
    store = storage.Storage.from_config(config.storage)
    storage.save_checkpoint(store, teacher_checkpoint_dir(teacher.name), {"model": model.state_dict()},
                            kind="teacher", config=config.to_dict(), epoch=teacher.epochs, step=state.step,
                            metrics=metrics, extra={"teacher": teacher.model_dump(), "hf_config": hf_config(model),
                                                    "parameters": count_parameters(model),
                                                    "data_sha256": data.manifest_sha256})
    return metrics


# ---------------------------------------------------------------- `kd-tune train`: TensorBoard and checkpoints

SCALAR_TAGS = {"total_loss": "loss/total", "student_loss": "loss/student", "distillation_loss": "loss/distillation",
               "alpha": "schedule/alpha", "temperature": "schedule/temperature", "lr": "schedule/lr",
               "skipped_steps": "guard/skipped_steps", "epoch_seconds": "time/epoch_seconds"}


def scalar_tag(metric: str) -> str:
    return SCALAR_TAGS.get(metric, f"val/{metric}")


class RunRecorder:
    """Per epoch: TensorBoard scalars, a verified copy of the checkpoint on storage, and retention."""

    def __init__(self, store: storage.Storage, run: str, config: Config, *, echo: Report | None = None):
        self.store, self.run, self.config, self.echo = store, run, config, echo
        self.local = Path(store.local_path(run)) if store.is_local else Path(tempfile.mkdtemp(prefix="kd_tune_tb_"))
        from tensorboardX import SummaryWriter  # imported here: only runs that record need it

        self.writer = SummaryWriter(str(self.local / "tensorboard"))

    def __call__(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if key not in ("epoch", "step"):
                self.writer.add_scalar(scalar_tag(key), value, epoch)
        self.writer.flush()
        if not self.store.is_local:
            storage.upload_tree(self.local / "tensorboard", self.store, f"{self.run}/tensorboard")
        if checkpoint is not None:
            storage.copy_checkpoint(checkpoint, self.store, f"{self.run}/checkpoints/epoch_{epoch:04d}")
            storage.prune_checkpoints(self.store, f"{self.run}/checkpoints", metric=self.config.tune.metric,
                                      mode=self.config.tune.mode, keep_best=self.config.storage.keep_best)
        if self.echo:
            self.echo(metrics, checkpoint)

    def close(self) -> None:
        self.writer.close()


def run_training(config: Config, *, name: str, resume: bool = False, echo: Report | None = None) -> str:
    """`kd-tune train`: one distillation run written to <storage.root>/<name>; returns its location."""
    store = storage.Storage.from_config(config.storage)
    latest = storage.latest_checkpoint(store, f"{name}/checkpoints") if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {store.uri}/{name}/checkpoints")
    storage.write_text(store, f"{name}/config.yaml", dump_config(config))
    recorder = RunRecorder(store, name, config, echo=echo)
    try:
        fit(config, recorder, resume=storage.load_checkpoint(store, latest) if latest else None)
    finally:
        recorder.close()
    return f"{store.uri}/{name}"
