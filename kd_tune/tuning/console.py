"""What a sweep shows on the console: one progress line, while Ray's own tables and actor logs go to a log file.

`ray_output_to(path)` sends this process's stdout and stderr, at the file-descriptor level, to the log file (so Ray's
C++ and forwarded worker output goes there too) and hands back a stream to the real console (`console_stream()`
while the block runs). `SweepProgress`, a Tune callback, writes the progress line to that stream: rewritten in place
on a terminal; without one (a log, `ray job submit`) a line per finished trial and, while trials run, one
FIRST_LINE_S after the first trial starts and after the first result, then one every LINE_INTERVAL_S at most, so a
log shows progress without growing a line per result.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ray import tune

from kd_tune.progress import FIRST_LINE_S, LINE_INTERVAL_S, duration

CLEAR_LINE = "\r\033[K"
MIN_REDRAW_S = 0.5  # a terminal line redrawn at most twice a second
MAX_COLUMNS = 120  # the progress line never wider: a wrapped line is not redrawn in place
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


def console_stream() -> TextIO:
    """The console: inside ray_output_to the real one (stdout and stderr go to the log there), else sys.stdout."""
    return _console


class SweepProgress(tune.Callback):
    """sweep: 3/6 done, best frr_conditions 0.7574 (6f5920b5: cnn, constant); running 1a2b3c4d epoch 2/6 41s, +1 more

    The best is over finished trials only: a running trial's value may still be beaten by its own later epochs and
    is not what the leaderboard will rank, so a line naming it could name another winner than the result block.
    Each running trial shows its last reported epoch (of `epochs`, where given) and the time since it started, the
    earliest started first; the line stays within MAX_COLUMNS, the running trials that do not fit counted as "+N more".
    """

    def __init__(self, *, total: int, metric: str, mode: str, epochs: int | None = None):
        self.total, self.metric, self.mode, self.epochs = total, metric, mode, epochs
        self.running: set[str] = set()
        self.done = self.errors = 0
        self.best: tuple[float, str] | None = None
        self.running_best: dict[str, tuple[float, str]] = {}  # per running trial, folded into best when it ends
        self.started: dict[str, float] = {}  # per running trial, time.monotonic() at its start
        self.epoch: dict[str, int] = {}  # per running trial, its last reported epoch
        self.due: float | None = None  # without a terminal: when the next line between trial ends is due
        self.reported = False  # any result yet: the first one brings the next line forward
        self.drawn_at = 0.0

    def __setstate__(self, state: dict) -> None:
        # Tune pickles its callbacks into tuner.pkl: a sweep started by an older kd_tune resumes with this class.
        # Clock readings of the process that pickled it mean nothing here (a resumed trial starts again anyway), and
        # the first lines of a resumed sweep come as those of a new one.
        self.__dict__.update({"running_best": {}, "epochs": None, "epoch": {}, **state,
                              "started": {}, "due": None, "reported": False})

    def line(self) -> str:
        best = "" if self.best is None else f", best {self.metric} {self.best[0]:.4g} ({self.best[1]})"
        failed = f", {self.errors} failed" if self.errors else ""
        head = f"sweep: {self.done}/{self.total} done{failed}{best}"  # terse: room for the running trials
        ids = sorted(self.running, key=lambda trial_id: (self.started.get(trial_id, math.inf), trial_id))
        if not ids:
            return clipped(head)
        now = time.monotonic()
        entries = [self.entry(trial_id, now) for trial_id in ids]
        for shown in range(len(entries), 0, -1):
            more = [f"+{len(entries) - shown} more"] if shown < len(entries) else []
            text = f"{head}; running {', '.join(entries[:shown] + more)}"
            if len(text) <= MAX_COLUMNS:
                return text
        return clipped(f"{head}; {len(entries)} running")

    def entry(self, trial_id: str, now: float) -> str:
        """1a2b3c4d epoch 2/6 41s: the last reported epoch (0 before the first) and the time since the start."""
        of = f"/{self.epochs}" if self.epochs else ""
        started = self.started.get(trial_id)
        since = "" if started is None else f" {duration(now - started)}"
        return f"{trial_id} epoch {self.epoch.get(trial_id, 0)}{of}{since}"

    def note(self, text: str) -> None:
        """A line of its own for a phase of the sweep (the teacher cache, say)."""
        _console.write((CLEAR_LINE if _console.isatty() else "") + text + "\n")
        _console.flush()

    def show(self, *, ended: bool) -> None:
        tty = _console.isatty()
        now = time.monotonic()
        if tty and (ended or now - self.drawn_at >= MIN_REDRAW_S):
            _console.write(CLEAR_LINE + self.line())
            self.drawn_at = now
        elif not tty and (ended or (self.running and self.due is not None and now >= self.due)):
            # without a terminal: a line per finished trial, and one at most every LINE_INTERVAL_S in between
            _console.write(self.line() + "\n")
            self.due = now + LINE_INTERVAL_S
        _console.flush()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self.started[trial.trial_id] = time.monotonic()
        if self.due is None:  # the first line comes FIRST_LINE_S after the first trial starts
            self.due = self.started[trial.trial_id] + FIRST_LINE_S
        self.show(ended=False)

    def on_step_end(self, iteration, trials, **info) -> None:
        # Tune's loop steps several times a second: the seconds tick and a due line comes on time between results
        self.show(ended=False)

    def better(self, value: float, than: tuple[float, str] | None) -> bool:
        return than is None or (value < than[0] if self.mode == "min" else value > than[0])

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        # "epoch" is what kd_tune.training.train reports (it survives a resume); Tune's training_iteration restarts at 1
        epoch = result.get("epoch", result.get("training_iteration"))
        if isinstance(epoch, (int, float)):
            self.epoch[trial.trial_id] = int(epoch)
        if not self.reported:  # the first result reaches a log within FIRST_LINE_S
            self.reported = True
            self.due = min(self.due if self.due is not None else math.inf, time.monotonic() + FIRST_LINE_S)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and self.better(value, self.running_best.get(trial.trial_id)):
            config = trial.config or {}
            self.running_best[trial.trial_id] = (
                float(value), f"{trial.trial_id}: {config.get('teacher')}, {config.get('alpha_schedule')}")
        self.show(ended=False)

    def ended(self, trial) -> None:
        self.running.discard(trial.trial_id)
        self.started.pop(trial.trial_id, None)
        self.epoch.pop(trial.trial_id, None)
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

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # failed, to be retried (tune.max_failures): not running until it starts again, with a new start time
        self.running.discard(trial.trial_id)
        self.started.pop(trial.trial_id, None)

    def on_experiment_end(self, trials, **info) -> None:
        if _console.isatty():
            _console.write("\n")


def clipped(line: str) -> str:
    return line if len(line) <= MAX_COLUMNS else line[:MAX_COLUMNS - 1] + "…"
