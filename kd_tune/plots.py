"""PNG plots of what a sweep learned and of an exported model's operating range (matplotlib, no display needed).

- `det_curve`: FRR against false activations per hour, the model's own threshold marked.
- `optimization_history` and `param_importances`: Optuna's own plots, over a study rebuilt from the leaderboard
  (the sweep's in-memory study is not saved, and the leaderboard holds the values a user reads anyway).
- `metric_by_teacher_schedule`: the sweep metric of every trial, grouped by teacher and alpha schedule.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import optuna  # noqa: E402
from optuna.distributions import CategoricalDistribution, FloatDistribution  # noqa: E402

from kd_tune.space import SearchSpace  # noqa: E402
from kd_tune.storage import Storage  # noqa: E402

PLOTS_DIR = "plots"
DPI = 120
FIGURE_SIZE_IN = (7.0, 4.5)
# leaderboard column -> search-space parameter, for the effective values every row carries
ROW_PARAMS = {"teacher": "teacher", "alpha_schedule": "alpha_schedule", "alpha_start": "alpha_start",
              "alpha_end": "alpha_end", "temperature": "temperature", "temperature_end": "temperature_end",
              "lr": "lr", "weight_decay": "weight_decay", "student_width": "student_width"}


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(figure)
    partial.replace(path)  # atomic: a reader never sees half a PNG
    return path


def det_curve(points: list[dict], path: Path, *, operating_point: dict | None = None, title: str = "") -> Path:
    """points: [{"fa_per_hour", "frr"}, ...]; the x axis is symmetric-log so that 0 FA/h stays on the plot."""
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_IN)
    # From the highest threshold down to the one with the most false activations: below it the detector fires on
    # nearly everything, sustained activations merge and count once, and FA/h falls again, which is no operating
    # range anyone would pick.
    ordered = sorted(points, key=lambda p: -p["threshold"])
    fa = [p["fa_per_hour"] for p in ordered]
    usable = ordered[:fa.index(max(fa)) + 1] if fa else []
    axes.plot([p["fa_per_hour"] for p in usable], [p["frr"] for p in usable], marker=".", markersize=3)
    if operating_point:
        axes.plot(operating_point["fa_per_hour"], operating_point["frr"], "o", color="tab:red",
                  label=f"threshold {operating_point['threshold']:.3f}")
        axes.legend()
    axes.set_xscale("symlog", linthresh=1.0)
    axes.set(xlabel="false activations per hour", ylabel="false-reject rate", ylim=(0, 1.02),
             title=title or "DET curve")
    axes.grid(True, which="both", alpha=0.3)
    return save(figure, path)


def study_from_rows(rows: list[dict], space: SearchSpace, *, metric: str, mode: str) -> optuna.Study:
    """An Optuna study holding one finished trial per leaderboard row that has the metric."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" on the console
    try:
        study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    distributions = distributions_of(space)
    for row in rows:
        value = row.get(metric)
        if value is None or not math.isfinite(value):
            continue
        params = {name: row[column] for column, name in ROW_PARAMS.items()
                  if name in distributions and row.get(column) is not None}
        study.add_trial(optuna.trial.create_trial(params=params, value=value,
                                                  distributions={n: distributions[n] for n in params}))
    return study


def distributions_of(space: SearchSpace) -> dict:
    """Every searched parameter's distribution; effective values (alpha_end of a constant schedule = alpha_start)
    may fall outside a conditional range, so ranges are widened to hold both."""
    out = {}
    for name, spec in space:
        if spec is None:
            continue
        if hasattr(spec, "choices"):
            out[name] = CategoricalDistribution(spec.choices)
        else:
            out[name] = FloatDistribution(spec.low, spec.high, log=spec.log)
    for end, start in (("alpha_end", "alpha_start"), ("temperature_end", "temperature")):
        if end in out and start in out:
            low = min(out[end].low, out[start].low)
            high = max(out[end].high, out[start].high)
            out[end] = FloatDistribution(low, high, log=out[end].log and low > 0)
    return out


def optimization_history(study: optuna.Study, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = optuna.visualization.matplotlib.plot_optimization_history(study)
    return save(axes.figure, path)


def param_importances(study: optuna.Study, path: Path) -> Path | None:
    """None when the study cannot rank parameters (fewer than two finished trials, or one value throughout)."""
    values = {t.value for t in study.trials}
    if len(study.trials) < 2 or len(values) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = optuna.visualization.matplotlib.plot_param_importances(study)
    return save(axes.figure, path)


def metric_by_teacher_schedule(rows: list[dict], path: Path, *, metric: str) -> Path:
    """One column of points per (teacher, alpha schedule), each point a trial; the best trial circled."""
    groups = sorted({(r.get("teacher"), r.get("alpha_schedule")) for r in rows if r.get(metric) is not None},
                    key=str)
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_IN)
    for x, group in enumerate(groups):
        values = [r[metric] for r in rows if (r.get("teacher"), r.get("alpha_schedule")) == group
                  and r.get(metric) is not None]
        axes.plot([x] * len(values), values, "o", alpha=0.7)
    best = rows[0] if rows and rows[0].get(metric) is not None else None  # leaderboard rows come best first
    if best is not None:
        axes.plot(groups.index((best.get("teacher"), best.get("alpha_schedule"))), best[metric], "o", ms=14,
                  mfc="none", mec="tab:red", label="best trial")
        axes.legend()
    axes.set_xticks(range(len(groups)), [f"{t}\n{s}" for t, s in groups])
    axes.set(xlabel="teacher / alpha schedule", ylabel=metric, title=f"{metric} by teacher and alpha schedule")
    axes.grid(True, axis="y", alpha=0.3)
    return save(figure, path)


def sweep_plots(store: Storage, name: str, rows: list[dict], space: SearchSpace, *, metric: str,
                mode: str) -> list[str]:
    """The sweep's PNGs under <experiment>/plots/ (rendered locally, then copied for s3://); returns their paths."""
    study = study_from_rows(rows, space, metric=metric, mode=mode)
    with tempfile.TemporaryDirectory(prefix="kd_tune_plots_") as tmp:
        written = [p for p in (optimization_history(study, Path(tmp, "history.png")) if study.trials else None,
                               param_importances(study, Path(tmp, "importances.png")),
                               metric_by_teacher_schedule(rows, Path(tmp, "by_teacher_schedule.png"), metric=metric)
                               if study.trials else None) if p is not None]
        for path in written:
            store.write_bytes(f"{name}/{PLOTS_DIR}/{path.name}", path.read_bytes())
    return [store.path(f"{name}/{PLOTS_DIR}/{path.name}") for path in written]
