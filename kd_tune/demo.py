"""`kd-tune demo` and `kd-tune teacher train` as library functions: the whole job on the embedded default.

`run_demo` synthesizes the data (cached), fine-tunes the teachers (cached), runs the sweep with the teacher-output
cache, exports the best student and measures it on the held-out test split, clean and under the condition grid.
The command line only prints what it returns.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from kd_tune.config import Config, load_config
from kd_tune.datasets.data import STRADDLE_KIND, WINDOW_KIND, WakewordData, load_data
from kd_tune.datasets.synth import synthesize
from kd_tune.deploy import export
from kd_tune.evaluation import heldout, robustness
from kd_tune.evaluation.source import locate_source
from kd_tune.metrics import echo_line
from kd_tune.space import SearchSpace, load_search_space
from kd_tune.training.teachers import check_teacher_store, configured_teachers, teacher_is_current
from kd_tune.training.train import fit_teacher
from kd_tune.tuning.sweep import sweep

DEMO_SIZES = {  # `kd-tune demo --size`: overrides of the embedded default (a --set given too wins)
    "small": ["data.synth_size=small", "training.epochs=3", "tune.num_samples=4"],
    "default": [],
    "large": ["data.synth_size=large", "training.epochs=12", "tune.num_samples=24"],
}


ECHO = functools.partial(print, flush=True)  # a phase line shows when the phase ends, also in a log


def train_teachers(config: Config, data: WakewordData, names: list[str] | None = None, *, echo=ECHO) -> None:
    """Fine-tune the configured teachers (or `names`) that are not current; a line each."""
    check_teacher_store(config)  # before any training: a teacher must never replace an experiment
    for teacher in configured_teachers(config, names):
        if teacher_is_current(config, teacher, data):
            echo(f"teacher {teacher.name}: up to date, not retrained")
            continue
        started = time.perf_counter()
        metrics = fit_teacher(config, teacher, data=data)  # a bar on a terminal, a line each 30 s without one
        echo(f"teacher {teacher.name}: {teacher.epochs} epochs in {time.perf_counter() - started:.0f} s, "
             + echo_line(metrics))


def data_line(data: WakewordData, root: str) -> str:
    windows, straddles = data.train.kinds.count(WINDOW_KIND), data.train.kinds.count(STRADDLE_KIND)
    clips = len(data.train.labels) - windows - straddles
    return (f"data: {clips + len(data.val.labels) + len(data.test.labels)} clips in {root} (train {clips}, val "
            f"{len(data.val.labels)}, test {len(data.test.labels)}: held-out voices); for training also {windows} "
            f"windows of long/train/ as negatives and {straddles} windows that cut a wake word, for the teacher to "
            "label")


def run_demo(out: Path, *, size: str = "default", search_space: str = "default", overrides: tuple[str, ...] = (),
             verbose: bool = False, echo=ECHO) -> tuple[Config, SearchSpace, list[dict], list[str], tuple[str, ...]]:
    """(config, space, leaderboard rows, trial errors, lines on the exported model) of the whole demo under `out`."""
    # The teacher-output cache: the sweep pays for each teacher's forward passes once, not once per trial-epoch.
    config = load_config(None, overrides=[f"data.root={out / 'data'}", f"storage.root={out}",
                                          "distillation.teacher_mode=cache", *DEMO_SIZES[size], *overrides],
                         check_paths=False)
    d, space = config.data, load_search_space(search_space)
    synthesize(d.root, wakeword=d.wakeword, seed=d.synth_seed, size=d.synth_size, new_speakers=d.synth_new_speakers,
               voices=d.voices, train_hours=d.synth_train_hours)
    data = load_data(d)
    echo(data_line(data, d.root))
    train_teachers(config, data, echo=echo)
    rows, errors = sweep(config, space, name="sweep", data=data, verbose=verbose)
    if not any(r["status"] == "OK" for r in rows):
        return config, space, rows, errors, ()
    source = locate_source(str(out / "sweep"), config)
    card = export.export_student(source.load(), out / "model.onnx", streaming=True, source=source.describe())
    report = heldout.evaluate_model(out / "model.onnx", Path(d.root), out_dir=out / "eval")
    grid = robustness.run_grid(out / "model.onnx", Path(d.root), out / "eval", grid="default",
                               stream_minutes=robustness.SHORT_STREAM_MINUTES, progress=None)  # a line per group
    return config, space, rows, errors, (
        export.summary(card), "on the test split (voices never heard in training):", heldout.summary(report),
        f"DET curve: {report['det_png']}", "under the condition grid (noise, rooms, levels, microphones):",
        grid["summary"], f"table: {grid['md']}", f"plot: {grid['png']}")
