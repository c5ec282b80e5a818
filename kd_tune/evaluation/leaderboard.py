"""A sweep's results, Ray-free: one leaderboard row per trial at its best epoch, written as CSV and JSON, read back
by `kd-tune results` and `kd-tune export`, and the experiment's saved config and search space.

`leaderboard` reads a Ray Tune ResultGrid through its public attributes only; nothing here imports Ray. A trial's
epochs are the epochs `fit` reported (a resumed trial restarts Tune's training_iteration, not its epoch), and its
status says whether it ran to its end: OK (its last epoch, or stopped by ASHA), INCOMPLETE (stopped before that,
e.g. by `ray job stop`), NOT_STARTED (no epoch reported) or ERROR.

What the console prints of a sweep is here too, Ray-free so that `kd-tune results` never loads Ray: the leaderboard
within CONSOLE_COLUMNS (an OK trial that ASHA stopped early shows as `OK (ASHA, 2/6)`) and the result block that ends
every sweep and demo.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

from pyarrow.fs import FileType

from kd_tune.config import Config, ConfigError, validate
from kd_tune.deploy.detect import read_card
from kd_tune.errors import InputError, KdTuneError, shown
from kd_tune.metrics import METRICS, epoch_key
from kd_tune.space import TRIAL_PREFIX, SearchSpace, space_from, trial_id_of
from kd_tune.store.checkpoint import Identity, verify_checkpoint
from kd_tune.store.storage import Storage, check_plain_uri, read_json, write_text
from kd_tune.training.teachers import TEACHER_KIND, teacher_store
from kd_tune.yamlfile import MAX_YAML_BYTES, yaml_from_bytes

LEADERBOARD_NAME = "leaderboard.json"
LOG_NAME = "sweep.log"  # Ray's tables and actor logs, inside the experiment (unless --verbose)
TRIAL_COLUMNS = ("trial", "status", "teacher", "alpha_schedule", "alpha_start", "alpha_end", "temperature",
                 "temperature_schedule", "temperature_end", "lr", "student_width", "epochs")
METRIC_COLUMNS = tuple(name for name, m in METRICS.items() if m.column)
LEADERBOARD_COLUMNS = (*TRIAL_COLUMNS, *METRIC_COLUMNS, "node", "checkpoint")
STATUSES = ("OK", "INCOMPLETE", "NOT_STARTED", "ERROR")
CONSOLE_COLUMNS = 120  # the terminal width the console's leaderboard and result block stay within
LEAD_CELLS = ("trial", "status", "teacher", "schedule", "alpha", "T")  # the console's setting columns, shortened
MAX_TEACHER_CHARS = 12
# The shown metric columns the console gives up first when its leaderboard is too wide: the files keep every
# column, and the result block shows the winner's fa_per_hour against its target.
DROP_FIRST = ("accuracy", "fa_per_hour")
WEAK_TEACHER_AUC = 0.8  # a teacher below this validation AUC is flagged in the result block
# TensorBoard smooths by 0.6 unless the URL says otherwise, and on a few epochs that shows 0.97 for a 1
TENSORBOARD_URL = "http://localhost:6006/?smoothing=0#timeseries"
CLEAN_FRR_TARGET = 0.05  # FRR at 1 FA/h on the clean test split: the quality target (README, "Quality outside")
# What frr_conditions averages besides clean: the validation positives under kd_tune.training.scoring.VALIDATION_MIX
CONDITION_METRICS = tuple(n for n in METRICS if n.startswith("frr_")
                          and n not in ("frr_conditions", "frr_at_target_fa"))

def leaderboard(grid, config: Config) -> list[dict]:
    """One row per trial at its best epoch that still has a checkpoint (retention may have pruned others)."""
    metric, mode = config.tune.metric, config.tune.mode
    filesystem = Storage.from_config(config.storage).filesystem
    rows = []
    for result in grid:
        params = result.config or {}
        df = result.metrics_dataframe
        row = {"trial": trial_id_of(Path(result.path).name),
               "status": trial_status(df, error=result.error is not None, epochs=config.training.epochs),
               "teacher": params.get("teacher"), "alpha_schedule": params.get("alpha_schedule"),
               "alpha_start": params.get("alpha_start"),
               "alpha_end": params.get("alpha_end", params.get("alpha_start")),
               "temperature": params.get("temperature"),
               "temperature_schedule": params.get("temperature_schedule", "constant"),
               "temperature_end": params.get("temperature_end"),  # sampled only for a decaying temperature
               "lr": params.get("lr", config.training.lr),
               "student_width": params.get("student_width", config.student.width)}
        best = best_epoch(df, metric, mode, filesystem)
        if best is not None:
            row |= {k: _plain(best[k]) for k in LEADERBOARD_COLUMNS if k in best and k not in row}
            row["checkpoint"] = best["checkpoint_path"]
        row["epochs"] = last_epoch(df)
        # ranked by the rule on its best epoch, as `export` ranks the verified checkpoints (the row keeps `epochs`)
        rows.append((epoch_key({**row, "epoch": best and best["epoch"]}, metric, mode), row))
    return [row for _, row in sorted(rows, key=lambda ranked: ranked[0])]


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


def best_epoch(df, metric: str, mode: str, filesystem) -> dict | None:
    """The best reported epoch (metrics.epoch_key) whose checkpoint still exists."""
    if df is None or metric not in df or "checkpoint_path" not in df:
        return None
    for row in sorted(df.to_dict("records"), key=lambda r: epoch_key(r, metric, mode)):
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
    """The rows `kd-tune sweep` wrote: strict JSON within MAX_JSON_BYTES (refused from its size before it is read)
    and nested as rows are; it is unsigned and decides nothing, but a broken one is one line, not a traceback."""
    store, name = experiment_storage(experiment, config)
    rows = read_json(store, f"{name}/{LEADERBOARD_NAME}")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(
            isinstance(v, (str, int, float, type(None))) for v in r.values()) for r in rows):
        raise InputError(f"{experiment}/{LEADERBOARD_NAME}: not a list of rows ({shown(rows)}); allowed: the list "
                         "of objects of numbers, strings and nulls that `kd-tune sweep` writes")
    return rows


def load_experiment(experiment: str, base: Config) -> tuple[Config, SearchSpace, str]:
    """The config, search space and name saved by the sweep that wrote `experiment` (storage settings from base),
    each read within kd_tune.yamlfile's limits and refused in one line naming the file."""
    store, name = experiment_storage(experiment, base)
    source = f"{experiment}/config.yaml"
    saved = validate(saved_yaml(store, f"{name}/config.yaml", source), source=source)
    config = saved.replace({"storage": {**base.storage.model_dump(), "root": store.uri}}, source=source)
    space_source = f"{experiment}/search_space.yaml"
    return config, space_from(saved_yaml(store, f"{name}/search_space.yaml", space_source), source=space_source), name


def saved_yaml(store: Storage, rel: str, source: str):
    """A YAML file a sweep saved: a FIFO, a folder, a huge, missing or broken file is one ConfigError naming it."""
    try:
        return yaml_from_bytes(store.read_within(rel, MAX_YAML_BYTES), source=source)
    except FileNotFoundError:
        raise ConfigError(source, ["missing; allowed: an experiment folder `kd-tune sweep` wrote"]) from None


def experiment_storage(experiment: str, config: Config) -> tuple[Storage, str]:
    """Split `PATH_OR_URI/NAME` into the storage root and the experiment name."""
    check_plain_uri(experiment, "EXPERIMENT")  # `?secret_key=...` would reach the name, then every message
    root, slash, name = experiment.rstrip("/").rpartition("/")
    root = root or ("/" if slash else ".")  # /NAME lies in /, which is refused as a storage root
    return Storage.from_config(config.replace({"storage.root": root}, source="EXPERIMENT").storage), name


# ---------------------------------------------------------------- what the console prints


def format_leaderboard(rows: list[dict], config: Config, *, experiment: str, wide: bool = False) -> str:
    """The leaderboard as the console prints it, best first: the metric columns METRICS marks shown, within
    CONSOLE_COLUMNS (DROP_FIRST goes first, then the last shown ones, never the sweep's metric). `wide` keeps every
    shown metric and adds the checkpoint paths, under `experiment` wherever the sweep wrote them."""
    metric = config.tune.metric
    metrics = list(dict.fromkeys((metric, *(n for n, m in METRICS.items() if m.shown))))
    cells = [console_cells(r, metrics, epochs=config.training.epochs, experiment=experiment, wide=wide) for r in rows]
    if wide:
        return table(cells, [*LEAD_CELLS, *metrics, "epochs", "checkpoint"])
    droppable = [m for m in dict.fromkeys((*DROP_FIRST, *reversed(metrics))) if m in metrics and m != metric]
    while True:
        text = table(cells, [*LEAD_CELLS, *metrics, "epochs"])
        if not droppable or max(map(len, text.splitlines())) <= CONSOLE_COLUMNS:
            return text
        metrics.remove(droppable.pop(0))


def console_cells(row: dict, metrics: list[str], *, epochs: int, experiment: str, wide: bool) -> dict[str, str]:
    teacher = cell(row.get("teacher"))
    if not wide and len(teacher) > MAX_TEACHER_CHARS:  # names may run to 40 characters; the result block has it whole
        teacher = teacher[:MAX_TEACHER_CHARS - 1] + "~"
    return {"trial": cell(row.get("trial")), "status": shown_status(row, epochs), "teacher": teacher,
            "schedule": cell(row.get("alpha_schedule")),
            "alpha": span(row.get("alpha_start"), row.get("alpha_end"), "{:.2f}"),
            "T": span(row.get("temperature"), row.get("temperature_end"), "{:.3g}"),
            **{m: cell(row.get(m)) for m in metrics}, "epochs": cell(row.get("epochs")),
            "checkpoint": cell(checkpoint_in(experiment, row))}


def table(cells: list[dict[str, str]], cols: list[str]) -> str:
    lines = [cols] + [[c[col] for col in cols] for c in cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def shown_status(row: dict, epochs: int) -> str:
    """The status the console shows: a trial that is OK before training.epochs was stopped by ASHA (the only early
    end trial_status calls OK), and says so with how far it got."""
    last = row.get("epochs") or 0
    if row.get("status") == "OK" and isinstance(last, (int, float)) and last < epochs:
        return f"OK (ASHA, {last}/{epochs})"
    return cell(row.get("status"))


def checkpoint_in(experiment: str, row: dict) -> str | None:
    """The row's checkpoint under `experiment` as given: a moved or copied experiment names its own trials, not the
    folder the sweep wrote them to (leaderboard.json keeps that one)."""
    path, trial = row.get("checkpoint"), row.get("trial")
    parts = str(path or "").split("/")
    for i, part in enumerate(parts):
        if part.startswith(TRIAL_PREFIX) and trial_id_of(part) == trial:
            return "/".join([experiment.rstrip("/"), *parts[i:]])
    return path


def span(start, end, form: str, arrow: str = "->") -> str:
    """One value, or how a schedule moves it: 0.90->0.10."""
    if not isinstance(start, (int, float)):
        return cell(start)
    if not isinstance(end, (int, float)) or end == start:
        return form.format(start)
    return f"{form.format(start)}{arrow}{form.format(end)}"


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def result_block(rows: list[dict], config: Config, *, experiment: str, model: str | None = None,
                 test: dict | None = None) -> str:
    """The console's last lines after a sweep, a demo or `kd-tune results`: the winning trial, its setting in one
    line, its validation figures against their targets (flagged when missed), weak teachers, the exported model and
    its test figures (`test`, the evaluation report) against theirs, and what to run next; every line within
    CONSOLE_COLUMNS but for a path longer than that."""
    lines = [*winner(rows, config), *weak_teachers(rows, config), *model_lines(model, rows),
             *test_figures(test, config.training.target_fa_per_hour),
             *next_steps(config, experiment=experiment, model=model)]
    return "\n".join(["", *lines])


def winner(rows: list[dict], config: Config) -> list[str]:
    metric, epochs = config.tune.metric, config.training.epochs
    best = rows[0] if rows else {}
    if not isinstance(best.get(metric), (int, float)):
        return [f"result: no trial reported {metric}"]
    ties = sum(1 for r in rows[1:] if r.get(metric) == best[metric])
    stopped = sum(1 for r in rows if shown_status(r, epochs).startswith("OK (ASHA"))
    head = (f"result: trial {best['trial']} is best by {metric} of {len(rows)} trials"
            + (f", tied with {ties} other{'s' * (ties > 1)}" if ties else "")
            + (f"; {stopped} stopped early by ASHA" if stopped else "")
            + ("" if best.get("status") == "OK" else f"; its status: {shown_status(best, epochs)}"))
    return [head, "  setting: " + setting(best), "  validation:",
            *figures(best, config.training.target_fa_per_hour)]


def setting(row: dict) -> str:
    temperature = span(row.get("temperature"), row.get("temperature_end"), "{:.3g}", " -> ")
    if row.get("temperature_schedule") not in (None, "constant"):
        temperature += f" ({row['temperature_schedule']})"
    return (f"teacher {cell(row.get('teacher'))}, alpha {cell(row.get('alpha_schedule'))} "
            f"{span(row.get('alpha_start'), row.get('alpha_end'), '{:.2f}', ' -> ')}, temperature {temperature}, "
            f"lr {cell(row.get('lr'))}, width {cell(row.get('student_width'))}")


def figures(row: dict, target: float) -> list[str]:
    """The winner's validation figures, each with what it means and its target; MISSED where it is not met."""
    at = f"FRR at {target:g} FA/h"
    meaning = {"frr_conditions": (f"{at}, mean of clean and {len(CONDITION_METRICS)} conditions; lower is better",
                                  lambda v: v >= 1, "no wake word caught"),
               "frr_at_target_fa": (f"{at}, clean; lower is better", lambda v: v >= 1, "no wake word caught"),
               "fa_per_hour": (f"false activations per hour; target <= {target:g}", lambda v: v > target,
                               "above the target")}
    return [figure_line(name, row.get(name), text, missed, why) for name, (text, missed, why) in meaning.items()]


def figure_line(name: str, value, text: str, missed: Callable[[float], bool], why: str) -> str:
    known = isinstance(value, (int, float))
    flag = f"  MISSED: {why}" if known and missed(value) else ""
    return f"    {name:<16}  {cell(value) if known else '-':<7}  {text}{flag}"


def test_figures(report: dict | None, target_fa: float) -> list[str]:
    """The exported model's figures on the test split (a kd_tune.evaluation.heldout report) against their targets."""
    if not report:
        return []
    frr = report["frr_at_fa_per_hour"].get("1")
    return [f"  test: {report['positives']} wake words of voices never heard, {report['negative_hours']:.2f} h of "
            "negative audio:",
            figure_line("frr_at_1_fa_h", frr, f"FRR at 1 FA/h, threshold set on this audio; target <= "
                        f"{CLEAN_FRR_TARGET:g}", lambda v: v > CLEAN_FRR_TARGET, "above the target"),
            figure_line("frr", report["frr"], "FRR at the model's threshold", lambda v: v >= 1, "no wake word caught"),
            figure_line("fa_per_hour", report["fa_per_hour"], f"at the model's threshold; target <= {target_fa:g}",
                        lambda v: v > target_fa, "above the target")]


def weak_teachers(rows: list[dict], config: Config) -> list[str]:
    """A line per teacher of the rows whose validation AUC, from its verified manifest, is below WEAK_TEACHER_AUC,
    or whose manifest cannot be read."""
    used: dict[str, int] = {}
    for row in rows:
        for name in str(row.get("teacher") or "").split("+"):  # an ensemble counts for each of its teachers
            if name:
                used[name] = used.get(name, 0) + 1
    lines = []
    for name, count in sorted(used.items(), key=lambda item: -item[1]):
        auc = teacher_auc(config, name)
        if isinstance(auc, str):
            lines.append(f"  teacher {name}: validation AUC not read: {auc}"[:CONSOLE_COLUMNS])
        elif auc is not None and auc < WEAK_TEACHER_AUC:
            lines.append(f"  WEAK TEACHER {name}: validation AUC {auc:.3f} < {WEAK_TEACHER_AUC:g}, used by {count} of "
                         f"{len(rows)} trials")
    return lines


def teacher_auc(config: Config, name: str) -> float | str | None:
    """A teacher's validation AUC from its manifest, verified (hashes, signature, identity) as every load does;
    the reason, as text, when it cannot be read; None when the manifest holds none."""
    try:
        manifest = verify_checkpoint(teacher_store(config), name, expect=Identity(TEACHER_KIND, name))
    except (KdTuneError, OSError) as error:
        return " ".join(str(error).split())
    auc = (manifest.get("metrics") or {}).get("auc")
    return float(auc) if isinstance(auc, (int, float)) else None


def model_lines(model: str | None, rows: list[dict]) -> list[str]:
    """The exported model and the trial it holds (its signed card says; export ranks the verified checkpoints, so
    on a tie it may be another trial than the leaderboard's first)."""
    if model is None:
        return []
    try:
        source = (read_card(Path(model)).model_extra or {}).get("source") or {}
    except KdTuneError as error:
        return [f"  model: {model}", f"    its card cannot be read: {' '.join(str(error).split())}"[:CONSOLE_COLUMNS]]
    trial, first = source.get("trial"), rows[0].get("trial") if rows else None
    other = "" if trial == first else f" (not {first}: export ranks the verified checkpoints)"
    return [f"  model: {model}", f"    exported from trial {trial}{other}"]


def next_steps(config: Config, *, experiment: str, model: str | None) -> list[str]:
    onnx = model or "model.onnx"
    export = [] if model else [f"  kd-tune export {experiment} --out model.onnx"]
    return ["next:", *export, f"  kd-tune eval {onnx} {config.data.root} --conditions default",
            f"  kd-tune detect {onnx} FILE.wav", f"  tensorboard --logdir {experiment}",
            f"    then open {TENSORBOARD_URL} (unsmoothed: a trial's lines have 2-6 points)"]
