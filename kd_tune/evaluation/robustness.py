"""`kd-tune eval MODEL DATA --conditions GRID`: a model measured under every condition of a grid (audio.conditions),
side by side with a baseline that was never trained (kd_tune.evaluation.baseline).

For each condition the positives, the negatives and the long negative audio go through the same condition (noise
changes false activations too), then:
- FRR and FA/h at the scorer's own threshold, on the conditioned positives and stream;
- FRR at the threshold that keeps this conditioned stream at TARGET_FA_PER_HOUR: the best any threshold could do;
- clip ROC AUC.
The table goes to conditions.md and conditions.json, and FRR against SNR per noise type to conditions.png.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_tune.audio.conditions import SAMPLE_RATE, Condition, ConditionError, Conditioner, parse_grid, read_noise_folders
from kd_tune.deploy.detect import Detector
from kd_tune.evaluation.baseline import PocketSphinxSpotter
from kd_tune.evaluation import plots
from kd_tune.evaluation.heldout import MAX_LONG_HOURS, EvalAudio, clip_scores, false_activations, read_eval_audio
from kd_tune.metrics import audio_hours, roc_auc, threshold_for_fa_rate
from kd_tune.progress import beside_bars, progress_bar
from kd_tune.store.storage import write_text

TARGET_FA_PER_HOUR = 1.0
# What the demo and `kd-tune compare` score of the test stream per condition: FA/h under every noise on a whole hour
# is ~40 hours of audio for the model.
SHORT_STREAM_MINUTES = 20.0
NEGATIVE_KEY = 1_000_003  # keeps the noise excerpts of negatives apart from the positives'
STREAM_KEY = 2_000_003
PRINT_NOW = functools.partial(print, flush=True)  # run_grid's default progress: each line shown as it happens


def capped_stream(recordings: list[np.ndarray], seconds: float | None) -> list[np.ndarray]:
    """The long recordings, cut to `seconds` of audio in all (None: all of them): the grid's cost bound."""
    if seconds is None:
        return recordings
    out, left = [], int(seconds * SAMPLE_RATE)
    for recording in recordings:
        if left <= 0:
            break
        out.append(recording[:left])
        left -= len(out[-1])
    return out


@dataclass(frozen=True)
class Conditioned:
    """The audio of an evaluation under one condition."""

    condition: Condition
    positives: list[np.ndarray]
    negatives: list[np.ndarray]
    recordings: list[np.ndarray]


def condition_audio(audio: EvalAudio, stream: list[np.ndarray], condition: Condition,
                    conditioner: Conditioner) -> Conditioned:
    """Positives, negatives and long audio under one condition: once, whatever the number of scorers."""
    return Conditioned(condition, [conditioner.clip(c, condition, i) for i, c in enumerate(audio.positives)],
                       [conditioner.clip(c, condition, NEGATIVE_KEY + i) for i, c in enumerate(audio.negatives)],
                       [conditioner.recording(r, condition, STREAM_KEY + i) for i, r in enumerate(stream)])


def measure(scorer, heard: Conditioned) -> dict:
    """One row of the table: the scorer's figures under one condition."""
    started = time.perf_counter()
    positives, negatives = clip_scores(scorer, heard.positives), clip_scores(scorer, heard.negatives)
    streams = [scorer.probabilities(r) for r in heard.recordings]
    hours = audio_hours(sum(len(r) for r in heard.recordings), SAMPLE_RATE)
    hop_seconds, refractory = scorer.hop_samples / scorer.sample_rate, scorer.refractory_seconds
    best = threshold_for_fa_rate(np.concatenate(streams), target_fa_per_hour=TARGET_FA_PER_HOUR,
                                 hop_seconds=hop_seconds, refractory_seconds=refractory, hours=hours)
    fa = false_activations(streams, scorer.threshold, hop_seconds=hop_seconds, refractory_seconds=refractory)
    auc = roc_auc(np.r_[positives, negatives], np.r_[np.ones(len(positives)), np.zeros(len(negatives))]) \
        if len(negatives) else math.nan
    c = heard.condition
    return {"condition": c.name, "group": c.group, "noise": c.noise, "snr_db": c.snr_db,
            "frr": float(np.mean(positives < scorer.threshold)), "fa_per_hour": fa / hours,
            "frr_at_target": float(np.mean(positives < best)), "threshold_at_target": best,
            "auc": None if math.isnan(auc) else auc, "seconds": time.perf_counter() - started}


def evaluate_grid(scorers: dict[str, object], audio: EvalAudio, *, grid: str, conditioner: Conditioner,
                  stream_seconds: float | None = None, progress=None) -> dict:
    """{"conditions": [...], "scorers": {name: [row per condition]}, ...} for every scorer on the same audio."""
    conditions = parse_grid(grid, conditioner.noise_types)
    stream = capped_stream(audio.recordings(), stream_seconds)
    rows: dict[str, list[dict]] = {name: [] for name in scorers}
    # with progress, also a bar with the time left: a condition on hours of audio takes minutes without a line
    with progress_bar(len(conditions) * len(scorers), "condition grid", "measurement", enabled=bool(progress),
                      leave=False) as bar:
        for number, condition in enumerate(conditions, start=1):
            heard = condition_audio(audio, stream, condition, conditioner)
            for name, scorer in scorers.items():
                rows[name].append(measure(scorer, heard))
                bar.update()
                if progress:
                    beside_bars(progress, f"conditions: {number}/{len(conditions)} {condition.name} ({name}): FRR "
                                          f"at {TARGET_FA_PER_HOUR:g} FA/h {rows[name][-1]['frr_at_target']:.3f}")
    return {"grid": grid, "target_fa_per_hour": TARGET_FA_PER_HOUR, "stream_hours": audio_hours(
        sum(len(r) for r in stream), SAMPLE_RATE), "positives": len(audio.positives),
        "negatives": len(audio.negatives), "conditions": [c.name for c in conditions], "scorers": rows}


def markdown(report: dict) -> str:
    """The table: one row per condition, for each scorer FRR and FA/h at its threshold and FRR at the target."""
    names = list(report["scorers"])
    target = f"{report['target_fa_per_hour']:g} FA/h"
    head = ["condition"] + [f"{n}: {col}" for n in names for col in ("FRR @ threshold", "FA/h @ threshold",
                                                                        f"FRR @ {target}")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, condition in enumerate(report["conditions"]):
        cells = [condition]
        for name in names:
            row = report["scorers"][name][i]
            cells += [f"{row['frr']:.3f}", f"{row['fa_per_hour']:.2f}", f"{row['frr_at_target']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_means(rows: list[dict]) -> dict[str, float]:
    """Mean FRR at the target per group (clean, noise at each SNR, room, level, mic) and over the whole grid."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        key = f"noise {row['snr_db']:g} dB" if row["group"] == "noise" else row["group"]
        groups.setdefault(key, []).append(row["frr_at_target"])
    return {key: float(np.mean(v)) for key, v in groups.items()} | {
        "grid": float(np.mean([r["frr_at_target"] for r in rows]))}


def write_grid(report: dict, out_dir: Path) -> dict:
    """conditions.png, conditions.md, then conditions.json (which names both), each written whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report["png"] = str(plots.condition_curves(report, out_dir / "conditions.png"))
    write_text(out_dir, "conditions.md", markdown(report) + "\n")
    report["md"] = str(out_dir / "conditions.md")
    write_text(out_dir, "conditions.json", json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict) -> str:
    """A line per scorer: its mean FRR at the target per group of conditions."""
    return "\n".join(f"{name}: FRR at {report['target_fa_per_hour']:g} FA/h, mean per group: " + ", ".join(
        f"{group} {frr:.3f}" for group, frr in group_means(rows).items()) for name, rows in report["scorers"].items())


def run_grid(model: Path, data: Path, out: Path, *, grid: str, baseline: str | None = None,
             noise: dict[str, Path] | None = None, stream_minutes: float | None = None,
             engine: str | None = None, progress=PRINT_NOW,
             max_long_hours: float = MAX_LONG_HOURS) -> dict:
    """The exported model (and a baseline) under every condition of the grid, on DATA as `kd-tune eval` reads it;
    the table, plot and figures written to `out`. The grid holds the long audio it conditions (~230 MB per hour):
    at most stream_minutes of it, and never more than max_long_hours."""
    detector = Detector(model)
    if detector.sample_rate != SAMPLE_RATE:
        raise ConditionError(f"{model}: a model of {detector.sample_rate} Hz; allowed: {SAMPLE_RATE} Hz models, "
                             "which the conditions are built for")
    scorers: dict[str, object] = {"model": detector}  # evaluate_grid takes any scorer: a Detector or a baseline
    if baseline:  # built first: a missing extra or a word outside its dictionary is refused before any work
        wakeword = (detector.card.model_extra or {}).get("wakeword")
        if not wakeword:
            raise ConditionError(f"{model}: its card names no wake word; allowed: a model written by `kd-tune "
                                 "export`, whose card holds the wake word the baseline listens for")
        scorers[baseline] = PocketSphinxSpotter(wakeword)
    held = max_long_hours * 3600 if stream_minutes is None else min(max_long_hours * 60, stream_minutes) * 60
    audio = read_eval_audio(data, detector, engine=engine, hold_long_seconds=held)
    recordings = read_noise_folders(noise or {}, detector.read)
    if audio.of_kind("background"):  # the data set's own background recordings are one more noise type
        recordings.setdefault("background", audio.of_kind("background"))
    conditioner = Conditioner(speech=audio.of_kind("negative") or audio.negatives, recordings=recordings)
    report = evaluate_grid(scorers, audio, grid=grid, conditioner=conditioner, progress=progress,
                           stream_seconds=None if stream_minutes is None else stream_minutes * 60)
    return write_grid(report, out) | {"summary": summary(report)}
