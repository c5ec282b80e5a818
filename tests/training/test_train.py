"""The distillation engine: schedules, batching, views, the non-finite guard, fit, resume, teachers, the CLI run."""

import dataclasses
import math
import resource
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kd_tune.audio.features import N_SAMPLES, LogMel, front_end, render_view
from kd_tune.config import Config, ConfigError, load_config
from kd_tune.datasets.data import STRADDLE_KIND, WINDOW_KIND, Split, load_data, load_dataset
from kd_tune.metrics import METRICS
from kd_tune.store.checkpoint import copy_checkpoint, latest_checkpoint, load_checkpoint, verify_checkpoint
from kd_tune.training.distill import combine_teachers
from kd_tune.training.models import build_teacher
from kd_tune.training.teachers import TeacherEnsemble, load_teacher, teacher_store
from kd_tune.training.resume import TrainState
from kd_tune.training.train import (NonFiniteLossError, TooFewClipsError, batches, epoch_pool, fit, fit_teacher, guard,
                                    lr_at, optimizer_step, probe_batch_size, steps_per_epoch)

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
# A half-width student and a 250 ms evaluation hop: the same code paths at a third of the cost.
TINY_RUN = ["teachers=[{name: cnn, arch: cnn, source: tiny, epochs: 2}]", "distillation.teachers=[cnn]",
            "training.epochs=2", "training.batch_size=32", "student.width=0.5", "training.eval_hop_ms=250"]
LOSSES = ("total_loss", "student_loss", "distillation_loss")
EPOCH_METRICS = (*LOSSES, "alpha", "temperature", "accuracy", "auc", "eer", "frr_at_target_fa", "fa_per_hour",
                 "threshold", "validation_seconds")
SCALAR_TAGS = ("loss/total", "loss/student", "loss/distillation", "schedule/alpha", "schedule/temperature",
               "schedule/lr", "eval/accuracy", "eval/auc", "eval/eer", "eval/frr_at_target_fa", "eval/fa_per_hour",
               "eval/threshold", "system/peak_rss_mib", "system/validation_seconds")
MEMORY = tuple(name for name in METRICS if name.endswith("_mib"))  # they differ between runs


def tiny_config(data_root: Path, storage_root: Path, *overrides: str) -> Config:
    return load_config(None, overrides=[f"data.root={data_root}", f"storage.root={storage_root}", *TINY_RUN,
                                        *overrides], check_paths=False)


def ensemble_of(teachers: dict[str, nn.Module], *, combine: str = "mean") -> TeacherEnsemble:
    return TeacherEnsemble(teachers, combine=combine, device=CPU, dtype=torch.float32)


class KeepCheckpoints:
    """A report callback that keeps each epoch's metrics and a verified copy of its checkpoint under `keep`."""

    def __init__(self, keep: Path):
        self.keep, self.metrics, self.stems = keep, [], []

    def __call__(self, metrics: dict, checkpoint: Path | None) -> None:
        self.metrics.append(dict(metrics))
        loaded = load_checkpoint(checkpoint.parent, checkpoint.name)  # verifies before it builds tensors
        self.stems.append(set(loaded.tensors))
        copy_checkpoint(checkpoint, self.keep, f"epoch_{int(metrics['epoch'])}")


@pytest.fixture(scope="module")
def data(small_dataset):
    return load_dataset(small_dataset)


@pytest.fixture(scope="module")
def config(small_dataset, data, tmp_path_factory) -> Config:
    """The tiny run's config; its storage root holds the tiny cnn teacher, fine-tuned once by fit_teacher."""
    config = tiny_config(small_dataset, tmp_path_factory.mktemp("teacher_store"))
    fit_teacher(config, config.teacher("cnn"), data=data)
    return config


@pytest.fixture(scope="module")
def distilled(config, data, tmp_path_factory):
    """One uninterrupted 2-epoch run with a teacher ensemble built here, and the teacher's state before it."""
    teachers = ensemble_of({"cnn": load_teacher(config, config.teacher("cnn"))})
    before = {k: v.clone() for k, v in teachers.state_dict().items()}
    report = KeepCheckpoints(tmp_path_factory.mktemp("distilled"))
    last = fit(config, report, data=data, teachers=teachers)
    return SimpleNamespace(teachers=teachers, before=before, report=report, last=last)


# ---------------------------------------------------------------- pure pieces


def test_lr_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    # rule: lr_at is linear warm-up to the peak at the end of warm-up, then cosine to 10% of base_lr at the last step
    total, base = 100, 2e-3
    lr = [lr_at(s, total_steps=total, base_lr=base, warmup_fraction=0.1) for s in range(total + 1)]
    assert lr[:10] == pytest.approx([base * (s + 1) / 10 for s in range(10)])  # a straight line from base/10
    assert max(lr) == pytest.approx(base) and lr[9] == pytest.approx(base) and lr[10] == pytest.approx(base)
    assert all(a > b for a, b in pairwise(lr[10:]))  # one new value per optimizer step, always falling
    assert lr[55] == pytest.approx(base * (0.1 + 0.9 * 0.5))  # half-way through the decay: half-way down
    assert lr[total] == pytest.approx(0.1 * base) and lr[total - 1] > 0.1 * base
    assert lr_at(0, total_steps=total, base_lr=base, warmup_fraction=0.0) == pytest.approx(base)  # no warm-up


def test_batches_are_a_seeded_permutation_of_whole_batches():
    # rule: the order depends only on (seed, epoch); full batches only, no clip twice in an epoch
    def epoch(seed, e):
        return [b.tolist() for b in batches(103, 16, seed=seed, epoch=e)]

    assert epoch(0, 1) == epoch(0, 1)
    assert epoch(0, 2) != epoch(0, 1) and epoch(1, 1) != epoch(0, 1)
    order = epoch(0, 1)
    assert [len(b) for b in order] == [16] * (103 // 16)
    flat = [i for b in order for i in b]
    assert len(flat) == 103 // 16 * 16 and len(set(flat)) == len(flat) and set(flat) <= set(range(103))


def test_each_epoch_reads_every_clip_and_a_fresh_share_of_the_long_windows():
    # rule: an epoch trains on every clip that is not a long window and on per_epoch of the W windows, taken in turn
    # from one seeded order, so that W / per_epoch epochs read each window once; the pool depends on (seed, epoch)
    is_window = torch.tensor([False] * 7 + [True] * 12 + [False] * 3)  # 10 clips, 12 windows
    clips = set(range(7)) | {19, 20, 21}
    pools = [epoch_pool(is_window, 4, seed=5, epoch=e).tolist() for e in range(3)]
    assert all(set(p) >= clips and len(p) == len(set(p)) == 10 + 4 for p in pools)
    shares = [set(p) - clips for p in pools]
    assert set.union(*shares) == set(range(7, 19)) and sum(map(len, shares)) == 12  # each window once in 3 epochs
    assert epoch_pool(is_window, 4, seed=5, epoch=3).tolist() == pools[0]  # then the same order again
    assert epoch_pool(is_window, 4, seed=6, epoch=0).tolist() != pools[0]
    for everything in (None, 12, 100):
        assert epoch_pool(is_window, everything, seed=5, epoch=1).tolist() == list(range(22))


@pytest.mark.parametrize("n", range(6))
@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
def test_no_batch_of_one_clip_ever_reaches_a_model(n, batch_size):
    # rule: BatchNorm cannot train on one clip: batches never yields a batch of one, even from a one-clip split
    # or with batch_size 1; a split smaller than a batch (of 2 or more clips) is one whole batch
    sizes = [len(b) for b in batches(n, batch_size, seed=0, epoch=0)]
    assert all(size >= 2 for size in sizes), sizes
    if batch_size >= 2 and 2 <= n < batch_size:
        assert sizes == [n]


def test_a_split_or_batch_too_small_to_train_is_refused_before_training(small_dataset, data, tmp_path):
    # rule: a training split under 2 clips, or a batch size of 1, is refused up front with a message naming the
    # field and what is allowed (exit code 2), for the student and for a teacher, before any step
    config = tiny_config(small_dataset, tmp_path)
    one_clip = dataclasses.replace(data, train=Split(data.train.audio[:1], data.train.labels[:1],
                                                     data.train.kinds[:1]))

    def never(metrics, checkpoint):
        pytest.fail("an epoch was reported")

    with pytest.raises(TooFewClipsError, match=r"^data.root: the training split has 1 clip\(s\).*at least 2") as e:
        fit(config, never, data=one_clip)
    assert e.value.exit_code == 2
    with pytest.raises(ConfigError, match=r"training.batch_size: batch_size 1 must be 2"):
        tiny_config(small_dataset, tmp_path, "training.batch_size=1")
    with pytest.raises(ConfigError, match=r"teachers.0.batch_size: .*greater than or equal to 2"):
        config.replace({"teachers": [{**config.teacher("cnn").model_dump(), "batch_size": 1}]})
    with pytest.raises(TooFewClipsError, match="^data.root"):
        fit_teacher(config, config.teacher("cnn"), data=one_clip, report=never)
    assert not (tmp_path / "teachers").exists()


def test_render_view_is_a_pure_function_of_seed_and_view(small_dataset, data, tmp_path):
    # rule: the same (seed, view) gives the same audio, another view other audio, no augmentation the audio itself
    config = tiny_config(small_dataset, tmp_path, "augment.enabled=true")
    _, augment, _ = front_end(config, data.train.of_kind("background"), CPU)
    audio = data.train.audio[:8]  # [8, N_SAMPLES]
    first = render_view(audio, augment, view=1, seed=0)
    assert torch.equal(first, render_view(audio, augment, view=1, seed=0))
    assert not torch.equal(first, render_view(audio, augment, view=2, seed=0))
    assert not torch.equal(first, render_view(audio, augment, view=1, seed=1))
    off = config.model_copy(update={"augment": config.augment.model_copy(update={"enabled": False})})
    _, no_augment, _ = front_end(off, data.train.of_kind("background"), CPU)
    assert no_augment is None and torch.equal(render_view(audio, no_augment, view=1, seed=0), audio)


def tiny_step_setup():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.randn(8, 4)


def test_optimizer_step_skips_a_nan_loss():
    # rule: a non-finite loss leaves the parameters untouched and reports the step as skipped
    model, optimizer, scaler, x = tiny_step_setup()
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer_step(model(x).sum() * math.nan, model, optimizer, scaler, clip=1.0) is False
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert optimizer_step(model(x).sum(), model, optimizer, scaler, clip=1.0) is True  # a finite one steps
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_optimizer_step_skips_an_infinite_gradient():
    # rule: a finite loss whose gradient is not finite is skipped too, with no optimizer state and no gradient left
    model, optimizer, scaler, x = tiny_step_setup()
    before = [p.detach().clone() for p in model.parameters()]
    model.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    loss = model(x).sum()
    assert torch.isfinite(loss)
    assert optimizer_step(loss, model, optimizer, scaler, clip=1.0) is False
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def test_guard_stops_after_k_consecutive_skips_and_a_good_step_resets_it():
    # rule: skipped steps are counted; K in a row raise NonFiniteLossError naming max_nonfinite_steps
    state = TrainState()
    for ok in (False, False, True, False, False):
        guard(ok, state, limit=3)
    assert (state.skipped_steps, state.consecutive_skips) == (4, 2)
    with pytest.raises(NonFiniteLossError, match=r"distillation\.max_nonfinite_steps = 3"):
        guard(False, state, limit=3)
    assert state.skipped_steps == 5


def test_probe_batch_size_is_64_off_the_gpu():
    # rule: off the GPU there is nothing to probe: 64, without running a step
    def step(batch: int) -> None:
        raise AssertionError(f"probed a batch of {batch} on the CPU")

    assert probe_batch_size(step, CPU) == 64


def test_probe_batch_size_halves_on_out_of_memory():
    # rule: on CUDA the probe halves the batch after each out-of-memory until a step fits, else it says so
    # A mock: this machine has no GPU, so the fake step raises torch.cuda.OutOfMemoryError itself and allocates
    # nothing; torch.device("cuda") is only a name here.
    tried = []

    def step(batch: int) -> None:
        tried.append(batch)
        if batch > 300:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake) at batch {batch}")

    assert probe_batch_size(step, torch.device("cuda"), start=4096) == 256
    assert tried == [4096, 2048, 1024, 512, 256]

    def never_fits(batch: int) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    with pytest.raises(RuntimeError, match="even a batch of 8 does not fit"):
        probe_batch_size(never_fits, torch.device("cuda"), start=64)


# ---------------------------------------------------------------- teachers


@pytest.fixture(scope="module")
def speech_teacher(config, data, tmp_path_factory) -> nn.Module:
    """A tiny wav2vec2 teacher (waveform input), fine-tuned for one epoch into its own storage root."""
    speech = load_config(None, overrides=[f"data.root={config.data.root}",
                                          f"storage.root={tmp_path_factory.mktemp('speech_store')}",
                                          "teachers=[{name: speech, arch: wav2vec2, source: tiny, epochs: 1, "
                                          "batch_size: 128}]", "training.eval_hop_ms=250"], check_paths=False)
    fit_teacher(speech, speech.teacher("speech"), data=data)
    return load_teacher(speech, speech.teacher("speech"))


def test_check_inputs_names_the_teacher_that_cannot_take_the_input(speech_teacher):
    # rule: a teacher fed the wrong n_mels, or an input kind the run does not provide, fails at set-up by name
    wave = torch.randn(2, N_SAMPLES)  # [B, N_SAMPLES]
    inputs = {"waveform": wave, "features": LogMel(n_mels=40)(wave)}  # features: [B, 40, T]
    narrow = ensemble_of({"narrow": build_teacher("cnn", source="tiny", n_mels=20)})
    with pytest.raises(ValueError, match="teacher 'narrow' cannot take features input of shape"):
        narrow.check_inputs(inputs)
    with pytest.raises(ValueError, match="teacher 'speech' takes waveform input, but this run provides only features"):
        ensemble_of({"speech": speech_teacher}).check_inputs({"features": inputs["features"]})
    ensemble_of({"speech": speech_teacher}).check_inputs(inputs)


def test_check_inputs_feeds_the_teachers_dtype():
    # rule: the set-up probe casts to the teachers' dtype as forward() does, so half-precision teachers pass it
    half = TeacherEnsemble({"cnn": build_teacher("cnn", source="tiny")}, combine="mean", device=CPU,
                           dtype=torch.bfloat16)
    half.check_inputs({"features": torch.randn(1, 40, 101)})  # float32 features, bfloat16 weights


@pytest.mark.slow
def test_two_teachers_of_both_input_kinds_distil_with_confidence_weights(config, data, speech_teacher, tmp_path):
    # rule: an ensemble routes each teacher its own input kind, combines by confidence, and fit runs through it
    cnn = load_teacher(config, config.teacher("cnn"))
    teachers = ensemble_of({"cnn": cnn, "speech": speech_teacher}, combine="confidence")
    wave = data.val.audio[:4]  # [4, N_SAMPLES]
    feats = LogMel(n_mels=config.features.n_mels)(wave)  # [4, n_mels, T]
    with torch.no_grad():
        expected = combine_teachers([cnn(feats), speech_teacher(wave)], method="confidence")
    torch.testing.assert_close(teachers({"waveform": wave, "features": feats}), expected)

    one_epoch = config.model_copy(update={"training": config.training.model_copy(update={"epochs": 1})})
    report = KeepCheckpoints(tmp_path)
    fit(one_epoch, report, data=data, teachers=teachers)
    assert len(report.metrics) == 1 and all(math.isfinite(report.metrics[0][k]) for k in EPOCH_METRICS)


# ---------------------------------------------------------------- fit


@pytest.mark.slow
def test_fit_reports_every_epoch_with_a_verified_checkpoint(config, distilled):
    # rule: report() gets, once per epoch, every loss, schedule and val metric and a checkpoint that verifies
    metrics, last = distilled.report.metrics, distilled.report.metrics[-1]
    assert [m["epoch"] for m in metrics] == [1, 2] and last == distilled.last
    for m in metrics:
        assert all(math.isfinite(m[k]) for k in EPOCH_METRICS), m
        assert (m["alpha"], m["temperature"]) == (0.5, 4.0)
        # constant alpha, so the epoch means mix like the per-step losses
        assert m["total_loss"] == pytest.approx((1 - m["alpha"]) * m["student_loss"] + m["alpha"]
                                                * m["distillation_loss"], abs=1e-5)
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["auc"] <= 1 and m["skipped_steps"] == 0
    steps = last["step"]  # lr is set once per optimizer step: the last one's lr is what the epoch reports
    t = config.training
    assert last["lr"] == pytest.approx(lr_at(steps - 1, total_steps=steps, base_lr=t.lr,
                                             warmup_fraction=t.warmup_fraction))
    assert all(stems >= {"model", "optimizer", "rng"} for stems in distilled.report.stems)
    saved = load_checkpoint(distilled.report.keep, "epoch_2")
    assert (saved.manifest["epoch"], saved.manifest["step"]) == (2, steps)
    assert saved.manifest["metrics"]["total_loss"] == pytest.approx(last["total_loss"])


@pytest.mark.slow
def test_fit_reports_the_workers_peak_memory_every_epoch(distilled):
    # rule: every epoch reports the process's peak RSS so far in MiB (what getrusage says, never falling); the CUDA
    # peaks only on CUDA
    metrics = distilled.report.metrics
    peaks = [m["peak_rss_mib"] for m in metrics]
    now_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert 100 < peaks[0] <= peaks[-1] <= now_mib and peaks == sorted(peaks), (peaks, now_mib)
    assert not any("cuda_max_allocated_mib" in m or "cuda_max_reserved_mib" in m for m in metrics)
    print(f"\npeak RSS per epoch (MiB): {[round(p) for p in peaks]}")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_reports_cuda_peak_memory_every_epoch(config, data, tmp_path):
    # rule: on CUDA every epoch reports the epoch's peak allocated and reserved CUDA memory, reserved >= allocated
    report = KeepCheckpoints(tmp_path)
    fit(config.replace({"training.device": "cuda"}), report, data=data)
    for m in report.metrics:
        assert 0 < m["cuda_max_allocated_mib"] <= m["cuda_max_reserved_mib"], m
    peaks = [(round(m["cuda_max_allocated_mib"]), round(m["cuda_max_reserved_mib"])) for m in report.metrics]
    print(f"\nCUDA peaks (MiB, allocated and reserved): {peaks}")


@pytest.mark.slow
def test_teachers_stay_frozen_through_fit(distilled):
    # rule: distillation never changes the teacher: same bits, eval mode, no parameter requiring grad
    after = distilled.teachers.state_dict()
    assert after.keys() == distilled.before.keys()
    assert all(torch.equal(after[k], distilled.before[k]) for k in after)  # BatchNorm running stats included
    assert not any(m.training for m in distilled.teachers.teachers.modules())
    assert not any(p.requires_grad for p in distilled.teachers.parameters())


@pytest.mark.slow
def test_resume_from_epoch_one_repeats_epoch_two(config, data, distilled, tmp_path):
    # rule: model, optimizer and RNG state in the checkpoint make a resumed run match the uninterrupted one
    report = KeepCheckpoints(tmp_path)
    fit(config, report, data=data, resume=load_checkpoint(distilled.report.keep, "epoch_1"),
        teachers=distilled.teachers)
    assert [m["epoch"] for m in report.metrics] == [2]
    resumed, uninterrupted = report.metrics[0], distilled.report.metrics[1]
    for key in uninterrupted.keys() - {"epoch_seconds", "validation_seconds", *MEMORY}:
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-5), key
    model = load_checkpoint(tmp_path, "epoch_2").tensors["model"]
    reference = load_checkpoint(distilled.report.keep, "epoch_2").tensors["model"]
    for name, tensor in reference.items():
        torch.testing.assert_close(model[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("alpha, equal_to", [(0.0, "student_loss"), (1.0, "distillation_loss")])
def test_alpha_zero_is_the_student_loss_and_alpha_one_the_distillation_loss(config, data, alpha, equal_to, tmp_path):
    # rule: total = (1 - alpha) * student + alpha * distillation at both ends of alpha (teachers loaded by fit)
    one_epoch = tiny_config(Path(config.data.root), Path(config.storage.root), "training.epochs=1",
                            "training.batch_size=64", f"distillation.alpha_start={alpha}",
                            f"distillation.alpha_end={alpha}")
    report = KeepCheckpoints(tmp_path)
    fit(one_epoch, report, data=data)
    (metrics,) = report.metrics
    assert metrics["alpha"] == alpha and metrics[equal_to] > 0
    assert metrics["total_loss"] == pytest.approx(metrics[equal_to], rel=1e-9)



def test_straddle_windows_train_the_student_and_never_the_teacher(config, tmp_path):
    # rule: fit takes steps over every training clip, straddle windows included (the teacher is their label);
    # fit_teacher leaves them out, so its steps are those of the labelled clips alone
    straddling = tiny_config(Path(config.data.root), tmp_path, "data.straddles_per_positive=2", "training.epochs=1")
    data = load_data(straddling.data)
    teacher = straddling.teacher("cnn")
    assert data.train.kinds.count(STRADDLE_KIND) > 0
    fit_teacher(straddling, teacher, data=data)
    manifest = verify_checkpoint(teacher_store(straddling), teacher.name)
    assert manifest["step"] == teacher.epochs * steps_per_epoch(len(data.train.labelled().labels), teacher.batch_size)
    report = KeepCheckpoints(tmp_path / "student")
    fit(straddling, report, data=data)
    assert report.metrics[-1]["step"] == steps_per_epoch(len(data.train.labels), 32)


def test_a_student_epoch_takes_the_steps_of_its_share_of_the_long_windows(config, data, tmp_path):
    # rule: training.long_hours_per_epoch caps the long windows a student epoch reads (1 s each): 0.001 h is 4 of the
    # small set's 10, so each epoch takes the steps of the other clips and those 4
    shared = tiny_config(Path(config.data.root), Path(config.storage.root), "training.long_hours_per_epoch=0.001",
                         "training.epochs=2")
    windows = data.train.kinds.count(WINDOW_KIND)
    assert windows > 4
    report = KeepCheckpoints(tmp_path / "student")
    fit(shared, report, data=data)
    assert report.metrics[-1]["step"] == 2 * steps_per_epoch(len(data.train.labels) - windows + 4, 32)


def test_nan_audio_stops_fit_after_max_nonfinite_steps(config, data, tmp_path):
    # rule: K consecutive non-finite steps stop fit with NonFiniteLossError saying why and what to do
    audio = data.train.audio.clone()
    audio[:, N_SAMPLES // 2] = math.nan  # mid-clip, so no time shift moves it out
    nan_data = dataclasses.replace(data, train=Split(audio, data.train.labels, data.train.kinds))
    guarded = tiny_config(Path(config.data.root), Path(config.storage.root), "distillation.max_nonfinite_steps=3")
    report = KeepCheckpoints(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 2: 3 consecutive steps had a non-finite loss "
                                                 r"or gradient \(distillation\.max_nonfinite_steps = 3\)"):
        fit(guarded, report, data=nan_data)
    assert report.metrics == []  # it stopped inside the first epoch


# ---------------------------------------------------------------- the command line


def kd_tune(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "kd_tune", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"kd-tune {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def scalar_steps(logdir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_cli_train_writes_tensorboard_checkpoints_and_config_and_resumes(small_dataset, tmp_path):
    # rule: `kd-tune teacher train` is cached; `kd-tune train` logs every scalar per epoch and `--resume` continues
    store, config_file = tmp_path / "store", tmp_path / "run.yaml"
    config_file.write_text(f"data: {{root: {small_dataset}}}\nstorage: {{root: {store}}}\n"
                           "teachers: [{name: cnn, arch: cnn, source: tiny, epochs: 1, batch_size: 64}]\n"
                           "distillation: {teachers: [cnn]}\nstudent: {width: 0.5}\n"
                           "training: {epochs: 2, batch_size: 64, eval_hop_ms: 250}\n")
    assert "up to date" not in kd_tune("teacher", "train", str(config_file)).stdout
    assert "teacher cnn: up to date, not retrained" in kd_tune("teacher", "train", str(config_file)).stdout

    kd_tune("train", str(config_file), "--name", "run")
    steps = scalar_steps(store / "run" / "tensorboard")
    assert {tag: steps.get(tag) for tag in SCALAR_TAGS} == {tag: [1, 2] for tag in SCALAR_TAGS}
    checkpoints = sorted(p.name for p in (store / "run" / "checkpoints").iterdir())
    assert checkpoints == ["epoch_0001", "epoch_0002"]
    for name in checkpoints:
        verify_checkpoint(store, f"run/checkpoints/{name}")
    assert load_config(store / "run" / "config.yaml").to_dict() == load_config(config_file).to_dict()

    resumed = kd_tune("train", str(config_file), "--name", "run", "--resume", "--set", "training.epochs=3")
    assert "train epoch 3" in resumed.stdout and "train epoch 1" not in resumed.stdout
    steps = scalar_steps(store / "run" / "tensorboard")
    assert {tag: steps.get(tag) for tag in SCALAR_TAGS} == {tag: [1, 2, 3] for tag in SCALAR_TAGS}
    latest = verify_checkpoint(store, latest_checkpoint(store, "run/checkpoints"))
    assert latest["epoch"] == 3 and latest["config"]["training"]["epochs"] == 3
