"""One sweep trial: a Tune function trainable that runs `fit` in a Ray Train V2 TorchTrainer.

`run_trial` builds the trial's config from the sampled parameters and launches `torch_trainer`; each Train worker
runs `train_worker`, a thin adapter around `training.train.fit` whose `ray_report` forwards every epoch's metrics and
checkpoint to `ray.train.report`. TuneReportCallback carries them back to Tune. `kd-tune bench` times the same
trainer and adapter.

A trial ends without leaving its Train placement group behind: when Tune stops it (ASHA, a stopped sweep), the
trial aborts its Train run first (`AbortTrainOnStop`), so Train removes its own workers and placement group instead
of racing the trial's death. A worker group that cannot start fails the trial after TRAIN_START_RETRIES retries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray import tune
from ray.train import ControllerError
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from kd_tune.config import Config, validate
from kd_tune.errors import KdTuneError
from kd_tune.space import trial_config
from kd_tune.space import trial_dirname  # noqa: F401  # where the Tune state of older sweeps (tuner.pkl) finds it
from kd_tune.store.checkpoint import Checkpoint, CheckpointError, Identity, load_checkpoint
from kd_tune.store.storage import Storage
from kd_tune.training.resume import STUDENT_KIND
from kd_tune.tuning.ray_compat import (WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, WorkerGroupStartupTimeoutError,
                                       run_train_controller)

if TYPE_CHECKING:
    from kd_tune.training.train import Report

log = logging.getLogger(__name__)
# The driver only waits; {"cpu": 0} alone is refused
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"cpu": 0, "memory": 256 * 2**20}
# Train retries a worker group that does not start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default)
# without end by default. 4 retries: 5 minutes on Ray's default, long enough for an autoscaler to add a node.
TRAIN_START_RETRIES = 4
ABORT_TIMEOUT_S = 30.0  # Train's abort stops the workers and removes the placement group: seconds at most


class TrialStartError(KdTuneError, RuntimeError):
    """A trial's Train workers could not start: the message says what they need and for how long it waited."""


class AbortableTorchTrainer(TorchTrainer):
    """A TorchTrainer whose running Train controller `RUNNING.abort` can reach from another thread.

    Train V2 keeps the controller's handle to itself; this runs Ray's own `_initialize_and_run_controller`, copied
    into kd_tune.tuning.ray_compat.run_train_controller, keeping the handle.
    """

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        return run_train_controller(self, RUNNING.hold, **controller_init_kwargs)


class RunningController:
    """The Train controller of the trial that this process runs, if any, and whether it was aborted."""

    def __init__(self):
        self.lock, self.controller, self.aborted = threading.Lock(), None, False

    @contextlib.contextmanager
    def hold(self, controller):
        with self.lock:
            self.controller, self.aborted = controller, False
        try:
            yield
        finally:
            with self.lock:
                self.controller = None

    def abort(self) -> None:
        """Let Train stop its workers and remove its placement group, then exit its controller."""
        with self.lock:
            controller, self.aborted = self.controller, self.controller is not None
        if controller is None:
            return
        try:
            ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            pass  # abort ends with the controller's exit
        except ray.exceptions.GetTimeoutError:
            log.warning("Train controller did not abort within %.0f s; killing it", ABORT_TIMEOUT_S)
            ray.kill(controller)


RUNNING = RunningController()


class AbortTrainOnStop:
    """Tune trainable mixin: when Tune stops the trial, abort its Train run before the trial's actor goes.

    Without it Tune kills the trial actor mid-fit; the dying controller sees its worker die, retries, and creates a
    placement group after the cluster has already cleaned up after it: nothing ever removes that group.
    """

    def cleanup(self):
        RUNNING.abort()
        super().cleanup()


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
    return AbortableTorchTrainer(
        worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=c.workers_per_trial, use_gpu=c.use_gpu,
                                               resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                       **run_options))


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: resume from the newest checkpoint that verifies, run `fit`, report every epoch."""
    # Imported here: the trial's Tune actor and its Train controller import this module too, and never train
    from kd_tune.training.train import fit

    config = validate(loop_config["config"])
    node = socket.gethostname() + ":" + ray.get_runtime_context().get_node_id()[:8]
    # The data set the sweep loaded once, from the object store: no clip is read or decoded again per trial.
    trial_id = loop_config["trial_id"]
    fit(config, ray_report(node=node), data=ray.get(loop_config["data"]), run_name=trial_id,
        resume=verified_resume_point(ray.train.get_checkpoint(), trial_id))


def empty_worker(_loop_config: dict) -> float:
    """A Train loop that returns when it starts: `kd-tune bench` times Ray's own trial start-up with it."""
    return time.time()


def verified_resume_point(ray_checkpoint, trial_id: str) -> Checkpoint | None:
    """The newest checkpoint of this trial that passes verification; refused ones are named and skipped."""
    if ray_checkpoint is None:
        return None
    parent, newest = ray_checkpoint.path.rstrip("/").rsplit("/", 1)
    store = Storage(ray_checkpoint.filesystem, parent)
    candidates = sorted((d for d in store.listdir(".") if d.startswith("checkpoint_")), reverse=True)
    for name in [newest] + [c for c in candidates if c < newest]:
        try:
            return load_checkpoint(store, name, expect=Identity(STUDENT_KIND, trial_id))
        except CheckpointError as e:
            log.warning("refusing checkpoint: %s; trying the previous one", e)
    raise CheckpointError(f"no checkpoint under {parent} passes verification")


def run_trial(params: dict, *, base: dict, experiment_path: str, shared: dict) -> None:
    """Tune function trainable: launch this trial's TorchTrainer (Train V2) and wait for it."""
    config = trial_config(validate(base), params)
    c, trial_id = config.tune, tune.get_context().get_trial_id()
    trainer = torch_trainer(
        train_worker, {"config": config.to_dict(), "data": shared["data"], "trial_id": trial_id}, config,
        # "train": stable per trial, or a restored sweep silently starts the trial over. The folder is the one Tune
        # made for the trial (kd_tune.tuning.sweep names it with trial_dirname), so the two never disagree.
        storage_path=f"{experiment_path}/{Path(tune.get_context().get_trial_dir()).name}",
        filesystem=Storage.from_config(config.storage).filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.storage.keep_best,
                                                     checkpoint_score_attribute=c.metric,
                                                     checkpoint_score_order=c.mode),
        # mypy reads ray.train's first import, Train V1's FailureConfig; Train V2's, the one run, takes this limit
        failure_config=ray.train.FailureConfig(max_failures=c.max_failures,  # type: ignore[call-arg]
                                               controller_failure_limit=TRAIN_START_RETRIES),
        callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except ray.exceptions.RayActorError:
        if not RUNNING.aborted:
            raise  # else Tune stopped the trial and its Train run was aborted on purpose
    except ControllerError as e:
        if isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            raise TrialStartError(start_failure(config)) from e
        raise


# Tune builds the trial's trainable class with this mixin; mypy knows no attributes set on a function
run_trial.__mixins__ = (AbortTrainOnStop,)  # type: ignore[attr-defined]


def start_failure(config: Config) -> str:
    """Why a trial failed: its workers did not start in Train's bounded attempts."""
    c = config.tune
    worker = {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
    timeout_s = os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, "60")
    return (f"tune.workers_per_trial: {c.workers_per_trial} Train worker(s) of {worker} did not start in "
            f"{TRAIN_START_RETRIES + 1} attempts of {WORKER_GROUP_START_TIMEOUT_S_ENV_VAR}={timeout_s} s; allowed: "
            "a trial the cluster's free resources fit (other jobs or leftover placement groups may hold them: "
            "`ray list placement-groups`)")
