"""`kd-tune bench`: what a sweep pays for on this machine, measured side by side in one run; it asserts nothing.

Four parts: (a) `cache_vs_live`, (b) `ray_vs_plain`, (c) `pipeline`, (d) `onnx`; README, "Benchmarks", says what
each measures. Everything runs on `--clips` training clips of the configured data set, in a temporary storage root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import platform
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import ray
import torch

from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE, LogMel, front_end, render_view, samples
from kd_tune.config import Config
from kd_tune.datasets.data import Split, WakewordData, load_data
from kd_tune.deploy.detect import open_session
from kd_tune.deploy.export import hop_latency_ms, latency_ms, probability_model, streaming_model, to_onnx
from kd_tune.deploy.streaming import StreamingDetector
from kd_tune.deploy.windows import stream_probabilities, streamed_probabilities
from kd_tune.evaluation.leaderboard import cell
from kd_tune.metrics import LOSSES
from kd_tune.training.cache import build_cache, shard_names
from kd_tune.training.models import build_student, count_parameters
from kd_tune.training.teachers import initial_teacher, save_teacher
from kd_tune.training.train import fit, pick_device
from kd_tune.tuning.sweep import RAY_SETTINGS, connect_ray
from kd_tune.tuning.trial import empty_worker, ray_report, torch_trainer

BENCH_CLIPS = 256  # a few minutes on 2 cores with a base-size teacher
TEACHER_NAME, TEACHER_ARCH = "bench", "wav2vec2"
TEACHER_BATCH = 32
LIVE_EPOCHS = 2  # timed from the 2nd epoch on: the first also pays one-time set-up
LOOP_EPOCHS = 5  # short epochs vary by ~15% from one to the next: (b) takes the median of 8 per side
PIPELINE_VIEWS = 2
PIPELINE_BATCH = 64
STREAM_BENCH_SECONDS = 60  # of noise, scored by both forms of the exported student
STREAM_BENCH_ROUNDS = 3
RAY_TRAIN_POLL_S = "2"  # Ray Train's own default for RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, seconds


# ---------------------------------------------------------------- set-up


def subset(data: WakewordData, clips: int, *, seed: int) -> WakewordData:
    """`clips` training clips in a seeded random order (repeated when the set has fewer), under their own digest."""
    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips!r}")
    order = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(seed))
    index = order[torch.arange(clips) % len(order)]  # [clips]
    train = Split(data.train.audio[index], data.train.labels[index], [data.train.kinds[i] for i in index])
    # Its own data digest, so the cache of this subset never passes for the full set's.
    digest = hashlib.sha256(f"{data.manifest_sha256}:{index.tolist()}".encode()).hexdigest()
    return dataclasses.replace(data, train=train, manifest_sha256=digest, labelled_sha256=digest)


def bench_config(config: Config, *, root: str, teacher_source: str) -> Config:
    """The user's config with one teacher, one epoch and a throw-away storage root."""
    teacher = {"name": TEACHER_NAME, "arch": TEACHER_ARCH, "source": teacher_source, "batch_size": TEACHER_BATCH}
    return config.replace({"teachers": [teacher], "distillation.teachers": [TEACHER_NAME],
                           "distillation.teacher_mode": "live", "training.epochs": 1, "storage.root": root,
                           "storage.endpoint_override": None}, source="bench settings")


def save_untrained_teacher(config: Config, data: WakewordData) -> int:
    """Store the teacher as `kd-tune teacher train` would, untrained; returns its parameter count."""
    teacher = config.teacher(TEACHER_NAME)
    model = initial_teacher(teacher, n_mels=config.features.n_mels)
    save_teacher(config, teacher, model, data)
    return count_parameters(model)


def with_mode(config: Config, mode: str, *, epochs: int = 1) -> Config:
    return config.replace({"distillation.teacher_mode": mode, "training.epochs": epochs}, source="bench settings")


def timed_fit(config: Config, data: WakewordData) -> dict:
    """fit() in this process: every epoch's metrics, and seconds from the call to the first report."""
    started, reports = time.time(), []
    fit(config, lambda metrics, _checkpoint: reports.append({**metrics, "reported_unix": time.time()}), data=data)
    return {"epochs": reports, "first_report_s": reports[0]["reported_unix"] - started}


def epoch_wall_s(*runs: list[dict]) -> float:
    """Median wall-clock of an epoch, report to report, over the runs' epochs from the second on."""
    return statistics.median(b["reported_unix"] - a["reported_unix"] for run in runs for a, b in pairwise(run))


def epoch_steps_s(*runs: list[dict], part: str = "epoch_seconds") -> float:
    """Median time of an epoch's training steps alone (or of its validation, part="validation_seconds"), over the
    runs' epochs from the second on."""
    return statistics.median(r[part] for run in runs for r in run[1:])


# ---------------------------------------------------------------- (a) cache vs live teacher


def cache_vs_live(config: Config, data: WakewordData) -> dict:
    """The same trial twice, live then cached; break-even: trial epochs after which the cache has paid for itself."""
    live = timed_fit(with_mode(config, "live", epochs=LIVE_EPOCHS), data)["epochs"]
    started = time.perf_counter()
    build_cache(config, [TEACHER_NAME], data=data)
    build_s = time.perf_counter() - started
    cached = timed_fit(with_mode(config, "cache", epochs=LIVE_EPOCHS), data)["epochs"]
    live_s, cache_s = epoch_wall_s(live), epoch_wall_s(cached)
    live_steps_s, cache_steps_s = epoch_steps_s(live), epoch_steps_s(cached)
    return {"clips": len(data.train.labels), "views": config.augment.views, "live_epoch_s": live_s,
            "cache_epoch_s": cache_s, "speedup": live_s / cache_s, "live_steps_s": live_steps_s,
            "cache_steps_s": cache_steps_s, "steps_speedup": live_steps_s / cache_steps_s, "cache_build_s": build_s,
            "cache_validation_share": epoch_steps_s(cached, part="validation_seconds") / cache_s,
            "cache_shards": len(shard_names(config)), "break_even_epochs": build_s / max(live_s - cache_s, 1e-9),
            **{f"live_{k}": live[-1][k] for k in LOSSES}, **{f"cache_{k}": cached[-1][k] for k in LOSSES},
            "max_loss_difference": max(abs(a[k] - b[k]) for a, b in zip(live, cached, strict=True) for k in LOSSES)}


# ---------------------------------------------------------------- (b) Ray Train trial vs plain process


def bench_worker(loop_config: dict) -> dict:
    """A Ray Train worker running fit() as a sweep trial does; returns its own timings to the driver."""
    entered, reports = time.time(), []
    forward = ray_report()

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        forward(metrics, checkpoint_dir)
        reports.append({**metrics, "reported_unix": time.time()})

    fit(loop_config["config"], report, data=ray.get(loop_config["data"]))
    return {"entered_unix": entered, "threads": torch.get_num_threads(), "reports": reports}


def ray_trial(config: Config, data_ref, *, storage_path: str, poll_s: str) -> dict:
    """One TorchTrainer run of fit(), its controller polling the worker every poll_s seconds."""
    trainer = torch_trainer(bench_worker, {"config": config, "data": data_ref}, config, storage_path=storage_path,
                            name="bench")
    started = time.time()
    # fit() reads the variable and hands it to the controller it starts; it raises when the trial fails.
    with environment("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", poll_s):
        # Train V2's Result, the one run, has return_value; mypy reads ray.train's first import, Train V1's
        out = trainer.fit().return_value  # type: ignore[attr-defined]
    reports = out["reports"]
    return {"epochs": reports, "threads": out["threads"], "poll_s": float(poll_s),
            "trial_start_s": out["entered_unix"] - started,
            "first_report_s": reports[0]["reported_unix"] - started, "trial_total_s": time.time() - started}


def ray_empty_trial_start_s(config: Config, *, storage_path: str) -> float:
    """Seconds from fit() to the loop of a trial that does nothing: Ray's own start-up, kd_tune's training aside."""
    trainer = torch_trainer(empty_worker, {}, config, storage_path=storage_path, name="empty")
    started = time.time()
    return trainer.fit().return_value - started  # type: ignore[attr-defined]  # Train V2's Result, as above


@contextlib.contextmanager
def environment(name: str, value: str):
    """os.environ[name] = value within the block, then as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def plain_fit(config: Config, data: WakewordData) -> dict:
    """timed_fit() on as many threads as a trial worker gets, so that only Ray's overhead differs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.tune.cpus_per_worker)))  # as Ray sets a worker's OMP_NUM_THREADS
    try:
        return timed_fit(config, data)
    finally:
        torch.set_num_threads(threads)


def ray_vs_plain(config: Config, data: WakewordData, *, root: str) -> dict:
    """Plain and Ray runs alternate, so that a change in the machine's speed meets both (it varies ~15% here)."""
    config = with_mode(config, "cache", epochs=LOOP_EPOCHS)
    polls = {"kd_tune": RAY_SETTINGS["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"], "ray_default": RAY_TRAIN_POLL_S}
    started_here, started = not ray.is_initialized(), time.perf_counter()
    connect_ray(None, log_to_driver=False)  # a failing trial still raises from fit(), with its worker's error
    ray_init_s = time.perf_counter() - started if started_here else None
    try:
        data_ref, plain, trials = ray.put(data), [], {}
        for name, poll in polls.items():
            plain.append(plain_fit(config, data))
            trials[name] = ray_trial(config, data_ref, storage_path=f"{root}/ray_{name}", poll_s=poll)
        empty_start_s = ray_empty_trial_start_s(config, storage_path=f"{root}/ray_empty")
    finally:
        if started_here:
            ray.shutdown()
    plain_runs, ray_runs = [run["epochs"] for run in plain], [trial["epochs"] for trial in trials.values()]
    plain_epoch_s, ray_epoch_s = epoch_wall_s(*plain_runs), epoch_wall_s(*ray_runs)
    figures = {"threads": trials["kd_tune"]["threads"], "ray_init_s": ray_init_s, "plain_epoch_s": plain_epoch_s,
               "ray_epoch_s": ray_epoch_s, "epoch_ratio": ray_epoch_s / plain_epoch_s,
               "plain_steps_s": epoch_steps_s(*plain_runs), "ray_steps_s": epoch_steps_s(*ray_runs),
               "plain_first_report_s": statistics.median(run["first_report_s"] for run in plain),
               "empty_trial_start_s": empty_start_s}
    for name, trial in trials.items():
        figures |= {f"{name}_{key}": trial[key] for key in ("poll_s", "trial_start_s", "first_report_s",
                                                            "trial_total_s")}
    return figures


# ---------------------------------------------------------------- (c) front end, (d) exported student


@torch.no_grad()
def pipeline_throughput(config: Config, data: WakewordData) -> dict:
    """Clips per second through augmentation (render_view) and features (LogMel + SpecAugment), on the CPU."""
    log_mel, augment, spec_augment = front_end(config, data.train.of_kind("background"), torch.device("cpu"))
    augment_s = features_s = 0.0
    for view in range(PIPELINE_VIEWS):
        started = time.perf_counter()
        wave = render_view(data.train.audio, augment, view=view, seed=config.training.seed)  # [N, N_SAMPLES]
        augment_s += time.perf_counter() - started
        started = time.perf_counter()
        for step, batch in enumerate(wave.split(PIPELINE_BATCH)):
            spec_augment(log_mel(batch), generator=torch.Generator().manual_seed(step))  # [B, n_mels, T]
        features_s += time.perf_counter() - started
    clips = PIPELINE_VIEWS * len(data.train.audio)
    return {"clips": clips, "threads": torch.get_num_threads(), "augment_samples_per_s": clips / augment_s,
            "features_samples_per_s": clips / features_s, "pipeline_samples_per_s": clips / (augment_s + features_s)}


def onnx_latency(config: Config) -> dict:
    """The default student, untrained (the cost does not depend on the weights), exported by deploy.export in both
    forms: the windowed model's latency per window, the streaming form's per hop, and each one's CPU time per second
    of a recording (one thread each, alternating, the median of STREAM_BENCH_ROUNDS)."""
    student = build_student(config.student.name, width=config.student.width, n_mels=config.features.n_mels).eval()
    log_mel, hop = LogMel.from_config(config.features), samples(config.training.eval_hop_ms)
    model = to_onnx(probability_model(student, log_mel), window_samples=N_SAMPLES)
    stream_model = streaming_model(StreamingDetector(student, log_mel, hop_samples=hop))
    audio = 0.1 * np.random.default_rng(0).standard_normal(STREAM_BENCH_SECONDS * SAMPLE_RATE).astype(np.float32)
    windowed, streaming = open_session(model, threads=1), open_session(stream_model, threads=1)
    per_audio_s: dict[str, list[float]] = {"windowed": [], "streaming": []}
    for _ in range(STREAM_BENCH_ROUNDS):
        for form, score, session in (("windowed", stream_probabilities, windowed),
                                     ("streaming", streamed_probabilities, streaming)):
            started = time.process_time()
            score(session, audio, window_samples=N_SAMPLES, hop_samples=hop)
            per_audio_s[form].append(1000 * (time.process_time() - started) / STREAM_BENCH_SECONDS)
    windowed_ms, streaming_ms = (statistics.median(per_audio_s[form]) for form in ("windowed", "streaming"))
    return {"student": config.student.name, "student_parameters": count_parameters(student),
            "onnx_bytes": len(model), "stream_onnx_bytes": len(stream_model), "threads": 1,
            "ms_per_window": latency_ms(model, audio[:N_SAMPLES]), "hop_ms": config.training.eval_hop_ms,
            "ms_per_hop": hop_latency_ms(stream_model, audio[:hop]),
            "windowed_cpu_ms_per_audio_s": windowed_ms, "streaming_cpu_ms_per_audio_s": streaming_ms,
            "streaming_speedup": windowed_ms / streaming_ms}


# ---------------------------------------------------------------- the whole run


def machine(config: Config) -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": pick_device(config.training.device).type, "python": platform.python_version(),
            "torch": torch.__version__, "load_average_1m": os.getloadavg()[0]}


def run_bench(config: Config, *, clips: int = BENCH_CLIPS, teacher_source: str = "base", with_ray: bool = True,
              data: WakewordData | None = None) -> dict:
    """Every figure of the bench, as {part: {measure: value}}; with_ray=False leaves part (b) out."""
    data = subset(data or load_data(config.data), clips, seed=config.training.seed)
    report = {"machine": machine(config)}
    # (c) and (d) first: they take a second or less, and right after part (b)'s ray.shutdown() they read slower
    # (1.5-1.9x for (c) in two runs) while Ray's processes wind down.
    short = {"pipeline": pipeline_throughput(config, data), "onnx": onnx_latency(config)}
    with tempfile.TemporaryDirectory(prefix="kd_tune_bench_") as root:
        bench = bench_config(config, root=root, teacher_source=teacher_source)
        teacher = {"teacher": f"{TEACHER_ARCH} {teacher_source}",
                   "teacher_parameters": save_untrained_teacher(bench, data)}
        report["cache_vs_live"] = teacher | cache_vs_live(bench, data)
        if with_ray:
            report["ray_vs_plain"] = ray_vs_plain(bench, data, root=root)
    report |= short
    report["machine"]["load_average_1m_after"] = os.getloadavg()[0]
    return report


def format_report(report: dict) -> str:
    rows = [("part", "measure", "value")] + [(part, key, cell(value)) for part, figures in report.items()
                                             for key, value in figures.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)

