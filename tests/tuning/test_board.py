"""The sweep's TensorBoard (tuning.board): one identical HParams experiment in every trial with the space's domains,
each trial's hyperparameters where its schedules use them, best-epoch scalars that agree with the leaderboard, and
trial folders that name teacher and schedule.

The callback is driven with Ray Tune's own Trial objects and writes real event files, read back with TensorBoard's
EventAccumulator; no Ray cluster is needed for that.
"""

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow.fs
import pytest
from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from kd_tune.config import TuneConfig, load_config
from kd_tune.evaluation.leaderboard import METRIC_COLUMNS, best_epoch
from kd_tune.metrics import METRICS
from kd_tune.space import Choice, SearchSpace, load_search_space
from kd_tune.tuning.board import (APPLIES, BEST_GROUP, CONSTANT_METRICS, TensorBoardCallback, TrialBest, best_tag,
                                  hparams_metrics, ticked)
from kd_tune.space import trial_dirname

TICKED_BY_TENSORBOARD = 5  # its HParams tab ticks the first five hyperparameters and the first five metrics
TRIAL_PARAMS = {  # one trial per alpha schedule of the default space; only `step` samples alpha_step_point
    "constant": {"teacher": "cnn", "alpha_schedule": "constant", "alpha_start": 0.3, "temperature": 4.0,
                 "temperature_schedule": "constant", "lr": 0.003, "weight_decay": 0.01, "student_width": 0.5},
    "linear": {"teacher": "cnn", "alpha_schedule": "linear", "alpha_start": 0.9, "alpha_end": 0.1,
               "temperature": 8.0, "temperature_schedule": "cosine", "temperature_end": 2.0, "lr": 0.002,
               "weight_decay": 0.001, "student_width": 1.0},
    "step": {"teacher": "cnn", "alpha_schedule": "step", "alpha_start": 0.2, "alpha_end": 0.7,
             "alpha_step_point": 0.4, "temperature": 2.0, "temperature_schedule": "constant", "lr": 0.005,
             "weight_decay": 0.0005, "student_width": 0.5},
}


class StagedIn(StorageContext):
    """Ray's StorageContext with the driver's staging folder at `staging` instead of the Ray session's (which only
    a running Ray has); the trial's folders and files are Tune's own otherwise."""

    def __init__(self, root: Path, staging: Path):
        super().__init__(str(root), "experiment")
        self.staging = staging

    @property
    def experiment_driver_staging_path(self) -> str:
        return str(self.staging)


def make_trial(tmp_path: Path, trial_id: str, params: dict) -> Trial:
    return Trial("run_trial", stub=True, trial_id=trial_id, config=params,
                 storage=StagedIn(tmp_path / "storage", tmp_path / "staging"),
                 trial_dirname_creator=lambda t: trial_dirname(t.trial_id, t.config))


def epoch_result(epoch: int, frr: float, auc: float) -> dict:
    """One epoch as a trial reports it: every metric of the table, some varied by epoch; `frr` is both
    frr_at_target_fa and the default sweep metric."""
    result = {name: 0.01 * epoch + i for i, name in enumerate(METRICS)}
    return result | {"frr_at_target_fa": frr, TuneConfig().metric: frr, "auc": auc, "epoch": epoch,
                     "training_iteration": epoch}


def hparams_records(trial_dir: Path) -> dict[str, bytes]:
    accumulator = EventAccumulator(str(trial_dir))
    accumulator.Reload()
    return accumulator.PluginTagToContent(metadata.PLUGIN_NAME)


def last_scalars(trial_dir: Path) -> dict[str, float]:
    accumulator = EventAccumulator(str(trial_dir))
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def base():
    return load_config(None, check_paths=False)


def run_trials(tmp_path: Path, base, space: SearchSpace, epochs: list[dict], *, failed: str = "") -> dict:
    """Drive one callback through a trial per TRIAL_PARAMS entry, as Tune does; their staged folders by schedule."""
    callback = TensorBoardCallback(base, space)
    trials = {name: make_trial(tmp_path, f"{i:08x}", params) for i, (name, params) in enumerate(TRIAL_PARAMS.items())}
    for trial in trials.values():
        callback.log_trial_start(trial)
    for result in epochs:
        for trial in trials.values():
            callback.log_trial_result(result["training_iteration"], trial, result)
    for name, trial in trials.items():
        callback.log_trial_end(trial, failed=name == failed)
    return {name: Path(trial.local_path) for name, trial in trials.items()}


def sessions_of(dirs: dict[str, Path]) -> dict[str, dict]:
    """Each trial's session as HParams reads it: {hyperparameter: value}."""
    sessions = {}
    for name, directory in dirs.items():
        start = metadata.parse_session_start_info_plugin_data(
            hparams_records(directory)[metadata.SESSION_START_INFO_TAG])
        sessions[name] = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    return sessions


def test_every_trial_writes_the_same_experiment_with_every_searched_hyperparameter(tmp_path, base):
    # Rule: HParams gets one experiment record, byte-identical in every trial, listing every hyperparameter the space
    # searches with the space's own domain (temperature_end 1-4, not widened to the temperature's 1-20); the five
    # that TensorBoard ticks are parameters every trial has: alpha schedule, alpha start, temperature, and the teacher
    # where the space offers more than one.
    space = load_search_space("default")
    dirs = run_trials(tmp_path, base, space, [epoch_result(1, 0.5, 0.8)])
    records = [hparams_records(d)[metadata.EXPERIMENT_TAG] for d in dirs.values()]
    assert all(r == records[0] for r in records)
    experiment = metadata.parse_experiment_plugin_data(records[0])
    infos = {h.name: h for h in experiment.hparam_infos}
    assert list(infos) == [name for name in SearchSpace.model_fields if getattr(space, name) is not None]
    for name, info in infos.items():
        domain = getattr(space, name)
        if isinstance(domain, Choice):
            assert [v.string_value or v.number_value for v in info.domain_discrete.values] == domain.choices, name
        else:
            assert (info.domain_interval.min_value, info.domain_interval.max_value) == (domain.low, domain.high), name
    end = infos["temperature_end"].domain_interval  # not widened to hold a constant schedule's temperature
    assert (end.min_value, end.max_value) != (space.temperature.low, space.temperature.high)
    shown = sorted(infos.values(), key=lambda h: (not h.differs, h.name))[:TICKED_BY_TENSORBOARD]  # TB's own order
    assert {h.name for h in shown} == set(ticked(space)) and len(shown) == TICKED_BY_TENSORBOARD
    assert {"alpha_schedule", "alpha_start", "temperature"} <= set(ticked(space))
    assert not set(ticked(space)) & set(APPLIES)  # every trial has a value for every ticked column


def test_metrics_come_sweep_metric_first_with_their_direction_and_none_constant(tmp_path, base):
    # Rule: the HParams metrics start with the sweep metric and the validation figures, each described with its
    # meaning at the config's target and which way is better; fa_per_hour, which reads the target in every trial,
    # is not among them.
    dirs = run_trials(tmp_path, base, load_search_space("default"), [epoch_result(1, 0.5, 0.8)])
    experiment = metadata.parse_experiment_plugin_data(hparams_records(dirs["step"])[metadata.EXPERIMENT_TAG])
    described = {m.name.tag: m.description for m in experiment.metric_infos}
    first = dict.fromkeys([base.tune.metric, "frr_at_target_fa", "auc", "accuracy", "eer"])
    assert list(described)[:len(first)] == [best_tag(n) for n in first]
    assert set(described) == {best_tag(n) for n in METRIC_COLUMNS if n not in CONSTANT_METRICS}
    assert best_tag("fa_per_hour") not in described
    target = f"{base.training.target_fa_per_hour:g}"
    assert described[best_tag("frr_at_target_fa")].startswith(f"FRR at {target} FA/h (frr_at_target_fa), lower is")
    for name in ("frr_at_target_fa", "auc", "accuracy", "eer", "student_loss"):
        better = "lower is better" if METRICS[name].goal == "min" else "higher is better"
        assert better in described[best_tag(name)], name


def test_each_session_holds_only_the_hyperparameters_its_schedules_use(tmp_path, base):
    # Rule: a trial's session sets the hyperparameters its schedules use, at the values its config ran with, and no
    # made-up value for one they do not: no alpha_end for a constant alpha, no alpha_step_point without a step, no
    # temperature_end for a constant temperature; every value lies in its domain. A failed trial's session ends as a
    # failure.
    space = load_search_space("default")
    dirs = run_trials(tmp_path, base, space, [epoch_result(1, 0.5, 0.8)], failed="linear")
    for name, directory in dirs.items():
        status = metadata.parse_session_end_info_plugin_data(
            hparams_records(directory)[metadata.SESSION_END_INFO_TAG]).status
        assert status == (api_pb2.STATUS_FAILURE if name == "linear" else api_pb2.STATUS_SUCCESS), name
    sessions = sessions_of(dirs)
    everything = {name for name in SearchSpace.model_fields if getattr(space, name) is not None}
    assert set(sessions["constant"]) == everything - {"alpha_end", "alpha_step_point", "temperature_end"}
    assert set(sessions["linear"]) == everything - {"alpha_step_point"}
    assert set(sessions["step"]) == everything - {"temperature_end"}
    for name, values in sessions.items():
        assert values == pytest.approx(TRIAL_PARAMS[name]), name
        for key, value in values.items():
            domain = getattr(space, key)
            assert value in domain.choices if isinstance(domain, Choice) else domain.low <= value <= domain.high


def test_best_scalars_hold_the_epoch_the_leaderboard_picks(tmp_path, base):
    # Rule: after every epoch, `trial_best/*` hold the leaderboard's metrics at the epoch evaluation.leaderboard's
    # best_epoch picks among the epochs so far (the one rule, metrics.epoch_key: best by the sweep metric, nan last,
    # then the later epoch); the HParams metrics point at exactly those tags.
    metric, mode = base.tune.metric, base.tune.mode
    epochs = [epoch_result(1, math.nan, 0.6), epoch_result(2, 0.5, 0.7), epoch_result(3, 0.3, 0.75),
              epoch_result(4, 0.3, 0.8), epoch_result(5, 0.4, 0.9), epoch_result(6, 0.3, 0.7)]
    tracker, checkpoints = TrialBest(metric, mode), tmp_path / "checkpoints"
    checkpoints.mkdir()
    for n, result in enumerate(epochs, 1):
        (checkpoints / f"epoch_{n}").touch()
        rows = pd.DataFrame([r | {"checkpoint_path": str(checkpoints / f"epoch_{r['epoch']}")} for r in epochs[:n]])
        picked = best_epoch(rows, metric, mode, pyarrow.fs.LocalFileSystem())
        expected = {k: picked[k] for k in hparams_metrics(metric)}
        assert tracker.values(result) == pytest.approx(expected, nan_ok=True), n
    assert tracker.result["epoch"] == 6  # 0.3 three times: the latest
    best = {k: tracker.result[k] for k in hparams_metrics(metric)}
    dirs = run_trials(tmp_path / "run", base, load_search_space("default"), epochs)
    scalars = last_scalars(dirs["linear"])
    assert {best_tag(k): v for k, v in best.items()} == pytest.approx(
        {tag: v for tag, v in scalars.items() if tag in {best_tag(k) for k in best}})
    experiment = metadata.parse_experiment_plugin_data(hparams_records(dirs["linear"])[metadata.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} == {best_tag(k) for k in hparams_metrics(metric)}


@pytest.mark.parametrize("where", ["staged", "storage"])
def test_a_resumed_trial_keeps_its_best_epoch_from_before(tmp_path, base, where):
    # Rule: a trial that starts again under a new driver (a resumed sweep) takes its earlier epochs from its
    # result.json, staged on the driver or else on storage, so its best-epoch scalars still agree with the leaderboard.
    space = load_search_space("smoke")
    params = {"teacher": "cnn", "alpha_schedule": "constant", "alpha_start": 0.5, "temperature": 3.0}
    trial = make_trial(tmp_path, "0000abcd", params)
    trial.init_local_path()
    before = [epoch_result(1, 0.4, 0.7), epoch_result(2, 0.2, 0.9)]
    folder = Path(trial.local_path if where == "staged" else trial.storage.trial_fs_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in before))
    callback = TensorBoardCallback(base, space)
    callback.log_trial_start(trial)
    callback.log_trial_result(3, trial, epoch_result(3, 0.6, 0.5))
    callback.log_trial_end(trial)
    assert last_scalars(Path(trial.local_path))[best_tag("auc")] == pytest.approx(0.9)


def test_trial_folders_name_teacher_and_schedule_and_give_the_id_back():
    # Rule: a trial's folder (and TensorBoard run) shows its teacher and alpha schedule; the id is what comes
    # between "trial_" and the next "_", even for teacher names with underscores.
    name = trial_dirname("1a2b3c4d", {"teacher": "big_cnn", "alpha_schedule": "step", "alpha_start": 0.1})
    assert name == "trial_1a2b3c4d_big_cnn_step"
    assert name.removeprefix("trial_").split("_", 1)[0] == "1a2b3c4d"


def test_chart_groups_open_with_validation_then_loss_then_schedule():
    # Rule: TensorBoard orders chart groups by name (plain character order for names without digits) and opens the
    # first two: the validation metrics come first, the losses second, the schedules third, the best-epoch charts
    # (there for HParams) last.
    def group(name: str) -> str:
        return METRICS[name].tag.split("/")[0]

    groups = sorted({group(name) for name in METRICS} | {BEST_GROUP})
    assert groups[:3] == [group("frr_at_target_fa"), group("student_loss"), group("alpha")], groups
    assert groups[-1] == BEST_GROUP and best_tag("auc").split("/")[0] == BEST_GROUP


@pytest.mark.slow
def test_a_real_sweep_shows_in_hparams_what_the_leaderboard_shows(smoke_job):
    # Rule: after a real sweep (the smoke search space submitted as a Ray job to a real cluster, 4 trials of up to 3
    # epochs), each trial's folder names its teacher and schedule and gives the leaderboard's trial id back; every
    # trial holds the same HParams experiment and a value for every searched hyperparameter its schedule uses; its
    # trial_best/* scalars equal its leaderboard row.
    assert smoke_job.state == "SUCCEEDED"
    experiment = smoke_job.experiment
    rows = json.loads((experiment / "leaderboard.json").read_text())
    assert {r["alpha_schedule"] for r in rows} == {"constant", "linear"}  # the smoke space's coverage points
    records, searched = set(), {"teacher", "alpha_schedule", "alpha_start", "alpha_end", "temperature"}
    for row in rows:
        trial_dir = experiment / trial_dirname(row["trial"], row)
        content = hparams_records(trial_dir)
        records.add(content[metadata.EXPERIMENT_TAG])
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        used = searched - ({"alpha_end"} if row["alpha_schedule"] == "constant" else set())
        assert set(start.hparams) == used, trial_dir.name
        scalars, shown = last_scalars(trial_dir), [m for m in METRIC_COLUMNS if m not in CONSTANT_METRICS]
        assert {m: scalars[best_tag(m)] for m in shown} == pytest.approx({m: row[m] for m in shown})
    assert len(records) == 1
