"""PNG plots of what a sweep learned and of an exported model's operating range (matplotlib, no display needed).

- `det_curve`: FRR against false activations per hour, the model's own threshold and the target FA/h marked.
- `optimization_history` and `param_importances`: Optuna's own plots, over a study rebuilt from the leaderboard
  (the sweep's in-memory study is not saved, and the leaderboard holds the values a user reads anyway), its trials
  in the order they started, each trial's parameters completed from the first result it reported.
- `metric_by_teacher_schedule`: the sweep metric of every trial, grouped by teacher and alpha schedule.

Every plot states what its numbers are: axis labels carry units or the metric's meaning and direction, and a PNG
that is not drawn (too few trials) says why, in its picture and in its "Description" text chunk.
"""

from __future__ import annotations

import json
import math
import tempfile
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI

import matplotlib.pyplot as plt
import optuna
import yaml
from matplotlib.figure import Figure
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from kd_tune.config import validate
from kd_tune.errors import KdTuneError
from kd_tune.metrics import METRICS
from kd_tune.space import SearchSpace, trial_id_of
from kd_tune.store.storage import Storage, read_text

PLOTS_DIR = "plots"
DPI = 120
FIGURE_SIZE_IN = (7.0, 4.5)
Y_LABEL_CHARS = 42  # a y label line longer than this runs past a FIGURE_SIZE_IN figure
# fANOVA on fewer trials ranks noise: on 6 trials it put the teacher last while the leaderboard split by teacher
MIN_TRIALS_FOR_IMPORTANCES = 10
FIRST_RESULT_BYTES = 64 * 1024  # a trial's first result.json line (~2 KB): its start time and sampled parameters
# leaderboard column -> search-space parameter, for the effective values every row carries
ROW_PARAMS = {"teacher": "teacher", "alpha_schedule": "alpha_schedule", "alpha_start": "alpha_start",
              "alpha_end": "alpha_end", "temperature": "temperature", "temperature_schedule": "temperature_schedule",
              "temperature_end": "temperature_end", "lr": "lr", "weight_decay": "weight_decay",
              "student_width": "student_width"}
# a conditional parameter's effective value where its schedule samples none: that of the parameter it continues
EFFECTIVE_FROM = {"alpha_end": "alpha_start", "temperature_end": "temperature"}
MEANINGS = {"frr_conditions": "mean FRR at {target} FA/h, clean and in the validation conditions",
            "frr_at_target_fa": "FRR at {target} FA/h", "fa_per_hour": "false activations per hour",
            "accuracy": "clip accuracy at threshold 0.5", "auc": "clip ROC AUC", "eer": "equal error rate",
            "threshold": "threshold meeting the target FA/h", "student_loss": "student loss",
            "distillation_loss": "distillation loss", "total_loss": "total loss"}


def save(figure, path: Path, *, description: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, dpi=DPI, bbox_inches="tight", format="png",
                   metadata={"Description": description} if description else None)
    plt.close(figure)
    partial.replace(path)  # atomic: a reader never sees half a PNG
    return path


def metric_label(metric: str, *, mode: str | None = None, target_fa_per_hour: float | None = None,
                 joiner: str = ", ") -> str:
    """What a metric means and which way is better, e.g. "FRR at 2 FA/h (frr_at_target_fa), lower is better"."""
    target = "the target" if target_fa_per_hour is None else f"{target_fa_per_hour:g}"
    named = f"{MEANINGS[metric].format(target=target)} ({metric})" if metric in MEANINGS else metric
    goal = mode or (METRICS[metric].goal if metric in METRICS else None)
    better = {"min": "lower is better", "max": "higher is better"}.get(goal or "")
    return f"{named}{joiner}{better}" if better else named


def y_label(metric: str, **how) -> str:
    """metric_label wrapped to Y_LABEL_CHARS a line: on one line a long one runs past the figure."""
    return textwrap.fill(metric_label(metric, **how), width=Y_LABEL_CHARS)


# ---------------------------------------------------------------- the DET curve


def det_line(points: list[dict]) -> tuple[list[float], list[float]]:
    """The (FA/h, FRR) pairs the DET curve draws: from the highest threshold down to the one with the most false
    activations. Below it the detector fires on nearly everything, sustained activations merge and count once, and
    FA/h falls again, which is no operating range anyone would pick."""
    ordered = sorted(points, key=lambda p: -p["threshold"])
    fa = [p["fa_per_hour"] for p in ordered]
    usable = ordered[:fa.index(max(fa)) + 1] if fa else []
    return [p["fa_per_hour"] for p in usable], [p["frr"] for p in usable]


def frr_at_fa(points: list[dict], target_fa_per_hour: float) -> float:
    """FRR read off the curve at a target: lowering the threshold from the top, the FRR of the last point before
    FA/h first exceeds the target (as kd_tune.metrics.threshold_for_fa_rate picks it); 1.0 if none meets it."""
    frr = 1.0
    for fa, value in zip(*det_line(points), strict=True):
        if fa > target_fa_per_hour:
            break
        frr = value
    return frr


def det_curve(points: list[dict], path: Path, *, operating_point: dict | None = None,
              target_fa_per_hour: float | None = None, title: str = "") -> Path:
    """points: [{"threshold", "fa_per_hour", "frr"}, ...]; the x axis is symmetric-log so that 0 FA/h stays on the
    plot. Drawn as steps: between two thresholds the FRR a target allows is that of the higher one, so a straight
    line between points would promise FRRs no threshold gives."""
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_IN)
    fa, frr = det_line(points)
    axes.plot(fa, frr, marker=".", markersize=3, drawstyle="steps-post", label="DET curve (this audio)")
    if target_fa_per_hour is not None:
        axes.axvline(target_fa_per_hour, color="tab:gray", linestyle="--",
                     label=f"target {target_fa_per_hour:g} FA/h: FRR {frr_at_fa(points, target_fa_per_hour):.3f}")
    if operating_point:
        axes.plot(operating_point["fa_per_hour"], operating_point["frr"], "o", color="tab:red",
                  label=f"model's threshold {operating_point['threshold']:.3f}: FRR {operating_point['frr']:.3f}, "
                        f"{operating_point['fa_per_hour']:.2f} FA/h")
    axes.legend(loc="lower left", fontsize=8)  # where a DET curve never goes: few false activations, few misses
    axes.set_xscale("symlog", linthresh=1.0)
    axes.set(xlabel="false activations per hour of negative audio (FA/h)",
             ylabel="false-reject rate (fraction of wake words missed)", ylim=(0, 1.02), title=title or "DET curve")
    axes.grid(True, which="both", alpha=0.3)
    return save(figure, path)


# ---------------------------------------------------------------- the study rebuilt from the leaderboard


def trial_records(store: Storage, name: str) -> dict[str, dict]:
    """{trial id: {"start": seconds since the epoch, "params": the sampled parameters}} from the first line of each
    trial's result.json (Tune's own fields: the leaderboard has neither); trials without one are left out."""
    try:
        folders = [f for f in store.listdir(name) if f.startswith("trial_")]
    except (FileNotFoundError, KdTuneError):
        return {}
    records = {}
    for folder in folders:
        try:
            first = store.read_head(f"{name}/{folder}/result.json", FIRST_RESULT_BYTES).split(b"\n", 1)[0]
            result = json.loads(first)
            start = float(result["timestamp"]) - float(result.get("time_total_s", 0.0))
        except (OSError, KdTuneError, ValueError, KeyError, TypeError):
            continue  # not started, or cut mid-write: the trial goes after those whose start is known
        config = result.get("config")
        records[trial_id_of(folder)] = {
            "start": start, "params": config if isinstance(config, dict) else {}}
    return records


def start_key(row: dict, records: dict[str, dict]) -> float | None:
    """When a row's trial started: the row's own start time or trial number, else its first result's."""
    for key in ("start_time", "trial_number"):
        if row.get(key) is not None:
            return float(row[key])
    return records.get(row.get("trial", ""), {}).get("start")


def in_start_order(rows: list[dict], records: dict[str, dict]) -> list[dict]:
    """Rows by trial start; rows whose start is unknown keep their order, after the others."""
    keys = [start_key(r, records) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (keys[i] is None, keys[i] or 0.0, i))
    return [rows[i] for i in order]


def trial_params(row: dict, record: dict, distributions: dict) -> dict:
    """A trial's searched parameters: sampled (from its first result), else the leaderboard's columns, and the
    effective value of an end the schedule does not move to (alpha_end = alpha_start for a constant schedule)."""
    params = {k: v for k, v in record.get("params", {}).items() if k in distributions and v is not None}
    params |= {name: row[column] for column, name in ROW_PARAMS.items()
               if name in distributions and name not in params and row.get(column) is not None}
    for end, start in EFFECTIVE_FROM.items():
        if end in distributions and end not in params and start in params:
            params[end] = params[start]
    return params


def study_from_rows(rows: list[dict], space: SearchSpace, *, metric: str, mode: str,
                    records: dict[str, dict] | None = None) -> optuna.Study:
    """An Optuna study holding one finished trial per leaderboard row that has the metric, added in the order the
    trials started (see in_start_order), each with its trial id as the user attribute "trial_id"."""
    records = records or {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" on the console
    try:
        study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    distributions = distributions_of(space)
    ordered = [r for r in in_start_order(rows, records)
               if r.get(metric) is not None and math.isfinite(r[metric])]
    study.set_user_attr("start_order_known", all(start_key(r, records) is not None for r in ordered))
    for row in ordered:
        params = trial_params(row, records.get(row.get("trial", ""), {}), distributions)
        study.add_trial(optuna.trial.create_trial(params=params, value=row[metric],
                                                  distributions={n: distributions[n] for n in params},
                                                  user_attrs={"trial_id": str(row.get("trial"))}))
    return study


def distributions_of(space: SearchSpace) -> dict:
    """Every searched parameter's distribution; effective values (alpha_end of a constant schedule = alpha_start)
    may fall outside a conditional range, so ranges are widened to hold both."""
    out: dict[str, BaseDistribution] = {}
    for name, spec in space:
        if spec is None:
            continue
        if hasattr(spec, "choices"):
            out[name] = CategoricalDistribution(spec.choices)
        else:
            out[name] = FloatDistribution(spec.low, spec.high, log=spec.log)
    for end, start in EFFECTIVE_FROM.items():
        e, s = out.get(end), out.get(start)
        if isinstance(e, FloatDistribution) and isinstance(s, FloatDistribution):  # always where both are searched
            low, high = min(e.low, s.low), max(e.high, s.high)
            out[end] = FloatDistribution(low, high, log=e.log and low > 0)
    return out


# ---------------------------------------------------------------- the sweep's plots


def optimization_history(study: optuna.Study, path: Path, *, metric: str, mode: str,
                         target_fa_per_hour: float | None = None) -> Path:
    """Optuna's history, its x ticks the trial ids in start order (trial number n is the n-th to start)."""
    with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna's ggplot style stays inside this plot
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = optuna.visualization.matplotlib.plot_optimization_history(
            study, target_name=y_label(metric, mode=mode, target_fa_per_hour=target_fa_per_hour))
        axes.legend(axes.get_legend_handles_labels()[0], [f"{metric} of the trial", "best so far"], fontsize=8)
        ids = [t.user_attrs.get("trial_id", str(t.number)) for t in study.trials]
        axes.set_xticks(range(len(ids)), ids, rotation=45, ha="right")
        known = study.user_attrs.get("start_order_known", False)
        axes.set_xlabel("trial id, in the order the trials started" if known
                        else "trial id, in leaderboard order (start times unknown)")
        axes.set_title(f"{metric} of each trial, and the best so far")
        assert isinstance(axes.figure, Figure)  # Optuna draws on a figure of its own, never a subfigure
        axes.figure.set_size_inches(*FIGURE_SIZE_IN)
        return save(axes.figure, path, description="trials in start order: " + " ".join(ids))


def importances_notice(study: optuna.Study) -> str | None:
    """Why parameter importances are not drawn, or None when they are."""
    finished = len(study.trials)
    if finished < MIN_TRIALS_FOR_IMPORTANCES:
        return (f"Parameter importances not drawn: {finished} finished trials, and a ranking needs at least "
                f"{MIN_TRIALS_FOR_IMPORTANCES} (on fewer it ranks noise). Compare trials in by_teacher_schedule.png "
                "and the leaderboard instead.")
    if len({t.value for t in study.trials}) < 2:
        return f"Parameter importances not drawn: all {finished} trials scored {study.trials[0].value:g}."
    return None


def param_importances(study: optuna.Study, path: Path, *, searched: list[str] | None = None) -> Path:
    """Optuna's importances (PED-ANOVA, its default: it ranks a conditional parameter over the trials that use it),
    what they rank and leave out named under the chart; with too few trials, a PNG that says so instead (which also
    replaces a chart left by an earlier run)."""
    notice = importances_notice(study)
    if notice is not None:
        figure, axes = plt.subplots(figsize=FIGURE_SIZE_IN)
        axes.axis("off")
        axes.text(0.5, 0.5, "\n".join(wrap(notice, 60)), ha="center", va="center", fontsize=12)
        return save(figure, path, description=notice)
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")
        ranked = list(optuna.importance.get_param_importances(study, evaluator=evaluator))
        axes = optuna.visualization.matplotlib.plot_param_importances(study, evaluator=evaluator)
        axes.set_title("", loc="left")
        axes.set(title=f"Parameter importances over {len(study.trials)} trials (PED-ANOVA)",
                 xlabel="importance (normalized to sum to 1)")
        if legend := axes.get_legend():
            legend.remove()  # one series, named "Objective Value"
        note = importance_note(study, ranked, searched or [])
        if note:
            axes.annotate(note, (0, -0.22), xycoords="axes fraction", fontsize=8)
        return save(axes.figure, path, description=f"ranked: {', '.join(ranked)}. {note}".strip())


def importance_note(study: optuna.Study, ranked: list[str], searched: list[str]) -> str:
    """Which ranked parameters only some trials have, and which searched ones no trial has."""
    partial = [n for n in ranked if any(n not in t.params for t in study.trials)]
    missing = [n for n in searched if n not in ranked]
    return " ".join([*([f"Ranked over the trials that use them: {', '.join(partial)}."] if partial else []),
                     *([f"Not ranked (no trial has a value): {', '.join(missing)}."] if missing else [])])


def wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]


def metric_by_teacher_schedule(rows: list[dict], path: Path, *, metric: str, mode: str = "min",
                               target_fa_per_hour: float | None = None) -> Path:
    """One column of points per (teacher, alpha schedule), each point a trial, coloured by alpha schedule (the
    legend names them); the best trial circled."""
    scored = [r for r in rows if r.get(metric) is not None and math.isfinite(r[metric])]
    groups = sorted({(r.get("teacher"), r.get("alpha_schedule")) for r in scored}, key=str)
    schedules = sorted({s for _, s in groups}, key=str)
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(schedules)}
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_IN)
    for schedule in schedules:
        xs, ys = zip(*[(groups.index((r.get("teacher"), schedule)), r[metric]) for r in scored
                       if r.get("alpha_schedule") == schedule], strict=True)
        axes.plot(xs, ys, "o", alpha=0.7, color=colours[schedule], label=f"alpha schedule: {schedule}")
    if scored:
        best = (min if mode == "min" else max)(scored, key=lambda r: r[metric])
        axes.plot(groups.index((best.get("teacher"), best.get("alpha_schedule"))), best[metric], "o", ms=14,
                  mfc="none", mec="tab:red", label=f"best trial ({best.get('trial')})")
        axes.legend(fontsize=8)
    axes.set_xticks(range(len(groups)), [f"{t}\n{s}" for t, s in groups])
    axes.set(xlabel="teacher / alpha schedule",
             ylabel=y_label(metric, mode=mode, target_fa_per_hour=target_fa_per_hour),
             title=f"{metric} of each trial, by teacher and alpha schedule")
    axes.grid(True, axis="y", alpha=0.3)
    return save(figure, path)


def saved_target(store: Storage, name: str) -> float | None:
    """The target FA/h of the config the experiment saved (what its metric was measured at); None if unreadable."""
    try:
        return validate(yaml.safe_load(read_text(store, f"{name}/config.yaml"))).training.target_fa_per_hour
    except (OSError, KdTuneError, yaml.YAMLError):
        return None


def sweep_plots(store: Storage, name: str, rows: list[dict], space: SearchSpace, *, metric: str, mode: str,
                target_fa_per_hour: float | None = None) -> list[str]:
    """The sweep's PNGs under <experiment>/plots/ (rendered locally, then copied for s3://); returns their paths."""
    target = target_fa_per_hour or saved_target(store, name)
    study = study_from_rows(rows, space, metric=metric, mode=mode, records=trial_records(store, name))
    searched = [n for n, spec in space if spec is not None]
    with tempfile.TemporaryDirectory(prefix="kd_tune_plots_") as tmp:
        written = [optimization_history(study, Path(tmp, "history.png"), metric=metric, mode=mode,
                                        target_fa_per_hour=target),
                   param_importances(study, Path(tmp, "importances.png"), searched=searched),
                   metric_by_teacher_schedule(rows, Path(tmp, "by_teacher_schedule.png"), metric=metric, mode=mode,
                                              target_fa_per_hour=target)] if study.trials else []
        for path in written:
            store.write_bytes(f"{name}/{PLOTS_DIR}/{path.name}", path.read_bytes())
    return [store.path(f"{name}/{PLOTS_DIR}/{path.name}") for path in written]


def condition_curves(report: dict, path: Path) -> Path:
    """FRR at the target FA/h against SNR, a line per noise type (solid: the first scorer, dashed: the others), the
    clean figure at the right; rooms, levels and microphones as points beside it."""
    figure, (noise_axes, other_axes) = plt.subplots(1, 2, figsize=(11.0, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    styles = ["-", "--", ":"]
    for number, (name, rows) in enumerate(report["scorers"].items()):
        clean = next((r["frr_at_target"] for r in rows if r["group"] == "clean"), None)
        for index, noise in enumerate(dict.fromkeys(r["noise"] for r in rows if r["group"] == "noise")):
            points = sorted((r["snr_db"], r["frr_at_target"]) for r in rows if r["noise"] == noise)
            noise_axes.plot(*zip(*points, strict=True), styles[number % 3], marker="o", color=f"C{index}",
                            label=f"{noise} ({name})" if number == 0 or index == 0 else None)
        if clean is not None:
            noise_axes.axhline(clean, color="black", linestyle=styles[number % 3], linewidth=0.8,
                               label=f"clean ({name})")
        others = [r for r in rows if r["group"] in ("room", "level", "mic")]
        other_axes.plot([r["condition"] for r in others], [r["frr_at_target"] for r in others], styles[number % 3],
                        marker="o", label=name)
    target = f"FRR at {report['target_fa_per_hour']:g} FA/h (lower is better)"
    noise_axes.set(xlabel="SNR (dB, over the 1 s clip)", ylabel=target, ylim=(-0.02, 1.02),
                   title="noise: " + " vs ".join(report["scorers"]))
    # below the axes: inside, the legend hid the points under it
    noise_axes.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    other_axes.set(ylabel=target, ylim=(-0.02, 1.02), title="rooms, levels, microphones")
    other_axes.tick_params(axis="x", labelrotation=70, labelsize=7)
    other_axes.legend(fontsize=7)
    for axes in (noise_axes, other_axes):
        axes.grid(True, alpha=0.3)
    return save(figure, path)
