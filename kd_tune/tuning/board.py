"""TensorBoard for a sweep: one run per trial (its folder name), every metric under its METRICS tag, and one HParams
experiment that answers "which teacher, alpha and temperature win".

Every trial writes the same experiment record: every hyperparameter the search space searches, with the space's
own domain, and the metrics, validation first, each described with its meaning and which way is better (none that
is constant by construction). Each trial's session holds the values of the hyperparameters its schedules use, and
no value for one they do not (alpha_end of a constant schedule, alpha_step_point of a schedule without a step,
temperature_end of a constant temperature): see APPLIES for what that costs in TensorBoard.

HParams shows each trial's BEST epoch by the sweep metric (tune.metric), as the leaderboard does: every epoch also
logs `trial_best/<metric>` scalars holding the leaderboard's metrics at the best epoch so far (chosen by
kd_tune.metrics.epoch_key, the one rule), and HParams reads the last value of those tags.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TypeGuard

from google.protobuf import struct_pb2
from ray.tune.logger import TBXLoggerCallback
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboardX.proto import summary_pb2 as tbx_summary_pb2

from kd_tune.config import Config
from kd_tune.evaluation.plots import metric_label
from kd_tune.metrics import METRICS, BestEpoch
from kd_tune.signing import SpecialFileError, read_regular
from kd_tune.space import TARGETS, Choice, SearchSpace, trial_config

log = logging.getLogger(__name__)
# TensorBoard's HParams tab ticks its first five hyperparameters, sorted `differs` first and then by name, and its
# first five metrics in the record's order: the first five of TICK_ORDER that the space searches are flagged
# `differs` (where they vary) so they are the ticked ones. None of them is conditional (see APPLIES).
TICK_ORDER = ("teacher", "alpha_schedule", "alpha_start", "temperature", "temperature_schedule", "student_width",
              "lr", "weight_decay")
TICKED = 5
FIRST_METRICS = ("frr_at_target_fa", "auc", "accuracy", "eer")  # after the sweep metric itself
# fa_per_hour is measured at the threshold chosen to meet the target, so it reads the target (2.0) in every trial:
# a column and an axis that tell nothing. It stays a scalar and a leaderboard column.
CONSTANT_METRICS = ("fa_per_hour",)
# Whether a trial's schedules use a conditional hyperparameter (as kd_tune.space.SpaceSampler samples it). Where
# they do not, the session sets no value: any value would be made up (a constant schedule never reads alpha_end, and
# a constant temperature of 8 is no temperature_end in the space's 1-4). The cost, measured in TensorBoard 2.21: a
# trial without a value for a ticked column drops out of the parallel-coordinates and scatter views (its table row
# stays), so no conditional parameter is ticked by default, and ticking one shows the trials it applies to. Only a
# space searching fewer than five unconditional ones (`smoke`) gets one ticked anyway, TensorBoard's fifth by name.
APPLIES = {"alpha_end": lambda d: d.alpha_schedule != "constant",
           "alpha_step_point": lambda d: d.alpha_schedule == "step",
           "temperature_end": lambda d: d.temperature_schedule != "constant"}
# TensorBoard sorts chart groups by name and opens the first two: the best-epoch charts, there for HParams, go last.
BEST_GROUP = "trial_best"
MAX_HISTORY_BYTES = 16 * 2**20  # a resumed trial's result.json read back to restore its best epoch; ~1 KB per epoch


def best_tag(name: str) -> str:
    """Where a metric's value at the trial's best epoch so far goes."""
    return f"{BEST_GROUP}/{name}"


def hparams_metrics(metric: str) -> list[str]:
    """The metrics HParams lists: the sweep metric, the validation figures, then the leaderboard's other columns;
    none that is constant by construction."""
    names = dict.fromkeys([metric, *FIRST_METRICS, *(n for n, m in METRICS.items() if m.column)])
    return [n for n in names if n not in CONSTANT_METRICS]


def searched(space: SearchSpace) -> list[str]:
    return [name for name in SearchSpace.model_fields if getattr(space, name) is not None]


def ticked(space: SearchSpace) -> list[str]:
    """The hyperparameters TensorBoard shows ticked: the first TICKED of TICK_ORDER that the space varies (a choice
    of one, such as a single teacher, would not be flagged `differs`, and TensorBoard would tick another by name)."""
    def varies(domain) -> bool:
        return domain is not None and (not isinstance(domain, Choice) or len(set(domain.choices)) > 1)

    return [name for name in TICK_ORDER if varies(getattr(space, name))][:TICKED]


def config_value(config: Config, name: str) -> str | float:
    """A search-space parameter as `config` holds it (a one-element list, such as the teacher, as its element)."""
    section, key, _ = TARGETS[name]
    value = getattr(getattr(config, section), key)
    return value[0] if isinstance(value, (list, tuple)) else value


def trial_hparams(base: Config, space: SearchSpace, params: dict) -> dict[str, str | float]:
    """Every searched hyperparameter the trial's schedules use (see APPLIES), as the trial's config holds it."""
    config = trial_config(base, params)
    return {name: config_value(config, name) for name in searched(space)
            if APPLIES.get(name, lambda _: True)(config.distillation)}


# ---------------------------------------------------------------- the HParams records


def hparam_info(space: SearchSpace, name: str) -> api_pb2.HParamInfo:
    """One hyperparameter with the space's domain: a Choice as its categorical values, a range as its interval."""
    domain, tick = getattr(space, name), name in ticked(space)
    if isinstance(domain, Choice):
        numeric = all(isinstance(c, (int, float)) for c in domain.choices)
        values = struct_pb2.ListValue()
        values.extend([float(c) if numeric else str(c) for c in domain.choices])
        return api_pb2.HParamInfo(name=name, type=api_pb2.DATA_TYPE_FLOAT64 if numeric else api_pb2.DATA_TYPE_STRING,
                                  domain_discrete=values, differs=tick)
    return api_pb2.HParamInfo(name=name, type=api_pb2.DATA_TYPE_FLOAT64, differs=tick,
                              domain_interval=api_pb2.Interval(min_value=domain.low, max_value=domain.high))


def metric_description(name: str, base: Config) -> str:
    """What a metric means and which way is better, and which epoch's value HParams shows."""
    label = metric_label(name, target_fa_per_hour=base.training.target_fa_per_hour)
    return f"{label}; at the trial's best epoch by {base.tune.metric}, as in the leaderboard"


def experiment_summary(space: SearchSpace, base: Config) -> tbx_summary_pb2.Summary:
    """The experiment record, the same for every trial of the sweep. TensorBoard's table puts the hyperparameter
    columns before the metric columns whatever the record's order; the metrics here start with the sweep metric."""
    experiment = api_pb2.Experiment(
        hparam_infos=[hparam_info(space, name) for name in searched(space)],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=best_tag(n)),
                                         description=metric_description(n, base))
                      for n in hparams_metrics(base.tune.metric)])
    return hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment)


def session_start_summary(hparams: dict[str, str | float]) -> tbx_summary_pb2.Summary:
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, str):
            start.hparams[name].string_value = value
        else:
            start.hparams[name].number_value = float(value)
    return hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start)


def session_end_summary(*, failed: bool) -> tbx_summary_pb2.Summary:
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS,
                                         end_time_secs=time.time())
    return hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)


def hparams_summary(tag: str, **content) -> tbx_summary_pb2.Summary:
    """A summary for tensorboardX's writer, built as TensorBoard's own HParams summaries are: tensorboardX's copy of
    these messages lacks `differs`, and its `hparams` helper sets no domain and always reports success."""
    plugin = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**content))
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=plugin,
                                                                   tensor=metadata.NULL_TENSOR)])
    return tbx_summary_pb2.Summary.FromString(summary.SerializeToString())  # the same message, tensorboardX's class


# ---------------------------------------------------------------- the best epoch so far


class TrialBest(BestEpoch):
    """The leaderboard's choice among the epochs seen so far (metrics.epoch_key), as HParams metrics."""

    def values(self, result: dict) -> dict[str, float]:
        """Take one epoch's result; returns the leaderboard's metrics at the best epoch so far."""
        self.offer(result)
        best: dict = self.result or {}
        return {name: float(best[name]) for name in hparams_metrics(self.metric) if is_number(best.get(name))}


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def earlier_results(trial) -> list[dict]:
    """The results a trial reported before this driver started (a resumed sweep): its result.json, read locally
    or else from storage; [] for a new trial."""
    local = Path(trial.local_path, "result.json")
    try:
        if local.exists():
            raw = read_regular(local, MAX_HISTORY_BYTES) or b""  # past its cap: as if none
        else:
            with trial.storage.storage_filesystem.open_input_stream(
                    f"{trial.storage.trial_fs_path}/result.json") as f:
                raw = f.read(MAX_HISTORY_BYTES + 1)
            raw = raw if len(raw) <= MAX_HISTORY_BYTES else b""  # as the local read: past its cap, as if none
    except FileNotFoundError:
        return []
    except (OSError, SpecialFileError) as e:  # the best epoch restarts here; TensorBoard only, not the leaderboard
        log.warning("could not read the earlier results of trial %s: %s", trial.trial_id, e)
        return []
    results = []
    for line in raw.decode(errors="replace").splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:
            break  # a line cut by the size cap, or by a kill mid-write
    return results


# ---------------------------------------------------------------- the Tune callback


class TensorBoardCallback(TBXLoggerCallback):
    """One TensorBoard run per trial: every metric of METRICS under its tag, the best epoch's under best_tag, and
    the sweep's HParams experiment (see the module's docstring). HParams shows the best epoch, as the leaderboard."""

    def __init__(self, config: Config, space: SearchSpace):
        super().__init__()
        self.config, self.space = config, space
        self.experiment = experiment_summary(space, config)
        self.best: dict = {}  # Trial -> TrialBest, kept across a trial's restarts

    def log_trial_start(self, trial) -> None:
        super().log_trial_start(trial)  # (re)opens the trial's writer
        if trial not in self.best:
            self.best[trial] = TrialBest(self.config.tune.metric, self.config.tune.mode)
            for result in earlier_results(trial):
                self.best[trial].offer(result)
        writer = self._trial_writer[trial].file_writer
        writer.add_summary(self.experiment)
        writer.add_summary(session_start_summary(trial_hparams(self.config, self.space, trial.config)))
        writer.flush()

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        scalars = {METRICS[k].tag: v for k, v in result.items() if k in METRICS and is_number(v)}
        scalars |= {best_tag(k): v for k, v in self.best[trial].values(result).items()}
        writer = self._trial_writer[trial]
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=result.get("epoch", iteration))
        writer.flush()

    def log_trial_end(self, trial, failed: bool = False) -> None:
        writer = self._trial_writer.pop(trial, None)
        self._trial_result.pop(trial, None)
        self.best.pop(trial, None)
        if writer is not None:
            writer.file_writer.add_summary(session_end_summary(failed=failed))
            writer.close()
