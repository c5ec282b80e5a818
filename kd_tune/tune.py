"""`kd-tune sweep`: Ray Tune + Optuna search the distillation settings; each trial is a Ray Train run of `fit`.

Layers, outside in: the sweep driver (`sweep`) loads the data set once, puts it in Ray's object store and builds a
Tuner over `run_trial`, a Tune function trainable that launches a TorchTrainer; its workers call `train_worker`, a
thin adapter around `kd_tune.train.fit` that forwards each epoch's metrics and checkpoint to `ray.train.report`.
TuneReportCallback carries them back to Tune.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import yaml
from pyarrow.fs import FileType
from pydantic import Field, ValidationError, model_validator

from kd_tune import storage
from kd_tune.cache import build_cache
from kd_tune.config import Config, ConfigError, Section, format_problem, validate
from kd_tune.data import WakewordData, load_dataset
from kd_tune.distill import ALPHA_SCHEDULES, TEMPERATURE_SCHEDULES
from kd_tune.train import scalar_tag, teacher_checkpoint_dir

log = logging.getLogger("kd_tune.tune")
SEARCH_SPACE_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
# Environment that Ray reads, set for a sweep unless the user set it. Tune uploads the experiment state every 5 s
# (its default waits up to 300 s), so a killed driver loses little. Train's controller polls its workers every
# 0.2 s instead of 2 s: reports, and so a trial's end, reach Tune that much sooner at no measurable CPU cost
# (measured: a 2-report trial through Tune and Train 17.2 s -> 10.4 s; `kd-tune bench` part (b) for a real one).
# Tune and Train forward both variables to the trial and controller actors.
RAY_SETTINGS = {"TUNE_GLOBAL_CHECKPOINT_S": "5", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}  # the driver only waits; {"cpu": 0} alone is refused
CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
LEADERBOARD_COLUMNS = ("trial", "status", "teacher", "alpha_schedule", "alpha_start", "alpha_end", "temperature",
                       "temperature_schedule", "lr", "student_width", "epochs", "frr_at_target_fa", "fa_per_hour",
                       "accuracy", "auc", "eer", "student_loss", "distillation_loss", "threshold", "node",
                       "checkpoint")


class SweepError(RuntimeError):
    """A sweep that cannot start as configured; the message says why and what to do."""


# ---------------------------------------------------------------- search spaces: YAML data -> Optuna define-by-run


class Choice(Section):
    choices: list[str | float] = Field(min_length=1)

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, self.choices)


class Range(Section):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be < high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)


class SearchSpace(Section):
    """What a sweep searches; every key maps to one config field (see TARGETS)."""

    teacher: Choice
    alpha_schedule: Choice
    alpha_start: Range
    alpha_end: Range | None = None  # sampled only for a non-constant schedule
    alpha_step_point: Range | None = None  # sampled only for the step schedule
    temperature: Range
    temperature_schedule: Choice | None = None
    temperature_end: Range | None = None  # sampled only for a non-constant temperature schedule
    lr: Range | None = None
    weight_decay: Range | None = None
    student_width: Choice | None = None

    @model_validator(mode="after")
    def _values_allowed(self) -> SearchSpace:
        _subset("alpha_schedule", self.alpha_schedule.choices, ALPHA_SCHEDULES)
        if self.temperature_schedule:
            _subset("temperature_schedule", self.temperature_schedule.choices, TEMPERATURE_SCHEDULES)
        for name in ("alpha_start", "alpha_end", "alpha_step_point"):
            r = getattr(self, name)
            if r and not (0 <= r.low and r.high <= 1):
                raise ValueError(f"{name}: [{r.low}, {r.high}] must lie within [0, 1]")
        if self.temperature.low <= 0:
            raise ValueError(f"temperature.low {self.temperature.low} must be > 0")
        if "step" in self.alpha_schedule.choices and not self.alpha_step_point:
            raise ValueError("alpha_step_point: required when alpha_schedule may be 'step'")
        return self

    def check_teachers(self, config: Config, *, source: str) -> None:
        known = [t.name for t in config.teachers]
        unknown = [t for t in self.teacher.choices if t not in known]
        if unknown:
            raise ConfigError(source, [f"teacher.choices: {unknown} are not configured teachers (allowed: {known})"])


def _subset(name: str, values: list, allowed: tuple) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name}.choices: {bad} not allowed (allowed: {', '.join(allowed)})")


def load_search_space(path: str | Path) -> SearchSpace:
    """A YAML search space; a bare name like `smoke` means search_spaces/smoke.yaml."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (SEARCH_SPACE_DIR / f"{path}.yaml").exists():
        path = SEARCH_SPACE_DIR / f"{path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(str(path), [f"cannot read the search space: {e}"]) from None
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(str(path), [format_problem(err) for err in e.errors()]) from None


class SpaceSampler:
    """Optuna define-by-run function: conditional parameters are sampled only where their schedule uses them."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> None:
        s = self.space
        s.teacher.suggest(trial, "teacher")
        schedule = s.alpha_schedule.suggest(trial, "alpha_schedule")
        s.alpha_start.suggest(trial, "alpha_start")
        if schedule != "constant" and s.alpha_end:
            s.alpha_end.suggest(trial, "alpha_end")
        if schedule == "step":
            s.alpha_step_point.suggest(trial, "alpha_step_point")
        s.temperature.suggest(trial, "temperature")
        if s.temperature_schedule and s.temperature_schedule.suggest(trial, "temperature_schedule") != "constant":
            s.temperature_end.suggest(trial, "temperature_end")
        for name in ("lr", "weight_decay", "student_width"):
            if getattr(s, name):
                getattr(s, name).suggest(trial, name)


TARGETS = {  # search-space parameter -> (config section, key, how the value is stored)
    "teacher": ("distillation", "teachers", lambda v: [v]),
    "alpha_schedule": ("distillation", "alpha_schedule", str),
    "alpha_start": ("distillation", "alpha_start", float),
    "alpha_end": ("distillation", "alpha_end", float),
    "alpha_step_point": ("distillation", "alpha_step_points", lambda v: [v]),
    "temperature": ("distillation", "temperature_start", float),
    "temperature_schedule": ("distillation", "temperature_schedule", str),
    "temperature_end": ("distillation", "temperature_end", float),
    "lr": ("training", "lr", float),
    "weight_decay": ("training", "weight_decay", float),
    "student_width": ("student", "width", float),
}


def trial_config(base: dict, params: dict[str, Any]) -> Config:
    """The base config with one trial's parameters; constant schedules keep their start value throughout."""
    raw = json.loads(json.dumps(base))
    for name, value in params.items():
        section, key, convert = TARGETS[name]
        raw[section][key] = convert(value)
    d = raw["distillation"]
    if params.get("alpha_schedule") == "constant" or "alpha_end" not in params:
        d["alpha_end"] = d["alpha_start"]
    if params.get("temperature_schedule", "constant") == "constant" or "temperature_end" not in params:
        d["temperature_end"] = d["temperature_start"]
    return validate(raw, source=f"trial parameters {params}")


# ---------------------------------------------------------------- inside a trial


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: resume from the newest checkpoint that verifies, run `fit`, report every epoch."""
    import ray
    import ray.train

    from kd_tune.train import fit

    config = validate(loop_config["config"])
    node = socket.gethostname() + ":" + ray.get_runtime_context().get_node_id()[:8]

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, "node": node}, checkpoint=checkpoint)

    # The data set the sweep loaded once, from the object store: no clip is read or decoded again per trial.
    fit(config, report, data=ray.get(loop_config["data"]), resume=verified_resume_point(ray.train.get_checkpoint()))


def verified_resume_point(ray_checkpoint) -> storage.Checkpoint | None:
    """The newest checkpoint of this run that passes verification; refused ones are named and skipped."""
    if ray_checkpoint is None:
        return None
    parent, newest = ray_checkpoint.path.rstrip("/").rsplit("/", 1)
    store = storage.Storage(ray_checkpoint.filesystem, parent)
    candidates = sorted((d for d in store.listdir(".") if d.startswith("checkpoint_")), reverse=True)
    for name in [newest] + [c for c in candidates if c < newest]:
        try:
            return storage.load_checkpoint(store, name)
        except storage.CheckpointError as e:
            log.warning("refusing checkpoint: %s; trying the previous one", e)
    raise storage.CheckpointError(f"no checkpoint under {parent} passes verification")


def run_trial(params: dict, *, base: dict, experiment_path: str, shared: dict) -> None:
    """Tune function trainable: launch this trial's TorchTrainer (Train V2) and wait for it."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    config = trial_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    store = storage.Storage.from_config(config.storage)
    c = config.tune
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "data": shared["data"]},
        scaling_config=ray.train.ScalingConfig(num_workers=c.workers_per_trial, use_gpu=c.use_gpu,
                                               resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name="train",  # stable per trial, or a restored sweep silently starts the trial over
            storage_path=f"{experiment_path}/{trial_dirname(trial_id)}",
            storage_filesystem=store.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.storage.keep_best,
                                                         checkpoint_score_attribute=c.metric,
                                                         checkpoint_score_order=c.mode),
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def trial_dirname(trial_id: str) -> str:
    return f"trial_{trial_id}"


# ---------------------------------------------------------------- TensorBoard: readable tags + HParams


def tensorboard_callback():
    from ray.tune.logger import TBXLoggerCallback

    class TensorBoardCallback(TBXLoggerCallback):
        """One TensorBoard run per trial: scalars under loss/, schedule/ and val/; HParams when the trial ends."""

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            if trial not in self._trial_writer:
                self.log_trial_start(trial)
            step = result.get("epoch", iteration)
            scalars = {scalar_tag(k): v for k, v in result.items()
                       if k in TRAINED_METRICS and isinstance(v, (int, float))}
            for tag, value in scalars.items():
                self._trial_writer[trial].add_scalar(tag, value, global_step=step)
            self._trial_result[trial] = scalars
            self._trial_writer[trial].flush()

    return TensorBoardCallback()


TRAINED_METRICS = ("total_loss", "student_loss", "distillation_loss", "alpha", "temperature", "lr", "skipped_steps",
                   "epoch_seconds", "accuracy", "auc", "eer", "threshold", "frr_at_target_fa", "fa_per_hour")


# ---------------------------------------------------------------- the sweep driver


def connect_ray(address: str | None, *, log_to_driver: bool = True) -> None:
    """Join the cluster named by `address`/RAY_ADDRESS (e.g. under `ray job submit`), else start a local Ray.

    log_to_driver=False keeps the workers' output off this process's stdout (kept clean for `bench --json`).
    """
    import ray

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
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE -= set(CREDENTIAL_ENV_VARS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_storage_shared(store: storage.Storage) -> None:
    """Refuse, before any trial starts, a local storage path that some node of the cluster cannot see."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if not store.is_local or len(nodes) < 2:
        return
    marker = f".kd_tune_probe_{uuid.uuid4().hex}"
    storage.write_text(store, marker, "probe")
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
    store = storage.Storage.from_config(config.storage)
    missing = [t for t in space.teacher.choices
               if not store.exists(f"{teacher_checkpoint_dir(t)}/{storage.MANIFEST_NAME}")]
    if missing:
        raise SweepError(f"teachers {missing} have no checkpoint under {store.uri}/teachers: run "
                                "`kd-tune teacher train CONFIG` first")


def coverage_points(space: SearchSpace, num_samples: int) -> list[dict]:
    """The first trials pair every teacher and every alpha schedule at least once; TPE samples the rest."""
    teachers, schedules = space.teacher.choices, space.alpha_schedule.choices
    n = min(num_samples, max(len(teachers), len(schedules)))
    return [{"teacher": teachers[i % len(teachers)], "alpha_schedule": schedules[i % len(schedules)]}
            for i in range(n)]


def trial_trainable(config: Config, store: storage.Storage, name: str, data_ref):
    """`run_trial` with this sweep's base config, experiment path and data, and the trial driver's resources."""
    from ray import tune

    # The reference travels inside a dict: with_parameters would fetch a bare one into every trial driver.
    trainable = tune.with_parameters(run_trial, base=config.to_dict(), experiment_path=f"{store.root}/{name}",
                                     shared={"data": data_ref})
    return tune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)


def build_tuner(config: Config, space: SearchSpace, *, name: str, data_ref):
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    store = storage.Storage.from_config(config.storage)
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
                                  callbacks=[tensorboard_callback()], verbose=1),
    )


def sweep(config: Config, space: SearchSpace, *, name: str, address: str | None = None, resume: bool = False,
          data: WakewordData | None = None) -> tuple[list[dict], list[str]]:
    """Run (or resume) a sweep on `data` (default: read from data.root); returns the leaderboard rows and the
    errors of trials that failed."""
    import ray
    from ray import tune

    apply_ray_settings()
    store = storage.Storage.from_config(config.storage)
    check_teachers_ready(config, space)
    data = data or load_dataset(config.data.root)  # once per sweep; every trial gets it from the object store
    connect_ray(address)
    keep_credentials_out_of_runtime_env()
    check_storage_shared(store)
    data_ref = ray.put(data)
    if config.distillation.teacher_mode == "cache":  # every teacher pass of the sweep happens here, once
        build_cache(config, list(space.teacher.choices), data=data, data_ref=data_ref)
    if resume:
        tuner = tune.Tuner.restore(f"{store.root}/{name}", trial_trainable(config, store, name, data_ref),
                                   resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=store.filesystem)
    else:
        storage.write_text(store, f"{name}/config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        storage.write_text(store, f"{name}/search_space.yaml", yaml.safe_dump(space.model_dump(), sort_keys=False))
        tuner = build_tuner(config, space, name=name, data_ref=data_ref)
    grid = tuner.fit()
    rows = leaderboard(grid, config)
    write_leaderboard(store, name, rows)
    errors = [f"trial {r.metrics.get('trial_id', '?')}: {type(r.error).__name__}: {r.error}"
              for r in grid if r.error is not None]
    return rows, errors


# ---------------------------------------------------------------- results


def leaderboard(grid, config: Config) -> list[dict]:
    """One row per trial at its best epoch that still has a checkpoint (retention may have pruned others)."""
    metric, mode = config.tune.metric, config.tune.mode
    filesystem = storage.Storage.from_config(config.storage).filesystem
    rows = []
    for result in grid:
        params = result.config or {}
        row = {"trial": Path(result.path).name.removeprefix("trial_"), "status": "ERROR" if result.error else "OK",
               "teacher": params.get("teacher"), "alpha_schedule": params.get("alpha_schedule"),
               "alpha_start": params.get("alpha_start"),
               "alpha_end": params.get("alpha_end", params.get("alpha_start")),
               "temperature": params.get("temperature"),
               "temperature_schedule": params.get("temperature_schedule", "constant"),
               "lr": params.get("lr", config.training.lr),
               "student_width": params.get("student_width", config.student.width)}
        best = best_epoch(result.metrics_dataframe, metric, mode, filesystem)
        if best is not None:
            row |= {k: _plain(best[k]) for k in LEADERBOARD_COLUMNS if k in best and k not in row}
            row["epochs"] = int(result.metrics_dataframe["training_iteration"].max())
            row["checkpoint"] = best["checkpoint_path"]
        rows.append(row)
    worst = float("inf") if mode == "min" else float("-inf")
    return sorted(rows, key=lambda r: r.get(metric, worst) if mode == "min" else -r.get(metric, worst))


def best_epoch(df, metric: str, mode: str, filesystem):
    """The best reported epoch whose checkpoint still exists; ties go to the later epoch."""
    if df is None or metric not in df or "checkpoint_path" not in df:
        return None
    ranked = df.sort_values([metric, "training_iteration"], ascending=[mode == "min", False])
    for _, row in ranked.iterrows():
        path = row["checkpoint_path"]
        if isinstance(path, str) and filesystem.get_file_info(path).type != FileType.NotFound:
            return row
    return None


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def write_leaderboard(store: storage.Storage, name: str, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(store, f"{name}/leaderboard.csv", out.getvalue())
    storage.write_text(store, f"{name}/leaderboard.json", json.dumps(rows, indent=2, default=str))


def read_leaderboard(experiment: str, config: Config) -> list[dict]:
    store, name = experiment_storage(experiment, config)
    return json.loads(storage.read_text(store, f"{name}/leaderboard.json"))


def load_experiment(experiment: str, base: Config) -> tuple[Config, SearchSpace, str]:
    """The config, search space and name saved by the sweep that wrote `experiment` (storage settings from base)."""
    store, name = experiment_storage(experiment, base)
    raw = yaml.safe_load(storage.read_text(store, f"{name}/config.yaml"))
    raw["storage"] = base.storage.model_copy(update={"root": store.uri}).model_dump()
    config = validate(raw, source=f"{experiment}/config.yaml")
    space = SearchSpace.model_validate(yaml.safe_load(storage.read_text(store, f"{name}/search_space.yaml")))
    return config, space, name


def experiment_storage(experiment: str, config: Config) -> tuple[storage.Storage, str]:
    """Split `PATH_OR_URI/NAME` into the storage root and the experiment name."""
    root, _, name = experiment.rstrip("/").rpartition("/")
    cfg = config.storage.model_copy(update={"root": root or "."})
    return storage.Storage.from_config(cfg), name


def format_leaderboard(rows: list[dict], *, metric: str) -> str:
    cols = ("trial", "status", "teacher", "alpha_schedule", "alpha_start", "alpha_end", "temperature", metric,
            "fa_per_hour", "accuracy", "auc", "epochs", "checkpoint")
    cols = tuple(dict.fromkeys(cols))
    table = [cols] + [tuple(_cell(r.get(c)) for c in cols) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
