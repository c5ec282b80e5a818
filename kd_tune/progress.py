"""Progress of a long step, on a terminal and in a log.

`progress_bar` returns tqdm's bar when stderr is a terminal. Without one (`ray job submit`, CI, a log file, a pipe)
tqdm would print nothing at all, so it returns a LineProgress instead: the same small interface (update,
set_postfix, set_description, close, iteration, a context manager) that prints plain lines to stderr such as

    synthesizing: 700/1500 clips (47%), 2m10s elapsed, ~2m30s left

the first FIRST_LINE_S after the start, then one every LINE_INTERVAL_S at most, and a last one when it closes. A
step that ends before FIRST_LINE_S prints nothing. A thread looks at the clock every POLL_S, so a line comes on time
even while no update does (espeak-ng's clips arrive all at once at the end, an hour of audio scores for a minute).
With enabled=False nothing is printed, on a terminal or not.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeAlias

from tqdm import tqdm

FIRST_LINE_S = 4.0  # the first line, plus at most POLL_S: within 5 s of the start
LINE_INTERVAL_S = 30.0  # the most often a line is printed after the first
POLL_S = 0.5  # how often the thread looks at the clock


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, *, iterable: Iterable | None = None,
                 leave: bool = True, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 poll_s: float | None = POLL_S) -> Bar:
    """A progress bar of `total` units (`unit` in the singular, as tqdm takes it) named `desc`: tqdm on a terminal,
    a LineProgress without one, a silent tqdm when not enabled. With `iterable`, iterating the bar yields its items
    and counts them. stream: stderr unless given; clock and poll_s (None: no thread) are for tests."""
    stream = sys.stderr if stream is None else stream
    if not enabled or is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream, disable=not enabled)
    return LineProgress(total, desc, unit, iterable=iterable, stream=stream, clock=clock, poll_s=poll_s)


def beside_bars(write: Callable[[str], object], line: str) -> None:
    """write(line) with tqdm's bars on the terminal cleared first and drawn again after (a line printed across a
    bar would break both); the same as write(line) where no bar is shown."""
    with tqdm.external_write_mode():
        write(line)


def duration(seconds: float) -> str:
    """42s, 2m10s, 1h05m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def amount(value: float) -> str:
    """700, 1500000, 2.5: whole numbers in full."""
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


class LineProgress:
    """A progress bar as plain lines on a stream that is not a terminal (see the module's doc)."""

    n: float  # like tqdm's: update() takes fractions

    def __init__(self, total: int | None, desc: str, unit: str, *, iterable: Iterable | None = None,
                 stream: TextIO, clock: Callable[[], float] = time.monotonic, poll_s: float | None = POLL_S):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, 0, ""
        self.iterable, self.stream, self.clock = iterable, stream, clock
        self.started = clock()
        self.due = self.started + FIRST_LINE_S
        self.lines, self.closed = 0, False
        self.lock = threading.Lock()
        self.stop = threading.Event()
        if poll_s:  # the thread holds the bar weakly: a bar dropped unclosed ends its thread
            threading.Thread(target=heartbeat, args=(weakref.ref(self), self.stop, poll_s), daemon=True,
                             name=f"progress: {desc}").start()

    def update(self, n: float = 1) -> None:
        self.n += n
        self.poll()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={shown(v)}" for k, v in {**(ordered_dict or {}), **kwargs}.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def poll(self) -> None:
        """Print a line if one is due."""
        with self.lock:
            now = self.clock()
            if self.closed or now < self.due:
                return
            self.due = now + LINE_INTERVAL_S
            elapsed = now - self.started
            left = (f", ~{duration(elapsed * (self.total - self.n) / self.n)} left"
                    if self.total and 0 < self.n < self.total else "")
            self.write(f"{self.desc}: {self.counted()}{self.extra()}, {duration(elapsed)} elapsed{left}")

    def close(self) -> None:
        """The last line (where the step printed any: a short one prints nothing), and the thread ends."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.stop.set()
            if self.lines:
                finished = "done" if not self.total or self.n >= self.total else "stopped"
                self.write(f"{self.desc}: {finished}, {self.counted()} in {duration(self.clock() - self.started)}"
                           f"{self.extra()}")

    def counted(self) -> str:
        n = amount(self.n)
        if not self.total:
            return f"{n} {self.unit}s"
        percent = round(100 * self.n / self.total)
        percent = min(percent, 99) if self.n < self.total else percent  # never 100% before the end
        return f"{n}/{amount(self.total)} {self.unit}{'' if self.total == 1 else 's'} ({percent}%)"

    def extra(self) -> str:
        return f", {self.postfix}" if self.postfix else ""

    def write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
        self.lines += 1

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def heartbeat(bar: weakref.ref, stop: threading.Event, poll_s: float) -> None:
    """The line comes on time without an update: poll the bar every poll_s until it closes or is dropped."""
    while not stop.wait(poll_s):
        live = bar()
        if live is None:
            return
        live.poll()
        del live


Bar: TypeAlias = tqdm | LineProgress  # what progress_bar returns
