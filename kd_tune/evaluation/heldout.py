"""`kd-tune eval MODEL.onnx DATA`: an exported model measured on held-out audio the way it will run on a device.

DATA is a folder with positive/ and negative/ clips (optionally hard_negative/ and background/) and long negative
recordings under long/, or a kd_tune data set (manifest.jsonl), of which the test split and long/test/ are used.
Every file is read, downmixed and resampled like `kd-tune detect` does, and scored by the same streaming detector:

- a clip's score is its highest window probability, so a positive counts as detected if the detector fires anywhere
  in it; FRR at the model's own threshold, and the clip ROC AUC, come from these scores;
- false activations per hour come from the long recordings (the negative and background clips joined end to end
  when there are none), counted with the detector's refractory rule;
- FRR at FA_TARGETS_PER_HOUR: the best a threshold chosen on this very audio could do, for comparison with targets;
- the DET curve is FRR against FA/h over thresholds; it is written as JSON and as a PNG.

Memory holds one long recording at a time (README, "Export and detection"); special files are skipped and counted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_tune.audio.io import files_under
from kd_tune.datasets.data import AUDIO_SUFFIXES, LONG_FOLDER, engine_of, scan
from kd_tune.deploy.detect import Detector
from kd_tune.errors import KdTuneError
from kd_tune.evaluation import plots
from kd_tune.metrics import SECONDS_PER_HOUR, audio_hours, count_activations, roc_auc, threshold_for_fa_rate
from kd_tune.progress import progress_bar
from kd_tune.signing import special_kind
from kd_tune.store.storage import write_text

FA_TARGETS_PER_HOUR = (0.5, 1.0, 2.0, 5.0)
DET_THRESHOLDS = 256  # quantiles of the observed scores: enough for a smooth curve, bounded cost per hour of audio
TEST_SPLIT = "test"
OUT_FILES = ("eval.json", "det.png", "conditions.json", "conditions.md", "conditions.png")  # what --out receives
# Scoring takes ~1 minute per hour on one core, and memory does not grow with it (see above): 8 hours is the most a
# run scores by default, as much as training reads per split (kd_tune.audio.io.MAX_STREAM_HOURS).
MAX_LONG_HOURS = 8.0


class EvalError(KdTuneError):
    exit_code = 2


@dataclass(frozen=True)
class EvalAudio:
    """What an evaluation reads: clips and long recordings, mono float32 at the model's sample rate."""

    positives: list[np.ndarray]
    negatives: list[np.ndarray]
    joinable: list[bool]  # per negative: may join the stream when there are no long recordings (not a hard negative)
    long: list[np.ndarray]  # held long recordings: only as much as read_eval_audio was asked to hold
    source: str  # "folder" or "test split"
    kinds: tuple[str, ...] = ()  # per negative: negative, hard_negative or background
    long_paths: tuple[Path, ...] = ()  # every long recording found, in name order
    skipped: int = 0  # FIFOs, devices and sockets left unopened

    def of_kind(self, kind: str) -> list[np.ndarray]:
        return [a for a, k in zip(self.negatives, self.kinds, strict=True) if k == kind]

    def recordings(self) -> list[np.ndarray]:
        """The audio false activations are counted on: the long recordings, or else the negatives joined end to
        end, never the hard negatives ("hey" then "nova" would join into the wake word) unless there is nothing
        else."""
        joined = [a for a, ok in zip(self.negatives, self.joinable, strict=True) if ok] or self.negatives
        return self.long if self.long_paths else [np.concatenate(joined)]


def read_eval_audio(root: Path, detector: Detector, *, engine: str | None = None,
                    hold_long_seconds: float = 0.0) -> EvalAudio:
    """A folder's clips and long/ recordings, or a data set's test split and long/test/. With `engine`, the speech
    of that engine alone, from every split of the data set: a leave-one-engine-out model never heard any of it.
    The long recordings are listed; the first hold_long_seconds of them are read and held (the grid needs them)."""
    if not root.is_dir():
        raise EvalError(f"{root}: not a directory; allowed: a folder with positive/ and negative/ (and long/), or a "
                        "kd_tune data set")
    is_data_set = (root / "manifest.jsonl").is_file()
    listed = [c for c in scan(root) if not is_data_set or c.split == TEST_SPLIT or engine]
    if engine:
        listed = [c for c in listed if c.kind == "background" or engine_of(c.voice) == engine]
    long_dir = root / LONG_FOLDER / TEST_SPLIT if is_data_set else root / LONG_FOLDER
    found = [p for p in files_under(long_dir) if p.suffix.lower() in AUDIO_SUFFIXES] if long_dir.is_dir() else []
    clips, long = [c for c in listed if not is_special(c.path)], [p for p in found if not is_special(p)]
    skipped = len(listed) - len(clips) + len(found) - len(long)
    negatives = [c for c in clips if c.label == 0]
    audio = EvalAudio(positives=[detector.read(c.path) for c in clips if c.label == 1],
                      negatives=[detector.read(c.path) for c in negatives],
                      joinable=[c.kind != "hard_negative" for c in negatives],
                      long=read_long(detector, long, hold_long_seconds, score=False)[0],
                      source=f"{engine} speech" if engine else "test split" if is_data_set else "folder",
                      kinds=tuple(c.kind for c in negatives), long_paths=tuple(long), skipped=skipped)
    if not audio.positives or not (audio.negatives or audio.long_paths):
        raise EvalError(f"{root}: found {len(audio.positives)} positive and {len(audio.negatives)} negative clips and "
                        f"{len(audio.long)} long recordings; allowed: at least one positive clip and some negative "
                        "audio")
    return audio


def is_special(path: Path) -> bool:
    """A FIFO, device or socket named like audio: skipped unopened (its open could block, its read never end)."""
    try:
        return special_kind(os.stat(path).st_mode) not in (None, "a directory")
    except OSError:  # missing or unreadable: reading it names the file
        return False


def read_long(detector: Detector, paths: Iterable[Path], max_seconds: float, *,
              score: bool) -> tuple[list[np.ndarray], int]:
    """The long recordings in name order, at most max_seconds in all (the last one cut, those after it never
    opened), each mono at the model's rate, or with `score` its window scores, the recording dropped once scored;
    and how many samples were read."""
    out, samples, most = [], 0, round(max_seconds * detector.sample_rate)
    for path in paths:
        if samples >= most:
            break
        recording = detector.read(path, max_seconds=(most - samples) / detector.sample_rate)[:most - samples]
        samples += len(recording)
        out.append(detector.probabilities(recording) if score else recording)
        del recording  # before the next one is read: one recording in memory at a time
    return out, samples


def clip_scores(detector: Detector, clips: list[np.ndarray]) -> np.ndarray:
    """The highest window probability of each clip [N]."""
    return np.array([float(detector.probabilities(c).max()) for c in clips], dtype=np.float64)


def false_activations(streams: list[np.ndarray], threshold: float, *, hop_seconds: float,
                      refractory_seconds: float) -> int:
    return sum(count_activations(s, threshold=threshold, hop_seconds=hop_seconds,
                                 refractory_seconds=refractory_seconds) for s in streams)


def det_points(positive_scores: np.ndarray, streams: list[np.ndarray], *, hours: float, hop_seconds: float,
               refractory_seconds: float, exact: Sequence[float] = ()) -> list[dict]:
    """(threshold, FRR, FA/h) over thresholds that cover both axes: quantiles of the positives' scores (FRR in even
    steps), the streams' peaks ranked from the top (FA/h), exactly the `exact` ones (the model's threshold and
    det_target_thresholds', so the operating point and the printed FRR at each target lie on the curve), and one
    above every score."""
    # Quantiles of all scores together put nearly every threshold below 0.001, where an hour of quiet audio sits,
    # and none near the operating point: each axis gets its own half of the budget instead.
    half = DET_THRESHOLDS // 2
    top = max(float(positive_scores.max()), *(float(s.max()) for s in streams))
    thresholds = np.unique(np.r_[np.quantile(positive_scores, np.linspace(0, 1, half)), peak_grid(streams, half),
                                 list(exact), np.nextafter(np.float32(top), np.float32(np.inf))])
    return [{"threshold": float(t), "frr": float(np.mean(positive_scores < t)),
             "fa_per_hour": false_activations(streams, t, hop_seconds=hop_seconds,
                                              refractory_seconds=refractory_seconds) / hours}
            for t in thresholds]


def peak_grid(streams: list[np.ndarray], count: int) -> np.ndarray:
    """Up to `count` of the streams' local peak scores, ranked from the highest on a log scale: a threshold at the
    k-th highest peak lets about k activations through, so every count up to about a dozen is on the curve, and
    beyond that the points thin out as the FA/h axis's log scale does."""
    peaks = []
    for s in streams:
        padded = np.r_[-np.inf, s, -np.inf]
        peaks.append(s[(s >= padded[:-2]) & (s >= padded[2:])])
    ranked = np.unique(np.concatenate(peaks))[::-1]
    return ranked[np.unique(np.geomspace(1, len(ranked), count).round().astype(int)) - 1]


def det_target_thresholds(streams: list[np.ndarray], *, hours: float, hop_seconds: float,
                          refractory_seconds: float) -> list[float]:
    """Per FA_TARGETS_PER_HOUR, the lowest threshold that keeps the streams (`hours` of audio) within it: searched
    once per evaluation, then frr_at_targets measures FRR there and det_points holds them exactly."""
    stream = np.concatenate(streams)
    return [threshold_for_fa_rate(stream, target_fa_per_hour=target, hop_seconds=hop_seconds,
                                  refractory_seconds=refractory_seconds, hours=hours)
            for target in FA_TARGETS_PER_HOUR]


def frr_at_targets(positive_scores: np.ndarray, thresholds: Sequence[float]) -> dict[str, float]:
    """{"1": FRR, ...}: FRR at each of FA_TARGETS_PER_HOUR's thresholds (det_target_thresholds)."""
    return {f"{target:g}": float(np.mean(positive_scores < threshold))
            for target, threshold in zip(FA_TARGETS_PER_HOUR, thresholds, strict=True)}


def fa_streams(detector: Detector, audio: EvalAudio, max_long_hours: float,
               progress: bool = False) -> tuple[list[np.ndarray], int, bool]:
    """The window scores false activations are counted on, how many samples they cover, and whether max_long_hours
    stopped the reading: the long recordings one at a time (read_long), or the joined negatives without any.
    progress: a bar over the recordings (~1 minute per hour of audio), also without a terminal."""
    if not audio.long_paths:
        joined = audio.recordings()[0]
        return [detector.probabilities(joined)], len(joined), False
    most = max_long_hours * SECONDS_PER_HOUR
    with progress_bar(len(audio.long_paths), "scoring long recordings", "recording", enabled=progress,
                      iterable=audio.long_paths, leave=False) as paths:
        streams, samples = read_long(detector, paths, most, score=True)
    return streams, samples, samples >= round(most * detector.sample_rate)


def evaluate_model(model: Path, data: Path, *, out_dir: Path | None = None, engine: str | None = None,
                   max_long_hours: float = MAX_LONG_HOURS, progress: bool = True) -> dict:
    """Every figure of the evaluation, on at most max_long_hours of long recordings; with out_dir, also eval.json
    and det.png there. progress: a bar while the long recordings are scored (False: nothing printed)."""
    detector = Detector(model)
    audio = read_eval_audio(data, detector, engine=engine)
    hop_seconds = detector.hop_samples / detector.sample_rate
    streams, samples, capped = fa_streams(detector, audio, max_long_hours, progress)
    hours = audio_hours(samples, detector.sample_rate)  # of audio, not of windows
    positives, negatives = clip_scores(detector, audio.positives), clip_scores(detector, audio.negatives)
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    auc = roc_auc(np.r_[positives, negatives], labels) if len(negatives) else math.nan
    fa = false_activations(streams, detector.threshold, hop_seconds=hop_seconds,
                           refractory_seconds=detector.refractory_seconds)
    figures = {"hours": hours, "hop_seconds": hop_seconds, "refractory_seconds": detector.refractory_seconds}
    targets = det_target_thresholds(streams, **figures)  # the threshold search, once: FRR at targets and DET share it
    report = {"model": str(model), "data": str(data), "source": audio.source, "threshold": detector.threshold,
              "target_fa_per_hour": (detector.card.model_extra or {}).get("target_fa_per_hour"),
              "positives": len(positives), "negatives": len(negatives),
              "long_recordings": len(streams) if audio.long_paths else 0, "max_long_hours": max_long_hours,
              "long_hours_cap_reached": capped, "skipped_special_files": audio.skipped,
              "negative_hours": hours, "frr": float(np.mean(positives < detector.threshold)),
              "false_activations": fa, "fa_per_hour": fa / hours, "auc": None if math.isnan(auc) else auc,
              "frr_at_fa_per_hour": frr_at_targets(positives, targets),
              "det": det_points(positives, streams, **figures, exact=[*targets, detector.threshold])}
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def write_report(report: dict, out_dir: Path) -> None:
    """det.png, then eval.json (which names it), each written whole or not at all."""
    point = {k: report[k] for k in ("threshold", "frr", "fa_per_hour")}
    # the target the model's threshold was calibrated for, where the report carries it (the model card has it);
    # else the training config's default
    target = report.get("target_fa_per_hour") or 2.0
    report["det_png"] = str(plots.det_curve(report["det"], out_dir / "det.png", operating_point=point,
                                            target_fa_per_hour=target,
                                            title=f"{Path(report['model']).name}: {report['source']} of "
                                                  f"{Path(report['data']).name}"))
    write_text(out_dir, "eval.json", json.dumps(report, indent=2) + "\n")


def summary(report: dict) -> str:
    auc = "n/a" if report["auc"] is None else f"{report['auc']:.3f}"
    capped = f", the first {report['max_long_hours']:g} h (--max-hours)" if report.get("long_hours_cap_reached") else ""
    skipped = report.get("skipped_special_files")
    return "\n".join([
        f"{report['data']} ({report['source']}): {report['positives']} positive, {report['negatives']} negative "
        f"clips, {report['negative_hours']:.2f} h of negative audio ({report['long_recordings']} long recordings"
        f"{capped})" + (f"; skipped {skipped} FIFOs, devices or sockets" if skipped else ""),
        f"at the model's threshold {report['threshold']:.4f}: FRR {report['frr']:.3f}, "
        f"{report['fa_per_hour']:.2f} false activations per hour ({report['false_activations']} in all)",
        f"clip ROC AUC {auc}; FRR at a threshold chosen on this audio: "
        + ", ".join(f"{frr:.3f} at {fa} FA/h" for fa, frr in report["frr_at_fa_per_hour"].items())])
