"""evaluation.plots: the sweep's and the exported model's PNGs, and the study rebuilt from a leaderboard; what each plot
draws is read back from the figure before it is saved, or from the PNG's Description text chunk."""

import json

import matplotlib.image
import pytest
import yaml
from PIL import Image

from kd_tune.config import load_config
from kd_tune.evaluation import plots
from kd_tune.space import SearchSpace
from kd_tune.store.storage import Storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC = "frr_at_target_fa"

# The smoke space's shape with two teachers: plots that group by teacher need more than one.
TWO_TEACHER_SPACE = SearchSpace.model_validate({
    "teacher": {"choices": ["cnn", "wav2vec2"]}, "alpha_schedule": {"choices": ["constant", "linear"]},
    "alpha_start": {"low": 0.2, "high": 0.8}, "alpha_end": {"low": 0.2, "high": 0.8},
    "temperature": {"low": 1.0, "high": 20.0, "log": True}})


def rows(n: int) -> list[dict]:
    """Leaderboard rows, best first, with the effective values every row carries; trial i started i-th."""
    teachers, schedules = ["cnn", "wav2vec2"], ["constant", "linear"]
    out = [{"trial": f"t{i}", "teacher": teachers[i % 2], "alpha_schedule": schedules[(i // 2) % 2],
            "alpha_start": 0.2 + 0.05 * i, "alpha_end": 0.2 + 0.05 * i if i % 4 < 2 else 0.8,
            "temperature": 1.0 + i, "temperature_end": 1.0 + i, METRIC: abs(0.5 - 0.1 * i)} for i in range(n)]
    return sorted(out, key=lambda r: r[METRIC])


def is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and matplotlib.image.imread(path).ndim == 3


def description(path) -> str:
    with Image.open(path) as image:
        return image.text.get("Description", "")


@pytest.fixture
def drawn(monkeypatch):
    """{file name: what its axes show}, recorded as each figure is saved."""
    seen, save = {}, plots.save

    def recording_save(figure, path, **kwargs):
        seen[path.name] = [{"xlabel": a.get_xlabel(), "ylabel": a.get_ylabel(), "title": a.get_title(),
                            "xticks": [t.get_text() for t in a.get_xticklabels()],
                            "legend": [t.get_text() for t in a.get_legend().get_texts()] if a.get_legend() else [],
                            "lines": [(list(line.get_xdata()), list(line.get_ydata())) for line in a.get_lines()]}
                           for a in figure.axes]
        return save(figure, path, **kwargs)

    monkeypatch.setattr(plots, "save", recording_save)
    return seen


def experiment(tmp_path, starts: dict[str, float], params: dict[str, dict], *, target: float = 3.0) -> Storage:
    """An experiment folder as a sweep leaves it: the saved config, and per trial Tune's result.json whose first
    line holds when it reported (timestamp, time_total_s) and what it sampled (config)."""
    store = Storage.from_uri(tmp_path / "runs")
    config = load_config(None, check_paths=False).replace({"training.target_fa_per_hour": target})
    store.write_bytes("sweep/config.yaml", yaml.safe_dump(config.to_dict()).encode())
    for trial, start in starts.items():
        first = {"timestamp": int(start) + 30, "time_total_s": 30.0, "trial_id": trial, "config": params[trial]}
        store.write_bytes(f"sweep/trial_{trial}_cnn_linear/result.json",
                          (json.dumps(first) + "\n" + json.dumps({"timestamp": 0}) + "\n").encode())
    return store


def test_study_from_rows_holds_one_trial_per_row_with_effective_values():
    # Rule: the rebuilt study has every row with a metric as a finished trial, its effective alpha_end included
    # (a constant schedule's alpha_end equals alpha_start, inside the widened range), its trial id kept.
    study = plots.study_from_rows(rows(6) + [{"trial": "x", "teacher": "cnn"}], TWO_TEACHER_SPACE,
                                  metric=METRIC, mode="min")
    assert len(study.trials) == 6 and study.best_value == 0.0
    assert {t.params["alpha_end"] for t in study.trials} >= {0.2, 0.8}
    assert {t.user_attrs["trial_id"] for t in study.trials} == {f"t{i}" for i in range(6)}


def test_history_adds_trials_in_start_order_not_best_first(tmp_path, drawn):
    # Rule: history.png is a history: the trials in the order they started (a row's start_time, else its first
    # result's), whatever the leaderboard's order; its x ticks are the trial ids and its y axis names the metric
    # and its direction.
    best_first = rows(6)
    with_times = [r | {"start_time": 100.0 + int(r["trial"][1:])} for r in best_first]
    study = plots.study_from_rows(with_times, TWO_TEACHER_SPACE, metric=METRIC, mode="min")
    assert [t.user_attrs["trial_id"] for t in study.trials] == [f"t{i}" for i in range(6)]
    assert [r["trial"] for r in best_first] != [f"t{i}" for i in range(6)]  # the order did change

    started = {"t3": 10.0, "t0": 20.0, "t5": 30.0, "t1": 40.0, "t4": 50.0, "t2": 60.0}
    store = experiment(tmp_path, started, {t: {} for t in started})
    study = plots.study_from_rows(best_first, TWO_TEACHER_SPACE, metric=METRIC, mode="min",
                                  records=plots.trial_records(store, "sweep"))
    assert [t.user_attrs["trial_id"] for t in study.trials] == list(started)
    path = plots.optimization_history(study, tmp_path / "history.png", metric=METRIC, mode="min",
                                      target_fa_per_hour=2.0)
    assert is_png(path) and description(path) == "trials in start order: " + " ".join(started)
    (axes,) = drawn["history.png"]
    assert axes["xticks"] == list(started) and "in the order the trials started" in axes["xlabel"]
    label = " ".join(axes["ylabel"].split())  # wrapped to fit the figure's height
    assert "frr_at_target_fa" in label and "lower is better" in label and "FRR at 2 FA/h" in label
    assert all(len(line) <= plots.Y_LABEL_CHARS for line in axes["ylabel"].splitlines())


def test_history_without_start_times_keeps_the_given_order_and_says_so(tmp_path, drawn):
    # Rule: with no start time anywhere, the rows keep their order and the axis says the start order is unknown.
    study = plots.study_from_rows(rows(4), TWO_TEACHER_SPACE, metric=METRIC, mode="min")
    assert [t.user_attrs["trial_id"] for t in study.trials] == [r["trial"] for r in rows(4)]
    plots.optimization_history(study, tmp_path / "history.png", metric=METRIC, mode="min")
    assert "start times unknown" in drawn["history.png"][0]["xlabel"]


FULL_SPACE = SearchSpace.model_validate({  # every key a space may search, conditional ones included
    "teacher": {"choices": ["cnn", "wav2vec2"]}, "alpha_schedule": {"choices": ["constant", "linear", "step"]},
    "alpha_start": {"low": 0.0, "high": 1.0}, "alpha_end": {"low": 0.0, "high": 1.0},
    "alpha_step_point": {"low": 0.2, "high": 0.8}, "temperature": {"low": 1.0, "high": 20.0, "log": True},
    "temperature_schedule": {"choices": ["constant", "cosine"]}, "temperature_end": {"low": 1.0, "high": 4.0},
    "lr": {"low": 0.001, "high": 0.01, "log": True}, "weight_decay": {"low": 0.0001, "high": 0.1, "log": True},
    "student_width": {"choices": [0.5, 1.0]}})


def full_space_params(i: int) -> dict:
    """What FULL_SPACE's sampler picks for trial i: conditional parameters only where they apply."""
    schedule = ("constant", "linear", "step")[i % 3]
    params = {"teacher": ("cnn", "wav2vec2")[i % 2], "alpha_schedule": schedule, "alpha_start": 0.05 + 0.07 * i,
              "temperature": 1.5 + i, "temperature_schedule": ("constant", "cosine")[(i // 2) % 2],
              "lr": 0.001 + 0.0005 * i, "weight_decay": 0.0002 * (i + 1), "student_width": (0.5, 1.0)[i % 2]}
    if schedule != "constant":
        params["alpha_end"] = 0.9 - 0.05 * i
    if schedule == "step":
        params["alpha_step_point"] = 0.3
    if params["temperature_schedule"] == "cosine":
        params["temperature_end"] = 2.0
    return params


def test_importances_rank_every_searched_parameter(tmp_path):
    # Rule: importances.png ranks every searched parameter, weight_decay included (it is not a leaderboard column:
    # it comes from each trial's first result); one only some schedules use (alpha_step_point) is named as ranked
    # over the trials that use it.
    space = FULL_SPACE
    params = {f"t{i}": full_space_params(i) for i in range(12)}
    store = experiment(tmp_path, {t: float(i) for i, t in enumerate(params)}, params)
    leaderboard = [{"trial": t, "teacher": p["teacher"], "alpha_schedule": p["alpha_schedule"],
                    METRIC: 0.3 * (p["teacher"] == "wav2vec2") + p["alpha_start"] / 10} for t, p in params.items()]
    study = plots.study_from_rows(leaderboard, space, metric=METRIC, mode="min",
                                  records=plots.trial_records(store, "sweep"))
    searched = [n for n, spec in space if spec is not None]
    path = plots.param_importances(study, tmp_path / "importances.png", searched=searched)
    ranked, _, note = description(path).removeprefix("ranked: ").partition(". ")
    assert set(ranked.split(", ")) == set(searched)
    assert note == "Ranked over the trials that use them: alpha_step_point."
    without_results = plots.study_from_rows(leaderboard, space, metric=METRIC, mode="min")  # no result.json
    path = plots.param_importances(without_results, tmp_path / "importances.png", searched=searched)
    assert "Not ranked (no trial has a value): " in description(path) and "weight_decay" in description(path)


@pytest.mark.parametrize("n", [1, 6])
def test_importances_with_too_few_trials_say_so_instead(tmp_path, n):
    # Rule: under MIN_TRIALS_FOR_IMPORTANCES finished trials no ranking is drawn: importances.png states why (in the
    # picture and its Description), so the plot line on the console leads to the reason, not to noise.
    study = plots.study_from_rows(rows(n), TWO_TEACHER_SPACE, metric=METRIC, mode="min")
    notice = plots.importances_notice(study)
    assert notice and f"{n} finished trials" in notice and str(plots.MIN_TRIALS_FOR_IMPORTANCES) in notice
    path = plots.param_importances(study, tmp_path / "importances.png")
    assert is_png(path) and description(path) == notice


def test_by_teacher_schedule_labels_the_metric_and_colours_by_schedule(tmp_path, drawn):
    # Rule: by_teacher_schedule.png's y axis says what the metric means at the config's target and which way is
    # better; each colour is one alpha schedule, named in the legend; the best trial is circled.
    path = plots.metric_by_teacher_schedule(rows(6), tmp_path / "by_teacher.png", metric=METRIC, mode="min",
                                            target_fa_per_hour=2.0)
    assert is_png(path)
    (axes,) = drawn["by_teacher.png"]
    assert " ".join(axes["ylabel"].split()) == "FRR at 2 FA/h (frr_at_target_fa), lower is better"
    assert all(len(line) <= plots.Y_LABEL_CHARS for line in axes["ylabel"].splitlines())  # wrapped to fit
    assert axes["legend"] == ["alpha schedule: constant", "alpha schedule: linear", "best trial (t5)"]


def test_sweep_plots_read_order_parameters_and_target_from_the_experiment(tmp_path, drawn):
    # Rule: sweep_plots writes the three PNGs into <experiment>/plots/, with the start order and parameters from
    # the trials' first results and the target FA/h from the experiment's saved config (here 3, not the default 2).
    started = {f"t{i}": 60.0 - 10 * i for i in range(6)}  # t5 started first
    store = experiment(tmp_path, started, {t: {} for t in started}, target=3.0)
    written = plots.sweep_plots(store, "sweep", rows(6), TWO_TEACHER_SPACE, metric=METRIC, mode="min")
    assert [p.rsplit("/", 1)[1] for p in written] == ["history.png", "importances.png", "by_teacher_schedule.png"]
    assert all(is_png(tmp_path / "runs" / "sweep" / "plots" / name)
               for name in ("history.png", "importances.png", "by_teacher_schedule.png"))
    assert drawn["history.png"][0]["xticks"] == [f"t{i}" for i in range(5, -1, -1)]
    assert drawn["by_teacher_schedule.png"][0]["ylabel"].startswith("FRR at 3 FA/h")
    assert not list((tmp_path / "runs").rglob(".*.partial"))


def det_points() -> list[dict]:
    """A DET curve whose FA/h dips again at the lowest thresholds (merged activations)."""
    fa = [0.0, 0.0, 0.5, 1.0, 1.5, 3.0, 6.0, 20.0, 40.0, 30.0]
    return [{"threshold": 1.0 - t / 10, "frr": 1.0 - t / 9, "fa_per_hour": f} for t, f in enumerate(fa)]


def test_det_curve_reads_off_the_target_and_marks_it(tmp_path, drawn):
    # Rule: the DET curve draws FRR against FA/h from the top threshold down to the most false activations, as
    # steps (the FRR a target allows), with a vertical line at the target FA/h whose label gives the FRR read off
    # the curve there, and the model's operating point; both axes say their units.
    points, point = det_points(), {"threshold": 0.5, "frr": 1.0 - 5 / 9, "fa_per_hour": 3.0}
    assert plots.frr_at_fa(points, 2.0) == pytest.approx(1.0 - 4 / 9)  # 1.5 FA/h is the last within 2
    assert plots.frr_at_fa(points, 0.0) == pytest.approx(1.0 - 1 / 9)
    path = plots.det_curve(points, tmp_path / "det.png", operating_point=point, target_fa_per_hour=2.0)
    assert is_png(path)
    (axes,) = drawn["det.png"]
    curve, target, marked = axes["lines"]
    assert curve == plots.det_line(points) and max(curve[0]) == 40.0 and 30.0 not in curve[0]
    assert target[0] == [2.0, 2.0] and marked == ([3.0], [point["frr"]])
    assert axes["legend"][1] == f"target 2 FA/h: FRR {1.0 - 4 / 9:.3f}"
    assert "FA/h" in axes["xlabel"] and "false-reject rate" in axes["ylabel"]


def test_det_curve_without_an_operating_point_is_a_valid_png(tmp_path):
    # Rule: the operating point and the target line are optional.
    assert is_png(plots.det_curve(det_points(), tmp_path / "det.png"))
