"""What a sweep shows on the console: one progress line, while Ray's own tables and actor logs go to a log file.

`ray_output_to(path)` sends this process's stdout and stderr, at the file-descriptor level, to the log file (so Ray's
C++ and forwarded worker output goes there too) and hands back a stream to the real console. `SweepProgress`, a Tune
callback, writes the progress line to that stream: rewritten in place on a terminal, one line per finished trial
otherwise, so a log of a run without a terminal stays short.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ray import tune

CLEAR_LINE = "\r\033[K"
MIN_REDRAW_S = 0.5  # a terminal line redrawn at most twice a second
# The console stream of the running sweep. Module state, not a SweepProgress attribute: Tune pickles its callbacks
# into the experiment state (tuner.pkl), and a restored callback must write to the console of the process resuming.
_console: TextIO = sys.stdout


@contextlib.contextmanager
def ray_output_to(log_path: Path | None) -> Iterator[TextIO]:
    """Everything written to stdout and stderr goes to log_path (appended) until the block ends; yields the console.

    log_path None (`--verbose`) leaves the output where it is and yields sys.stdout.
    """
    global _console
    if log_path is None:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = _console = os.fdopen(os.dup(1), "w", buffering=1)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            _console = sys.stdout
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in zip((1, 2), saved, strict=True):
                os.dup2(original, fd)
                os.close(original)
            console.close()


class SweepProgress(tune.Callback):
    """sweep: 3/6 trials done, 2 running, best frr_conditions 0.7574 (trial 6f5920b5: cnn, constant)

    The best is over finished trials only: a running trial's value may still be beaten by its own later epochs and
    is not what the leaderboard will rank, so a line naming it could name another winner than the result block."""

    def __init__(self, *, total: int, metric: str, mode: str):
        self.total, self.metric, self.mode = total, metric, mode
        self.running: set[str] = set()
        self.done = self.errors = 0
        self.best: tuple[float, str] | None = None
        self.running_best: dict[str, tuple[float, str]] = {}  # per running trial, folded into best when it ends
        self.drawn_at = 0.0

    def __setstate__(self, state: dict) -> None:
        # Tune pickles its callbacks into tuner.pkl: a sweep started by an older kd_tune resumes with this class
        self.__dict__.update({"running_best": {}, **state})

    def line(self) -> str:
        best = "" if self.best is None else f", best {self.metric} {self.best[0]:.4g} ({self.best[1]})"
        failed = f", {self.errors} failed" if self.errors else ""
        return f"sweep: {self.done}/{self.total} trials done, {len(self.running)} running{failed}{best}"

    def note(self, text: str) -> None:
        """A line of its own for a phase of the sweep (the teacher cache, say)."""
        _console.write((CLEAR_LINE if _console.isatty() else "") + text + "\n")
        _console.flush()

    def show(self, *, ended: bool) -> None:
        tty = _console.isatty()
        if tty and (ended or time.monotonic() - self.drawn_at >= MIN_REDRAW_S):
            _console.write(CLEAR_LINE + self.line())
            self.drawn_at = time.monotonic()
        elif not tty and ended:  # without a terminal: a line per finished trial, nothing in between
            _console.write(self.line() + "\n")
        _console.flush()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self.show(ended=False)

    def better(self, value: float, than: tuple[float, str] | None) -> bool:
        return than is None or (value < than[0] if self.mode == "min" else value > than[0])

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and self.better(value, self.running_best.get(trial.trial_id)):
            config = trial.config or {}
            self.running_best[trial.trial_id] = (
                float(value), f"trial {trial.trial_id}: {config.get('teacher')}, {config.get('alpha_schedule')}")
        self.show(ended=False)

    def ended(self, trial) -> None:
        self.running.discard(trial.trial_id)
        self.done += 1
        mine = self.running_best.pop(trial.trial_id, None)
        if mine is not None and self.better(mine[0], self.best):
            self.best = mine

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended(trial)
        self.show(ended=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended(trial)
        self.errors += 1
        self.show(ended=True)

    def on_experiment_end(self, trials, **info) -> None:
        if _console.isatty():
            _console.write("\n")
