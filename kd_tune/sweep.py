"""`kd-tune sweep`: the driver. Ray Tune + Optuna search the distillation settings; each trial is kd_tune.trial.

The driver loads the data set once, puts it in Ray's object store, builds the teacher-output cache on Ray tasks and
runs a Tuner over `run_trial`. TensorBoard gets one run per trial with readable tags (kd_tune.metrics.METRICS).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

import ray
import yaml
from tqdm import tqdm
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.execution import class_cache
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kd_tune.cache import Job, build_cache, build_shard
from kd_tune.checkpoint import MANIFEST_NAME
from kd_tune.config import Config
from kd_tune.data import WakewordData, load_dataset
from kd_tune.errors import KdTuneError
from kd_tune.leaderboard import leaderboard, write_leaderboard
from kd_tune.metrics import METRICS
from kd_tune.space import SearchSpace, SpaceSampler
from kd_tune.storage import Storage, write_text
from kd_tune.teachers import teacher_checkpoint_dir
from kd_tune.trial import TRIAL_DRIVER_RESOURCES, run_trial, trial_dirname

log = logging.getLogger("kd_tune.sweep")
CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
# Environment that Ray reads, set for a sweep unless the user set it. Tune uploads the experiment state every 5 s
# (its default waits up to 300 s), so a killed driver loses little. Train's controller polls its workers every
# 0.2 s instead of 2 s: reports, and so a trial's end, reach Tune that much sooner at no measurable CPU cost
# (measured: a 2-report trial through Tune and Train 17.2 s -> 10.4 s; `kd-tune bench` part (b) for a real one).
# Tune and Train forward both variables to the trial and controller actors.
RAY_SETTINGS = {"TUNE_GLOBAL_CHECKPOINT_S": "5", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


class SweepError(KdTuneError, RuntimeError):
    """A sweep that cannot start as configured; the message says why and what to do."""


# ---------------------------------------------------------------- TensorBoard: readable tags + HParams


class TensorBoardCallback(TBXLoggerCallback):
    """One TensorBoard run per trial: every metric of kd_tune.metrics.METRICS under its tag; HParams at the end."""

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        step = result.get("epoch", iteration)
        scalars = {METRICS[k].tag: v for k, v in result.items() if k in METRICS and isinstance(v, (int, float))}
        for tag, value in scalars.items():
            self._trial_writer[trial].add_scalar(tag, value, global_step=step)
        self._trial_result[trial] = scalars
        self._trial_writer[trial].flush()


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
    port = free_port()
    # Train V2's placement-group cleaner asks the State API; with another Ray on the host it must be told which.
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=log_to_driver)


def apply_ray_settings() -> None:
    for name, value in RAY_SETTINGS.items():
        os.environ.setdefault(name, value)


def keep_credentials_out_of_runtime_env() -> None:
    """Stop Ray Tune copying the driver's AWS credentials into every trial's runtime_env.

    There the state API (`ray list actors --detail`, the dashboard) and the runtime-env agent's log show them in
    cleartext; trials take credentials from their node's environment instead, like every other Ray worker.
    """

    class_cache.ENV_VARS_TO_PROPAGATE -= set(CREDENTIAL_ENV_VARS)


def free_port() -> int:
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
    blind = [n["NodeManagerAddress"] + ":" + n["NodeID"][:8] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise SweepError(f"storage.root {store.uri} is a local path that nodes {blind} cannot see: use s3://... "
                         "or a path on storage mounted at the same place on every node (NFS)")


def check_teachers_ready(config: Config, space: SearchSpace) -> None:
    """Every teacher the space may pick must be fine-tuned already: fail now, not in the first trial."""
    store = Storage.from_config(config.storage)
    missing = [t for t in space.teacher.choices
               if not store.exists(f"{teacher_checkpoint_dir(t)}/{MANIFEST_NAME}")]
    if missing:
        raise SweepError(f"teachers {missing} have no checkpoint under {store.uri}/teachers: run "
                         "`kd-tune teacher train CONFIG` first")


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


def build_tuner(config: Config, space: SearchSpace, *, name: str, data_ref):
    store = Storage.from_config(config.storage)
    c = config.tune
    # The Optuna study stays in memory: an external study storage breaks Tuner.restore.
    search = OptunaSearch(SpaceSampler(space), metric=c.metric, mode=c.mode, sampler=TPESampler(seed=c.seed),
                          points_to_evaluate=coverage_points(space, c.num_samples))
    asha = ASHAScheduler(time_attr="training_iteration", max_t=config.training.epochs,
                         grace_period=min(c.asha_grace_period, config.training.epochs),
                         reduction_factor=c.asha_reduction_factor)
    return tune.Tuner(
        trial_trainable(config, store, name, data_ref),
        tune_config=tune.TuneConfig(metric=c.metric, mode=c.mode, search_alg=search, scheduler=asha,
                                    num_samples=c.num_samples, max_concurrent_trials=c.max_concurrent_trials,
                                    trial_dirname_creator=lambda trial: trial_dirname(trial.trial_id)),
        run_config=tune.RunConfig(name=name, storage_path=store.root, storage_filesystem=store.filesystem,
                                  failure_config=tune.FailureConfig(max_failures=c.max_failures),
                                  callbacks=[TensorBoardCallback()], verbose=1),
    )


def sweep(config: Config, space: SearchSpace, *, name: str, address: str | None = None, resume: bool = False,
          data: WakewordData | None = None) -> tuple[list[dict], list[str]]:
    """Run (or resume) a sweep on `data` (default: read from data.root); returns the leaderboard rows and the
    errors of trials that failed."""
    apply_ray_settings()
    store = Storage.from_config(config.storage)
    check_teachers_ready(config, space)
    data = data or load_dataset(config.data.root)  # once per sweep; every trial gets it from the object store
    connect_ray(address)
    keep_credentials_out_of_runtime_env()
    check_storage_shared(store)
    data_ref = ray.put(data)
    if config.distillation.teacher_mode == "cache":  # every teacher pass of the sweep happens here, once
        build_cache(config, list(space.teacher.choices), data=data, run=shards_on_ray(data_ref))
    if resume:
        tuner = tune.Tuner.restore(f"{store.root}/{name}", trial_trainable(config, store, name, data_ref),
                                   resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=store.filesystem)
    else:
        write_text(store, f"{name}/config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        write_text(store, f"{name}/search_space.yaml", yaml.safe_dump(space.model_dump(), sort_keys=False))
        tuner = build_tuner(config, space, name=name, data_ref=data_ref)
    grid = tuner.fit()
    rows = leaderboard(grid, config)
    write_leaderboard(store, name, rows)
    errors = [f"trial {r.metrics.get('trial_id', '?')}: {type(r.error).__name__}: {r.error}"
              for r in grid if r.error is not None]
    return rows, errors


# ---------------------------------------------------------------- the teacher-output cache on Ray tasks


def shards_on_ray(data_ref: ray.ObjectRef):
    """kd_tune.cache's shard runner: one Ray task of 1 CPU per shard, the data from the object store."""

    def run(config: Config, jobs: list[Job], data: WakewordData) -> None:
        task = ray.remote(num_cpus=1)(build_shard)
        pending = {task.remote(config, name, shard, key, data=data_ref): f"{name}/{shard}" for name, shard, key in jobs}
        with tqdm(total=len(pending), desc="teacher cache", unit="shard", disable=not pending) as bar:
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
