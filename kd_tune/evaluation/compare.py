"""`kd-tune compare`: what distillation is worth on a data set, at equal budget, over seeds.

Each arm is one KD setting: the configured run (or the best trial of a sweep) with alpha = 0 (no teacher signal),
and with each teacher or ensemble. Every arm trains once per seed with the same data, augmentation, epochs and
student (`kd-tune train`'s loop); its best epoch is exported with a threshold calibrated on validation, and
`kd-tune eval` measures it on the test split (the held-out voice families). The table gives each figure's mean and
its spread (sample standard deviation) over seeds, so a difference smaller than the spread reads as noise.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from kd_tune.config import Config, apply_overrides, validate
from kd_tune.deploy.export import export_student
from kd_tune.evaluation.heldout import evaluate_model
from kd_tune.evaluation.robustness import SHORT_STREAM_MINUTES, group_means, run_grid
from kd_tune.evaluation.source import Source, locate_source
from kd_tune.metrics import BestEpoch
from kd_tune.space import ENSEMBLE_JOIN
from kd_tune.store.storage import Storage, write_text
from kd_tune.training.record import run_training

NO_KD = "alpha=0"
# (column, figure of a run) in table order; "test" is the held-out voice families, "val" the validation split
COLUMNS = (("test FRR @ 1 FA/h", "test_frr_at_1"), ("test FRR @ 2 FA/h", "test_frr_at_2"),
           ("test FRR @ threshold", "test_frr"), ("test FA/h @ threshold", "test_fa_per_hour"),
           ("test AUC", "test_auc"), ("val FRR @ target", "val_frr"))
# with --conditions: the mean FRR at 1 FA/h over the whole grid and over its groups (kd_tune.evaluation.robustness)
GRID_COLUMNS = (("grid FRR @ 1 FA/h", "grid"), ("clean", "clean"), ("noise 10 dB", "noise 10 dB"),
                ("noise 0 dB", "noise 0 dB"), ("rooms", "room"), ("levels", "level"), ("mics", "mic"))


@dataclass(frozen=True)
class Arm:
    name: str
    changes: dict  # config overrides: dotted key -> value

    @property
    def slug(self) -> str:
        return self.name.replace("=", "").replace("+", "-").replace(" ", "_")


def arms_of(config: Config, teachers: list[str]) -> list[Arm]:
    """alpha = 0 first (its teachers only change what the cache holds, never the student's loss), then KD from each
    teacher or "+"-joined ensemble with the config's own schedules."""
    no_kd = Arm(NO_KD, {"distillation.alpha_start": 0.0, "distillation.alpha_end": 0.0,
                        "distillation.teachers": teachers[0].split(ENSEMBLE_JOIN)})
    return [no_kd, *(Arm(f"KD {t}", {"distillation.teachers": t.split(ENSEMBLE_JOIN)}) for t in teachers)]


def run_arm(config: Config, arm: Arm, seed: int, *, name: str, out: Path, conditions: str | None = None) -> dict:
    """Train one arm at one seed as run `name/<arm>_seed<seed>` on the configured storage (its teachers and teacher
    cache are shared), export its best epoch to `out` and evaluate it there; the figures of COLUMNS."""
    run, local = f"{name}/{arm.slug}_seed{seed}", out / f"{arm.slug}_seed{seed}"
    cfg = config.replace({**arm.changes, "training.seed": seed, "storage.keep_best": config.training.epochs},
                         source=f"compare arm {arm.name}")
    best = BestEpoch(cfg.tune.metric, cfg.tune.mode)
    run_training(cfg, name=run, echo=best.offer)
    assert best.result is not None, "run_training reports every epoch"
    epoch = int(best.result["epoch"])
    source = Source(Storage.from_config(cfg.storage), f"{run}/checkpoints/epoch_{epoch:04d}", trial=run)
    card = export_student(source.load(), local / "model.onnx", source=source.describe())
    report = evaluate_model(local / "model.onnx", Path(cfg.data.root), out_dir=local / "eval")
    grid = {}
    if conditions:
        rows = run_grid(local / "model.onnx", Path(cfg.data.root), local / "eval", grid=conditions,
                        stream_minutes=SHORT_STREAM_MINUTES, progress=None)["scorers"]["model"]
        grid = {key: group_means(rows).get(key) for _, key in GRID_COLUMNS}
    return grid | {"arm": arm.name, "seed": seed, "best_epoch": epoch, "val_frr": card["validation"]["frr"],
            "test_frr": report["frr"], "test_fa_per_hour": report["fa_per_hour"], "test_auc": report["auc"],
            "test_frr_at_1": report["frr_at_fa_per_hour"]["1"], "test_frr_at_2": report["frr_at_fa_per_hour"]["2"],
            "test_hours": report["negative_hours"]}


def compare(config: Config, teachers: list[str], *, seeds: int, name: str, out: Path, echo=print,
            conditions: str | None = None) -> list[dict]:
    """Every arm at seeds 0..seeds-1 (seed-major, so a stopped comparison has whole seeds); rows written to
    out/compare.json, and their table to out/compare.md, as they come."""
    arms = arms_of(config, teachers)
    for arm in arms:  # each arm's config checked now: a teacher that is not configured costs no training first
        config.replace(arm.changes, source=f"--teachers ({arm.name})")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in range(seeds):
        for arm in arms:
            rows.append(run_arm(config, arm, seed, name=name, out=out, conditions=conditions))
            echo(f"{arm.name} seed {seed}: " + ", ".join(f"{c} {cell(rows[-1][k])}" for c, k in COLUMNS))
            write_text(out, "compare.json", json.dumps(rows, indent=2) + "\n")
            write_text(out, "compare.md", table(rows) + "\n")
    return rows


def best_of_config(experiment: str, config: Config, overrides: list[str]) -> Config:
    """The whole setting of an experiment's best trial (schedules, temperature, student), `overrides` on top of it.
    `config` only locates the trial (its storage settings), so a bad override is named as the trial's."""
    trial = locate_source(experiment, config)
    return validate(apply_overrides(trial.load().manifest["config"], overrides), source=f"{experiment}'s best trial")


def cell(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def spread(values: list) -> str:
    """mean ± sample standard deviation (mean alone for one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict]) -> str:
    """A Markdown table: one line per arm, each figure as mean ± spread over its seeds."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    columns = COLUMNS + tuple(c for c in GRID_COLUMNS if any(c[1] in r for r in rows))
    lines = ["| arm | seeds | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(spread([r.get(k) for r in mine]) for _, k in columns)
                     + " |")
    return "\n".join(lines)
