"""Every private Ray name kd_tune uses, in one place, for the one Ray version it was checked against.

Some of what a sweep needs has no public Ray API: the GCS's placement-group table, the autoscaler's keys, Tune's
environment forwarding, Train V2's controller. Those uses live here, so a Ray upgrade is checked in one file:
importing it refuses any Ray but SUPPORTED_RAY_VERSION, and tests/tuning/test_ray_compat.py fails, naming what changed,
the day Ray is upgraded without re-checking PRIVATE_NAMES and the copied method below.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable

import ray

from kd_tune.errors import KdTuneError

SUPPORTED_RAY_VERSION = "2.60.0"  # pyproject.toml pins the same


class RayVersionError(KdTuneError, ImportError):
    """The installed Ray is not the one kd_tune's private Ray uses were checked against."""

    exit_code = 2


def check_ray_version(installed: str) -> None:
    if installed != SUPPORTED_RAY_VERSION:
        raise RayVersionError(
            f"Ray {installed} is installed, but kd_tune supports Ray {SUPPORTED_RAY_VERSION} only (its private Ray "
            f"uses are checked per version, in kd_tune/tuning/ray_compat.py); allowed: "
            f"pip install 'ray[default,tune,train]=={SUPPORTED_RAY_VERSION}'")


check_ray_version(ray.__version__)

# After the version check on purpose (hence noqa: E402): another Ray may lack any of them
import ray.experimental.internal_kv  # noqa: E402
from ray._private.state import state as gcs_state  # noqa: E402
# Typed only in part: _raylet.pyi names few of _raylet's members, and protobuf builds gcs_pb2's classes on import
from ray._raylet import (GCS_AUTOSCALER_STATE_NAMESPACE,  # type: ignore[attr-defined]  # noqa: E402
                         GCS_AUTOSCALER_V2_ENABLED_KEY, RAY_NODE_ID_KEY)
from ray.core.generated.gcs_pb2 import PlacementGroupTableData  # type: ignore[attr-defined]  # noqa: E402
from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,  # noqa: E402
                                              RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                                              WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, get_env_vars_to_propagate)
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError  # noqa: E402
from ray.train.v2._internal.execution.controller import TrainController  # noqa: E402
from ray.tune.execution import class_cache  # noqa: E402

__all__ = ["AUTOSCALER_NAMESPACE", "AUTOSCALER_V2_KEY", "PlacementGroupTableData",
           "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR", "WorkerGroupStartupTimeoutError", "cluster_config",
           "internal_kv_get", "placement_group_rows", "run_train_controller", "stop_propagating_env_vars"]

# Every private Ray name kd_tune relies on, dotted from its module: what tests/tuning/test_ray_compat.py checks exists.
# The last ones are used outside this module, as overrides of (or reads from) Tune's and Train's own classes.
PRIVATE_NAMES = (
    "ray._private.state.state._connect_and_get_accessor",
    "ray._private.state.state.get_cluster_config",
    "ray._raylet.GlobalStateAccessor.get_placement_group_table",
    "ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY",
    "ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE",
    "ray._raylet.RAY_NODE_ID_KEY",
    "ray.core.generated.gcs_pb2.PlacementGroupTableData",
    "ray.core.generated.gcs_pb2.PlacementGroupTableData.REMOVED",
    "ray.experimental.internal_kv._internal_kv_get",
    "ray.train.v2._internal.constants.DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE",
    "ray.train.v2._internal.constants.RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR",
    "ray.train.v2._internal.constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR",
    "ray.train.v2._internal.constants.get_env_vars_to_propagate",
    "ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError",
    "ray.train.v2._internal.execution.controller.TrainController",
    "ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE",
    # kd_tune.tuning.trial.AbortableTorchTrainer overrides the first and calls the second
    "ray.train.torch.TorchTrainer._initialize_and_run_controller",
    "ray.train.torch.TorchTrainer._register_sigint_handler",
    # kd_tune.tuning.sweep.KeepHistory and HistoryCSVLogger override these
    "ray.tune.logger.JsonLoggerCallback._restore_from_remote",
    "ray.tune.logger.CSVLoggerCallback._setup_trial",
)
# Instance attributes that kd_tune's subclasses of Tune's loggers read (tuning.sweep, tuning.board): class -> names
PRIVATE_INSTANCE_ATTRIBUTES = {
    "ray.tune.logger.CSVLoggerCallback": ("_trial_continue", "_trial_csv", "_trial_files"),
    "ray.tune.logger.TBXLoggerCallback": ("_trial_writer", "_trial_result"),
}
# The Ray method run_train_controller copies, and the SHA-256 of its source (inspect.getsource) in Ray
# SUPPORTED_RAY_VERSION: tests/tuning/test_ray_compat.py fails when Ray's changes, so the copy is re-checked.
COPIED_METHOD = "ray.train.v2.api.data_parallel_trainer.DataParallelTrainer._initialize_and_run_controller"
COPIED_METHOD_SHA256 = "ea57ec4498323973ffa0e70ad9c03641465b32b420381e791abd5fa8082d09e8"

AUTOSCALER_V2_KEY = GCS_AUTOSCALER_V2_ENABLED_KEY  # "1" in the kv store when autoscaler v2 runs
AUTOSCALER_NAMESPACE = GCS_AUTOSCALER_STATE_NAMESPACE


def placement_group_rows() -> list[PlacementGroupTableData]:
    """The GCS's placement-group table, every row (the State API does not show a group's creator)."""
    table = gcs_state._connect_and_get_accessor().get_placement_group_table()
    return [PlacementGroupTableData.FromString(row) for row in table]


def cluster_config():
    """The autoscaler v2 cluster config (its node types), or None: what Train's own check reads."""
    return gcs_state.get_cluster_config()


def internal_kv_get(key: str | bytes, *, namespace: str | bytes | None = None) -> bytes | None:
    """A value of the GCS's internal key-value store, or None."""
    return ray.experimental.internal_kv._internal_kv_get(key, namespace=namespace)


def stop_propagating_env_vars(names: Iterable[str]) -> None:
    """Stop Ray Tune copying these driver environment variables into every trial's runtime_env."""
    class_cache.ENV_VARS_TO_PROPAGATE -= set(names)


def run_train_controller(trainer, hold: Callable[[object], contextlib.AbstractContextManager],
                         **controller_init_kwargs):
    """`trainer`'s Train run, as Ray's own `_initialize_and_run_controller` starts and waits for it, with the wait
    inside `hold(controller)`: the one change, so that another thread can reach the controller.

    Copied from Ray 2.60.0's ray/train/v2/api/data_parallel_trainer.py, DataParallelTrainer
    ._initialize_and_run_controller (COPIED_METHOD); re-check this copy against it when Ray is upgraded.
    """
    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    controller = ray.remote(
        num_cpus=0, label_selector={RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
        runtime_env={"env_vars": env_vars})(TrainController).remote(**controller_init_kwargs)
    if threading.current_thread() is threading.main_thread():  # e.g. `kd-tune bench`: Ctrl-C aborts the run
        trainer._register_sigint_handler(controller)
    # Ray types the actor's methods as the class's own functions, without their .remote
    with hold(controller):
        ray.get(controller.run.remote())  # type: ignore[attr-defined]
        return ray.get(controller.get_result.remote())  # type: ignore[attr-defined]
