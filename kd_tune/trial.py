"""One sweep trial: a Tune function trainable that runs `fit` in a Ray Train V2 TorchTrainer.

`run_trial` builds the trial's config from the sampled parameters and launches `torch_trainer`; each Train worker
runs `train_worker`, a thin adapter around `kd_tune.train.fit` whose `ray_report` forwards every epoch's metrics and
checkpoint to `ray.train.report`. TuneReportCallback carries them back to Tune. `kd-tune bench` times the same
trainer and adapter.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from kd_tune.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from kd_tune.config import Config, validate
from kd_tune.space import trial_config
from kd_tune.storage import Storage
from kd_tune.train import Report, fit

log = logging.getLogger("kd_tune.trial")
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}  # the driver only waits; {"cpu": 0} alone is refused


def ray_report(**extra: Any) -> Report:
    """fit's `report` inside a Ray Train worker: metrics (plus `extra`) and the checkpoint go to ray.train.report."""

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, **extra}, checkpoint=checkpoint)

    return report


def torch_trainer(worker: Callable[[dict], Any], loop_config: dict, config: Config, *, storage_path: str,
                  name: str = "train", filesystem: pafs.FileSystem | None = None,
                  **run_options: Any) -> TorchTrainer:
    """A TorchTrainer of `worker` on the config's tune.workers_per_trial workers; run_options go to its RunConfig."""
    c = config.tune
    return TorchTrainer(
        worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=c.workers_per_trial, use_gpu=c.use_gpu,
                                               resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                       **run_options))


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: resume from the newest checkpoint that verifies, run `fit`, report every epoch."""
    config = validate(loop_config["config"])
    node = socket.gethostname() + ":" + ray.get_runtime_context().get_node_id()[:8]
    # The data set the sweep loaded once, from the object store: no clip is read or decoded again per trial.
    fit(config, ray_report(node=node), data=ray.get(loop_config["data"]),
        resume=verified_resume_point(ray.train.get_checkpoint()))


def verified_resume_point(ray_checkpoint) -> Checkpoint | None:
    """The newest checkpoint of this run that passes verification; refused ones are named and skipped."""
    if ray_checkpoint is None:
        return None
    parent, newest = ray_checkpoint.path.rstrip("/").rsplit("/", 1)
    store = Storage(ray_checkpoint.filesystem, parent)
    candidates = sorted((d for d in store.listdir(".") if d.startswith("checkpoint_")), reverse=True)
    for name in [newest] + [c for c in candidates if c < newest]:
        try:
            return load_checkpoint(store, name)
        except CheckpointError as e:
            log.warning("refusing checkpoint: %s; trying the previous one", e)
    raise CheckpointError(f"no checkpoint under {parent} passes verification")


def run_trial(params: dict, *, base: dict, experiment_path: str, shared: dict) -> None:
    """Tune function trainable: launch this trial's TorchTrainer (Train V2) and wait for it."""
    config = trial_config(validate(base), params)
    c = config.tune
    trainer = torch_trainer(
        train_worker, {"config": config.to_dict(), "data": shared["data"]}, config,
        # "train": stable per trial, or a restored sweep silently starts the trial over
        storage_path=f"{experiment_path}/{trial_dirname(tune.get_context().get_trial_id())}",
        filesystem=Storage.from_config(config.storage).filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.storage.keep_best,
                                                     checkpoint_score_attribute=c.metric,
                                                     checkpoint_score_order=c.mode),
        failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
        callbacks=[TuneReportCallback()])
    trainer.fit()


def trial_dirname(trial_id: str) -> str:
    return f"trial_{trial_id}"
