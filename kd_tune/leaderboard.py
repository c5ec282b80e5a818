"""A sweep's results, Ray-free: one leaderboard row per trial at its best epoch, written as CSV and JSON, read back
by `kd-tune results` and `kd-tune export`, and the experiment's saved config and search space.

`leaderboard` reads a Ray Tune ResultGrid through its public attributes only; nothing here imports Ray. A trial's
epochs are the epochs `fit` reported (a resumed trial restarts Tune's training_iteration, not its epoch), and its
status says whether it ran to its end: OK (its last epoch, or stopped by ASHA), INCOMPLETE (stopped before that,
e.g. by `ray job stop`), NOT_STARTED (no epoch reported) or ERROR.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml
from pyarrow.fs import FileType

from kd_tune.config import Config, validate
from kd_tune.metrics import METRICS
from kd_tune.space import SearchSpace
from kd_tune.storage import Storage, check_plain_uri, read_text, write_text

LEADERBOARD_NAME = "leaderboard.json"
TRIAL_COLUMNS = ("trial", "status", "teacher", "alpha_schedule", "alpha_start", "alpha_end", "temperature",
                 "temperature_schedule", "lr", "student_width", "epochs")
METRIC_COLUMNS = tuple(name for name, m in METRICS.items() if m.column)
LEADERBOARD_COLUMNS = (*TRIAL_COLUMNS, *METRIC_COLUMNS, "node", "checkpoint")
STATUSES = ("OK", "INCOMPLETE", "NOT_STARTED", "ERROR")

def leaderboard(grid, config: Config) -> list[dict]:
    """One row per trial at its best epoch that still has a checkpoint (retention may have pruned others)."""
    metric, mode = config.tune.metric, config.tune.mode
    filesystem = Storage.from_config(config.storage).filesystem
    rows = []
    for result in grid:
        params = result.config or {}
        df = result.metrics_dataframe
        row = {"trial": Path(result.path).name.removeprefix("trial_").split("_", 1)[0],
               "status": trial_status(df, error=result.error is not None, epochs=config.training.epochs),
               "teacher": params.get("teacher"), "alpha_schedule": params.get("alpha_schedule"),
               "alpha_start": params.get("alpha_start"),
               "alpha_end": params.get("alpha_end", params.get("alpha_start")),
               "temperature": params.get("temperature"),
               "temperature_schedule": params.get("temperature_schedule", "constant"),
               "lr": params.get("lr", config.training.lr),
               "student_width": params.get("student_width", config.student.width)}
        best = best_epoch(df, metric, mode, filesystem)
        if best is not None:
            row |= {k: _plain(best[k]) for k in LEADERBOARD_COLUMNS if k in best and k not in row}
            row["checkpoint"] = best["checkpoint_path"]
        row["epochs"] = last_epoch(df)
        rows.append(row)
    worst = float("inf") if mode == "min" else float("-inf")
    return sorted(rows, key=lambda r: r.get(metric, worst) if mode == "min" else -r.get(metric, worst))


def last_epoch(df) -> int:
    """The last epoch a trial reported; 0 if none."""
    if df is None or "epoch" not in df or not df["epoch"].notna().any():
        return 0
    return int(df["epoch"].max())


def trial_status(df, *, error: bool, epochs: int) -> str:
    """OK: it reached its last epoch, or ASHA stopped it (Tune marks the result that a scheduler stops on with
    done=True; a stop from outside, such as `ray job stop`, reports nothing more); else INCOMPLETE, NOT_STARTED
    or ERROR."""
    if error:
        return "ERROR"
    last = last_epoch(df)
    if last == 0:
        return "NOT_STARTED"
    stopped_by_scheduler = "done" in df and bool(df["done"].fillna(False).iloc[-1])  # the last report
    return "OK" if last >= epochs or stopped_by_scheduler else "INCOMPLETE"


def best_epoch(df, metric: str, mode: str, filesystem):
    """The best reported epoch whose checkpoint still exists; ties go to the later epoch."""
    if df is None or metric not in df or "checkpoint_path" not in df:
        return None
    ranked = df.sort_values([metric, "epoch"], ascending=[mode == "min", False])
    for _, row in ranked.iterrows():
        path = row["checkpoint_path"]
        if isinstance(path, str) and filesystem.get_file_info(path).type != FileType.NotFound:
            return row
    return None


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def write_leaderboard(store: Storage, name: str, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(store, f"{name}/leaderboard.csv", out.getvalue())
    write_text(store, f"{name}/{LEADERBOARD_NAME}", json.dumps(rows, indent=2, default=str))


def read_leaderboard(experiment: str, config: Config) -> list[dict]:
    store, name = experiment_storage(experiment, config)
    return json.loads(read_text(store, f"{name}/{LEADERBOARD_NAME}"))


def load_experiment(experiment: str, base: Config) -> tuple[Config, SearchSpace, str]:
    """The config, search space and name saved by the sweep that wrote `experiment` (storage settings from base)."""
    store, name = experiment_storage(experiment, base)
    source = f"{experiment}/config.yaml"
    saved = validate(yaml.safe_load(read_text(store, f"{name}/config.yaml")), source=source)
    config = saved.replace({"storage": {**base.storage.model_dump(), "root": store.uri}}, source=source)
    space = SearchSpace.model_validate(yaml.safe_load(read_text(store, f"{name}/search_space.yaml")))
    return config, space, name


def experiment_storage(experiment: str, config: Config) -> tuple[Storage, str]:
    """Split `PATH_OR_URI/NAME` into the storage root and the experiment name."""
    check_plain_uri(experiment, "EXPERIMENT")  # `?secret_key=...` would reach the name, then every message
    root, _, name = experiment.rstrip("/").rpartition("/")
    return Storage.from_config(config.replace({"storage.root": root or "."}).storage), name


def format_leaderboard(rows: list[dict], *, metric: str) -> str:
    shown = (name for name, m in METRICS.items() if m.shown)
    cols = tuple(dict.fromkeys((*TRIAL_COLUMNS[:7], metric, *shown, "epochs", "checkpoint")))
    table = [cols] + [tuple(cell(r.get(c)) for c in cols) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
