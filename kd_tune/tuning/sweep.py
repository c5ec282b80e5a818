"""`kd-tune sweep`: the driver. Ray Tune + Optuna search the distillation settings; each trial is kd_tune.tuning.trial.

The driver loads the data set once, puts it in Ray's object store, builds the teacher-output cache on Ray tasks and
runs a Tuner over `run_trial`. TensorBoard gets one run per trial with readable tags (kd_tune.metrics.METRICS).

A sweep never waits on what cannot come: a trial larger than the cluster is refused before it starts, and the
placement groups nobody will remove (tuning.placement) are removed when it starts, while it runs and when it ends.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs
import ray
import yaml
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.result import EXPR_PROGRESS_FILE
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kd_tune.config import Config, dump_config
from kd_tune.datasets.data import WakewordData, load_data
from kd_tune.errors import KdTuneError
from kd_tune.evaluation.leaderboard import LOG_NAME, leaderboard, write_leaderboard
from kd_tune.progress import progress_bar
from kd_tune.space import SearchSpace, SpaceSampler, trial_dirname, trial_id_of
from kd_tune.store.checkpoint import MANIFEST_NAME
from kd_tune.store.storage import Storage, check_layout, write_text
from kd_tune.training.cache import Job, build_cache, build_shard
from kd_tune.training.teachers import teacher_store
from kd_tune.training.train import check_batching
from kd_tune.tuning.board import TensorBoardCallback
from kd_tune.tuning.console import SweepProgress, console_stream, ray_output_to
from kd_tune.tuning.placement import remove_orphans, removing_lost
from kd_tune.tuning.ray_compat import (AUTOSCALER_NAMESPACE, AUTOSCALER_V2_KEY, cluster_config, internal_kv_get,
                                       stop_propagating_env_vars)
from kd_tune.tuning.trial import TRIAL_DRIVER_RESOURCES, run_trial

# A local Ray's start can miss its own RPC deadlines on a machine loaded to the hilt (measured: "Failed to get node
# info ... Deadline Exceeded" beside a full test run on 2 cores); a second start then succeeds.
LOCAL_START_TRIES = 2
log = logging.getLogger(__name__)
CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
# Environment that Ray reads, set for a sweep unless the user set it. Tune uploads the experiment state every 5 s
# (its default waits up to 300 s), so a killed driver loses little. Train's controller polls its workers every
# 0.2 s instead of 2 s: reports, and so a trial's end, reach Tune that much sooner at no measurable CPU cost
# (measured: a 2-report trial through Tune and Train 17.2 s -> 10.4 s; `kd-tune bench` part (b) for a real one).
# Tune and Train forward both variables to the trial and controller actors. Tune's strict metric check is off: a
# driver killed after a trial's last report but before Tune saved its end restores that trial, which then has no
# epoch left to report, and the check crashed `--resume` on its empty final result (tune.metric is validated, and
# reported every epoch, anyway).
RAY_SETTINGS = {"TUNE_GLOBAL_CHECKPOINT_S": "5", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}


AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # written by Ray's monitor (autoscaler v1)


class SweepError(KdTuneError, RuntimeError):
    """A sweep that cannot start as configured; the message says why and what to do."""

    exit_code = 2


class SweepInterrupted(KdTuneError):
    """A sweep stopped before every trial finished (Ctrl-C, SIGINT from `ray job stop`): Tune saved its state."""

    exit_code = 130  # as a shell reports a process ended by SIGINT


def unfinished_trials(grid, num_samples: int) -> int:
    """How many of a sweep's trials did not end: not started yet, or still running when Tune was stopped."""
    return num_samples - grid.num_terminated - grid.num_errors


# ---------------------------------------------------------------- TensorBoard: readable tags + HParams


class KeepHistory:
    """Tune logger mixin: a trial that starts again (a resumed sweep) appends to its file on storage.

    Tune copies a trial's result file back before appending only when the trial holds a Tune checkpoint, and Train
    trials never do: without this a resumed trial's result.json and progress.csv lost every row before the kill.
    """

    def _restore_from_remote(self, file_name: str, trial) -> None:
        local = Path(trial.local_path, file_name)
        if local.exists():
            return
        with contextlib.suppress(FileNotFoundError):  # a trial's first start
            pyarrow.fs.copy_files(f"{trial.storage.trial_fs_path}/{file_name}", str(local),
                                  source_filesystem=trial.storage.storage_filesystem)


class HistoryJsonLogger(KeepHistory, JsonLoggerCallback):
    """result.json, kept across resumes."""


class HistoryCSVLogger(KeepHistory, CSVLoggerCallback):
    """progress.csv, kept across resumes, in the columns of its first header."""

    def _setup_trial(self, trial) -> None:
        super()._setup_trial(trial)
        if self._trial_continue[trial]:
            with open(Path(trial.local_path, EXPR_PROGRESS_FILE), newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                self._trial_csv[trial] = csv.DictWriter(self._trial_files[trial], header)


# ---------------------------------------------------------------- what the cluster can host, what it leaked


def node_shapes() -> tuple[list[tuple[dict, float]], bool]:
    """(resources of a node, how many such nodes) for every alive node and every node type an autoscaler may add;
    and whether that list is complete (False: an autoscaler runs whose node types Ray does not publish)."""
    shapes: list[tuple[dict, float]] = [(n["Resources"], 1) for n in ray.nodes() if n["Alive"]]
    config = cluster_config()  # what Train's own check reads (autoscaler v2)
    if config is not None and config.node_group_configs:
        shapes += [(dict(g.resources), math.inf if g.max_count == -1 else g.max_count)
                   for g in config.node_group_configs]
        return shapes, True
    return shapes, not autoscaler_adds_nodes()


def autoscaler_adds_nodes() -> bool:
    """Whether an autoscaler that may add nodes runs. On a hand-started (`ray start`) cluster Ray's monitor mirrors
    each node as a node type named node_<id> and adds none; autoscaler v2 publishes its node types (above)."""
    v2 = internal_kv_get(AUTOSCALER_V2_KEY, namespace=AUTOSCALER_NAMESPACE)
    status = internal_kv_get(AUTOSCALER_STATUS_KEY)
    mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") if status else None
    return v2 == b"1" or any(not t.startswith("node_") for t in (mapping or {}).values())


def trials_that_fit(shapes: list[tuple[dict, float]], worker: dict[str, float], workers: int) -> float:
    """How many trials of `workers` Train workers, each needing `worker`, the nodes hold at once."""
    per_node = [(min(math.floor(shape.get(k, 0) / v + 1e-9) for k, v in worker.items()), count)
                for shape, count in shapes]
    slots = sum(n * count for n, count in per_node if n and count)  # no inf * 0
    return slots // workers if slots != math.inf else math.inf


def check_trial_fits(config: Config) -> float:
    """Refuse, before any trial starts, a trial whose Train workers the cluster cannot hold; returns how many trials
    it holds at once (inf where an autoscaler may add nodes of unknown size)."""
    c = config.tune
    worker = {"CPU": c.cpus_per_worker, **({"GPU": 1.0} if c.use_gpu else {})}
    shapes, complete = node_shapes()
    fit = trials_that_fit(shapes, worker, c.workers_per_trial)
    if fit >= 1 or not complete:
        return fit if complete else math.inf
    biggest = max((s for s, _ in shapes), key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    field = ("tune.use_gpu" if c.use_gpu and not any(s.get("GPU") for s, _ in shapes) else
             "tune.workers_per_trial" if trials_that_fit(shapes, worker, 1) else "tune.cpus_per_worker")
    largest = {k: biggest.get(k, 0) for k in ("CPU", "GPU")}
    raise SweepError(f"{field}: a trial needs {c.workers_per_trial} Train worker(s) of {worker}, more than the "
                     f"cluster holds (largest node: {largest}); allowed: workers_per_trial x cpus_per_worker "
                     "(and a GPU each with use_gpu) that the cluster's nodes fit")


# ---------------------------------------------------------------- the sweep driver


def connect_ray(address: str | None, *, log_to_driver: bool = True) -> None:
    """Join the cluster named by `address`/RAY_ADDRESS (e.g. under `ray job submit`), else start a local Ray.

    log_to_driver=False keeps the workers' output off this process's stdout (kept clean for `bench --json`).
    """

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
        return
    ours = "RAY_API_SERVER_ADDRESS" not in os.environ
    for attempt in range(1, LOCAL_START_TRIES + 1):
        port = free_port()
        if ours:  # Train V2's placement-group cleaner asks the State API; with another Ray on the host, name ours
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                     log_to_driver=log_to_driver)
            return
        except Exception as error:  # broad on purpose: Ray's start fails with several types under load
            ray.shutdown()  # stops whatever half of the local Ray did start
            if attempt == LOCAL_START_TRIES:
                raise
            log.warning("starting a local Ray failed (%s); trying once more", " ".join(str(error).split())[:200])


def apply_ray_settings() -> None:
    for name, value in RAY_SETTINGS.items():
        os.environ.setdefault(name, value)


def keep_credentials_out_of_runtime_env() -> None:
    """Stop Ray Tune copying the driver's AWS credentials into every trial's runtime_env.

    There the state API (`ray list actors --detail`, the dashboard) and the runtime-env agent's log show them in
    cleartext; trials take credentials from their node's environment instead, like every other Ray worker.
    """

    stop_propagating_env_vars(CREDENTIAL_ENV_VARS)


def free_port() -> int:
    """A local TCP port nothing listens on now (bound, then released); tests/ray_cluster.py uses it too."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_storage_shared(store: Storage) -> None:
    """Refuse, before any trial starts, a local storage path that some node of the cluster cannot see."""


    nodes = [n for n in ray.nodes() if n["Alive"]]
    if not store.is_local or len(nodes) < 2:
        return
    marker = f".kd_tune_probe_{uuid.uuid4().hex}"
    write_text(store, marker, "probe")
    try:
        probe = ray.remote(num_cpus=0)(os.path.exists)
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(store.local_path(marker)) for n in nodes])
    finally:
        store.filesystem.delete_file(store.path(marker))
    blind = [n["NodeManagerAddress"] + ":" + n["NodeID"][:8] for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise SweepError(f"storage.root {store.uri} is a local path that nodes {blind} cannot see: use s3://... "
                         "or a path on storage mounted at the same place on every node (NFS)")


def check_teachers_ready(config: Config, space: SearchSpace) -> None:
    """Every teacher the space may pick must be fine-tuned already: fail now, not in the first trial."""
    store = teacher_store(config)
    missing = [t for t in space.teacher_names if not store.exists(f"{t}/{MANIFEST_NAME}")]
    if missing:
        raise SweepError(f"teachers {missing} have no checkpoint under {store.uri}: run `kd-tune teacher train "
                         "CONFIG` first (or point storage.teachers at where they are)")


def coverage_points(space: SearchSpace, num_samples: int) -> list[dict]:
    """The first trials pair every teacher and every alpha schedule at least once; TPE samples the rest."""
    teachers, schedules = space.teacher.choices, space.alpha_schedule.choices
    n = min(num_samples, max(len(teachers), len(schedules)))
    return [{"teacher": teachers[i % len(teachers)], "alpha_schedule": schedules[i % len(schedules)]}
            for i in range(n)]


def trial_trainable(config: Config, store: Storage, name: str, data_ref):
    """`run_trial` with this sweep's base config, experiment path and data, and the trial driver's resources."""

    # The reference travels inside a dict: with_parameters would fetch a bare one into every trial driver.
    trainable = tune.with_parameters(run_trial, base=config.to_dict(), experiment_path=f"{store.root}/{name}",
                                     shared={"data": data_ref})
    return tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)


def build_tuner(config: Config, space: SearchSpace, *, name: str, data_ref, concurrency: int,
                progress: SweepProgress | None):
    store = Storage.from_config(config.storage)
    c = config.tune
    # The Optuna study stays in memory: an external study storage breaks Tuner.restore.
    search = OptunaSearch(SpaceSampler(space), metric=c.metric, mode=c.mode, sampler=TPESampler(seed=c.seed),
                          points_to_evaluate=coverage_points(space, c.num_samples))
    # The reported epoch, not Tune's training_iteration: a resumed trial starts counting iterations at 1 again.
    asha = ASHAScheduler(time_attr="epoch", max_t=config.training.epochs,
                         grace_period=min(c.asha_grace_period, config.training.epochs),
                         reduction_factor=c.asha_reduction_factor)
    return tune.Tuner(
        trial_trainable(config, store, name, data_ref),
        tune_config=tune.TuneConfig(metric=c.metric, mode=c.mode, search_alg=search, scheduler=asha,
                                    num_samples=c.num_samples, max_concurrent_trials=concurrency,
                                    trial_dirname_creator=lambda trial: trial_dirname(trial.trial_id, trial.config),
                                    trial_name_creator=lambda trial: trial_dirname(trial.trial_id, trial.config)),
        run_config=tune.RunConfig(name=name, storage_path=store.root, storage_filesystem=store.filesystem,
                                  failure_config=tune.FailureConfig(max_failures=c.max_failures),
                                  callbacks=[TensorBoardCallback(config, space), HistoryJsonLogger(),
                                             HistoryCSVLogger(), *([progress] if progress else [])],
                                  verbose=0 if progress else 1),
    )


def sweep(config: Config, space: SearchSpace, *, name: str, address: str | None = None, resume: bool = False,
          data: WakewordData | None = None, verbose: bool = False) -> tuple[list[dict], list[str]]:
    """Run (or resume) a sweep on `data` (default: read from data.root); returns the leaderboard rows and the
    errors of trials that failed.

    Unless verbose, the console shows one progress line and Ray's own output goes to <experiment>/sweep.log.
    """
    apply_ray_settings()
    store = Storage.from_config(config.storage)
    check_layout(store, teacher_store(config), run=name)  # an experiment never lands on the teachers or the cache
    check_teachers_ready(config, space)
    data = data or load_data(config.data)  # once per sweep; every trial gets it from the object store
    check_batching(len(data.train.labels), workers=config.tune.workers_per_trial)
    with sweep_log(store, name, verbose=verbose) as log_path, ray_output_to(log_path):
        started_ray = not ray.is_initialized()
        try:
            progress = None if verbose else SweepProgress(total=config.tune.num_samples, metric=config.tune.metric,
                                                          mode=config.tune.mode, epochs=config.training.epochs)
            grid = run_tuner(config, space, store, name=name, address=address, resume=resume, data=data,
                             progress=progress)
        finally:
            if started_ray:  # here, so that no late actor line of Ray's reaches the console after the results
                ray.shutdown()
    rows = leaderboard(grid, config)
    write_leaderboard(store, name, rows)
    if (left := unfinished_trials(grid, config.tune.num_samples)) > 0:
        raise SweepInterrupted(f"sweep {store.root}/{name} interrupted with {left} of {config.tune.num_samples} "
                               f"trials unfinished; its state is saved: resume it with "
                               f"`kd-tune sweep --resume {store.root}/{name}`")
    return rows, [trial_error(r) for r in grid if r.error is not None]


def run_tuner(config: Config, space: SearchSpace, store: Storage, *, name: str, address: str | None, resume: bool,
              data: WakewordData, progress: SweepProgress | None):
    connect_ray(address)
    keep_credentials_out_of_runtime_env()
    concurrency = concurrent_trials(config, check_trial_fits(config))
    check_storage_shared(store)
    remove_orphans()
    data_ref = ray.put(data)
    if config.distillation.teacher_mode == "cache":  # every teacher pass of the sweep happens here, once
        started, teachers = time.perf_counter(), space.teacher_names
        build_cache(config, teachers, data=data, run=shards_on_ray(data_ref))
        (progress.note if progress else log.info)(f"teacher cache: ready for {', '.join(teachers)} "
                                                  f"({time.perf_counter() - started:.0f} s)")
    if resume:
        tuner = tune.Tuner.restore(f"{store.root}/{name}", trial_trainable(config, store, name, data_ref),
                                   resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=store.filesystem)
    else:
        write_text(store, f"{name}/config.yaml", dump_config(config))
        write_text(store, f"{name}/search_space.yaml", yaml.safe_dump(space.model_dump(), sort_keys=False))
        tuner = build_tuner(config, space, name=name, data_ref=data_ref, concurrency=concurrency, progress=progress)
    try:
        with removing_lost():
            return tuner.fit()
    finally:
        remove_orphans(own_job=True)


@contextlib.contextmanager
def sweep_log(store: Storage, name: str, *, verbose: bool) -> Iterator[Path | None]:
    """Where Ray's output goes: <experiment>/sweep.log (on S3 written locally first and uploaded at the end). A sweep
    refused before it wrote its experiment leaves no folder behind: the refusal itself is the message."""
    if verbose:
        yield None
        return
    fresh = not store.exists(name)
    if store.is_local:
        try:
            yield Path(store.local_path(name, LOG_NAME))
        finally:
            if fresh and store.exists(name) and store.listdir(name) == [LOG_NAME]:
                store.delete_dir(name)
        return
    with tempfile.TemporaryDirectory(prefix="kd_tune_log_") as tmp:
        try:
            yield Path(tmp, LOG_NAME)
        finally:
            if Path(tmp, LOG_NAME).exists() and store.exists(name):
                store.write_bytes(f"{name}/{LOG_NAME}", Path(tmp, LOG_NAME).read_bytes())


def trial_error(result, *, max_chars: int = 500) -> str:
    """One line per failed trial: the exception the trial raised (not Ray's wrapper with its traceback)."""
    cause = getattr(result.error, "cause", None) or result.error
    lines = [line for line in str(cause).splitlines() if line.strip()] or [""]
    trial = trial_id_of(Path(result.path).name)
    return f"trial {trial}: {type(cause).__name__}: {lines[-1].strip()[:max_chars]}"


def concurrent_trials(config: Config, fit: float) -> int:
    """tune.max_concurrent_trials, lowered to what the cluster holds at once: a trial beyond that would wait for
    workers and, after Train's bounded start retries, fail."""
    wanted = config.tune.max_concurrent_trials
    if fit < wanted:
        log.warning("tune.max_concurrent_trials=%d but the cluster holds %d trial(s) at once: running %d at a time",
                    wanted, fit, fit)
    return int(min(wanted, fit))


# ---------------------------------------------------------------- the teacher-output cache on Ray tasks


def shards_on_ray(data_ref: ray.ObjectRef):
    """kd_tune.training.cache's shard runner: one Ray task of 1 CPU per shard, the data from the object store."""

    def run(config: Config, jobs: list[Job], data: WakewordData) -> None:
        task = ray.remote(num_cpus=1)(build_shard)
        # Ray's stubs take .remote's arguments by position only; a keyword reaches build_shard as well
        pending = {task.remote(config, name, shard, key, data=data_ref): f"{name}/{shard}"  # type: ignore[call-arg]
                   for name, shard, key in jobs}
        # on the console, not stderr: that goes to sweep.log while the sweep runs (kd_tune.tuning.console.ray_output_to)
        with progress_bar(len(pending), "teacher cache", "shard", enabled=bool(pending),
                          stream=console_stream()) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                shard = pending.pop(done[0])
                try:
                    ray.get(done[0])
                except ray.exceptions.RayTaskError as error:
                    for ref in pending:
                        ray.cancel(ref)
                    raise RuntimeError(f"building teacher-cache shard {shard} failed: {error}") from error
                bar.update(1)

    return run
