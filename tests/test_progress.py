"""kd_tune.progress: progress of a long step on a terminal (tqdm) and without one (plain lines), on a fake clock."""

import io
import re
import threading
from itertools import pairwise

import numpy as np
import pytest
from test_heldout import peak_model  # a model whose every answer can be worked out by hand
from tqdm import tqdm

from kd_tune import progress
from kd_tune.cli import main
from kd_tune.datasets import streams, synth
from kd_tune.evaluation import heldout
from kd_tune.evaluation.robustness import run_grid
from kd_tune.progress import FIRST_LINE_S, LINE_INTERVAL_S, LineProgress, progress_bar
from kd_tune.training import cache
from kd_tune.tuning import console, sweep
from fakes import Clock

LINE = re.compile(r"^synthesizing: (\d+)/1500 clips \((\d+)%\), (\w+) elapsed(, ~(\w+) left)?$")


class Log(io.StringIO):
    """A log file: no terminal. `written` is set at each write, for the one test that waits on the thread."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        count = super().write(text)
        self.written.set()
        return count


class Terminal(io.StringIO):
    def isatty(self) -> bool:  # a patched isatty stands in for a real terminal
        return True


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def run_steps(bar, clock: Clock, *, steps: int, seconds_each: float, stream: io.StringIO) -> list[float]:
    """update() once per step, the clock moving seconds_each before each; the times at which lines appeared."""
    printed_at, seen = [], 0
    for _ in range(steps):
        clock.now += seconds_each
        bar.update()
        if len(lines(stream)) > seen:
            printed_at.append(clock.now)
            seen = len(lines(stream))
    return printed_at


def test_without_a_terminal_the_first_line_comes_within_5_s_then_at_most_every_30_s():
    # Rule: without a terminal, a plain line on stderr within 5 s of the start, then at most one per LINE_INTERVAL_S:
    # a 10-minute step at 2 updates a second prints ~21 lines, not 1200.
    clock, stream = Clock(), Log()
    started = clock.now
    bar = progress_bar(1500, "synthesizing", "clip", stream=stream, clock=clock, poll_s=None)
    assert isinstance(bar, LineProgress)
    printed_at = run_steps(bar, clock, steps=1200, seconds_each=0.5, stream=stream)
    assert FIRST_LINE_S <= 5 and printed_at[0] - started <= 5
    assert all(b - a >= LINE_INTERVAL_S for a, b in pairwise(printed_at))
    assert len(printed_at) <= 1 + 600 / LINE_INTERVAL_S
    assert len(lines(stream)) == len(printed_at) and all(LINE.match(line) for line in lines(stream)), lines(stream)


def test_a_line_shows_the_counts_percent_elapsed_and_time_left():
    # Rule: a line reads `synthesizing: 700/1500 clips (47%), 2m10s elapsed, ~2m29s left`, with set_postfix's values.
    clock, stream = Clock(), Log()
    bar = progress_bar(1500, "synthesizing", "clip", stream=stream, clock=clock, poll_s=None)
    clock.now += 130
    bar.update(700)
    assert lines(stream) == ["synthesizing: 700/1500 clips (47%), 2m10s elapsed, ~2m29s left"]
    bar.set_postfix(loss="0.123")
    bar.set_description("teacher cnn epoch 1/3")
    clock.now += LINE_INTERVAL_S
    bar.update()
    assert lines(stream)[-1] == "teacher cnn epoch 1/3: 701/1500 clips (47%), loss=0.123, 2m40s elapsed, ~3m02s left"


def test_closing_prints_the_final_line_and_a_short_step_prints_nothing():
    # Rule: a step that printed a line ends with a final one (`done`, or `stopped` short of the total), also when
    # left by an exception; a step that ends before FIRST_LINE_S prints nothing at all.
    clock, stream = Clock(), Log()
    with progress_bar(1500, "synthesizing", "clip", stream=stream, clock=clock, poll_s=None) as bar:
        run_steps(bar, clock, steps=1500, seconds_each=0.2, stream=stream)
    assert lines(stream)[-1] == "synthesizing: done, 1500/1500 clips (100%) in 5m00s"
    stopped = Log()
    with pytest.raises(KeyboardInterrupt), progress_bar(1500, "synthesizing", "clip", stream=stopped, clock=clock,
                                                        poll_s=None) as bar:
        run_steps(bar, clock, steps=700, seconds_each=0.2, stream=stopped)
        raise KeyboardInterrupt
    assert lines(stopped)[-1] == "synthesizing: stopped, 700/1500 clips (47%) in 2m20s"
    short = Log()
    with progress_bar(1500, "synthesizing", "clip", stream=short, clock=clock, poll_s=None) as bar:
        run_steps(bar, clock, steps=1500, seconds_each=FIRST_LINE_S / 2000, stream=short)
    assert short.getvalue() == ""


def test_iterating_the_bar_yields_every_item_and_closes_it():
    # Rule: progress_bar(..., iterable=...) yields the items, counts each, and closes with the final line at the end.
    clock, stream = Clock(), Log()

    def items():
        for i in range(120):
            clock.now += 1.0
            yield i

    bar = progress_bar(120, "epoch 1/3", "step", iterable=items(), stream=stream, clock=clock, poll_s=None)
    assert list(bar) == list(range(120))
    assert lines(stream)[0].startswith("epoch 1/3: ") and lines(stream)[-1] == "epoch 1/3: done, 120/120 steps " \
        "(100%) in 2m00s"


def test_a_line_comes_on_time_while_no_update_does():
    # Rule: the bar's thread prints the due line without any update (espeak-ng's clips arrive all at once at the
    # end; an hour of audio scores for a minute), and stops when the bar closes. The clock is fake; the test waits
    # for the thread's write (an Event), it does not sleep.
    clock, stream = Clock(), Log()
    bar = progress_bar(10, "scoring long recordings", "recording", stream=stream, clock=clock, poll_s=0.01)
    clock.now += FIRST_LINE_S
    assert stream.written.wait(timeout=10)
    assert lines(stream) == ["scoring long recordings: 0/10 recordings (0%), 4s elapsed"]
    bar.close()
    assert lines(stream)[-1] == "scoring long recordings: stopped, 0/10 recordings (0%) in 4s"


def test_disabled_prints_nothing_on_a_terminal_or_without_one():
    # Rule: enabled=False (a caller's progress=False) prints nothing, whatever the stream, and still counts and
    # iterates.
    clock = Clock()
    for stream in (Log(), Terminal()):
        with progress_bar(100, "synthesizing", "clip", enabled=False, stream=stream, clock=clock) as bar:
            run_steps(bar, clock, steps=100, seconds_each=10.0, stream=stream)
            bar.set_postfix(loss="1.0")
        assert list(progress_bar(3, "epoch", "step", enabled=False, iterable=range(3), stream=stream)) == [0, 1, 2]
        assert stream.getvalue() == ""


def test_a_terminal_gets_tqdm():
    # Rule: on a terminal the bar is tqdm's, drawn in place. Here the terminal is a stream whose isatty() is True
    # (patched), as stderr's is in a terminal.
    stream = Terminal()
    with progress_bar(10, "synthesizing", "clip", stream=stream) as bar:
        assert isinstance(bar, tqdm)
        bar.update(10)
    assert "synthesizing: 100%" in stream.getvalue() and "10/10" in stream.getvalue()


@pytest.fixture
def every_step_prints(monkeypatch):
    """The first line at once: a step of a test's size prints its lines."""
    monkeypatch.setattr(progress, "FIRST_LINE_S", 0.0)


def fake_speech(utterances, *, seed, each):
    """Stands in for piper and espeak-ng: a second of noise per utterance."""
    rng = np.random.default_rng(seed)
    for i, _ in enumerate(utterances):
        each(i, (0.1 * rng.standard_normal(16_000)).astype(np.float32))


def test_synthesis_prints_its_clips_and_streams_in_a_log_and_nothing_without_progress(tmp_path, monkeypatch, capsys,
                                                                                      every_step_prints):
    # Rule: `kd-tune data synth` without a terminal prints progress lines for the clips and the long streams to
    # stderr, each with a final line; synthesize(progress=False) prints nothing. (The voices are stubbed.)
    monkeypatch.setattr(synth, "speak_all", fake_speech)
    monkeypatch.setattr(streams, "speak_all", fake_speech)
    synth.synthesize(tmp_path / "logged", size="small")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("synthesizing: ") and any(line.startswith("long streams: ") for line in err)
    assert [line.split(",")[0] for line in err if ": done," in line] == ["synthesizing: done", "long streams: done"]
    synth.synthesize(tmp_path / "quiet", size="small", progress=False)
    assert capsys.readouterr().err == ""


def test_eval_and_the_condition_grid_print_progress_in_a_log_and_nothing_when_disabled(tmp_path, folder, capsys,
                                                                                       every_step_prints):
    # Rule: `kd-tune eval --conditions` without a terminal prints progress lines while it scores the long
    # recordings and through the grid; evaluate_model(progress=False) and a grid without progress print nothing.
    model = peak_model(tmp_path / "model.onnx")
    assert main(["eval", str(model), str(folder), "--out", str(tmp_path / "out"), "--conditions",
                 "clean,level_-3dBFS"]) == 0
    captured = capsys.readouterr()
    assert "scoring long recordings: done, 1/1 recording (100%) in " in captured.err
    assert "condition grid: done, 2/2 measurements (100%) in " in captured.err
    assert "conditions: 2/2 level_-3dBFS (model)" in captured.out  # the grid's own line per condition stays
    heldout.evaluate_model(model, folder, progress=False)
    run_grid(model, folder, tmp_path / "quiet", grid="clean", progress=None)
    assert capsys.readouterr().err == ""


def test_the_teacher_cache_build_prints_progress_in_a_log_and_nothing_without_shards(monkeypatch, capsys,
                                                                                     every_step_prints):
    # Rule: `kd-tune cache` without a terminal prints progress lines for the shards it builds to stderr, with a final
    # line; with every shard current (nothing to build) it prints nothing. (build_shard is stubbed.)
    built = []
    monkeypatch.setattr(cache, "build_shard", lambda config, name, shard, key, data: built.append(shard))
    cache.build_here(None, [("cnn", "shard-0", "key"), ("cnn", "shard-1", "key")], None)
    err = capsys.readouterr().err.splitlines()
    assert built == ["shard-0", "shard-1"]
    assert err[0].startswith("teacher cache: 1/2 shards (50%), ") and err[-1].startswith(
        "teacher cache: done, 2/2 shards (100%) in "), err
    cache.build_here(None, [], None)
    assert capsys.readouterr().err == ""


def test_the_sweeps_teacher_cache_prints_progress_on_the_console_without_a_terminal(monkeypatch, capsys,
                                                                                    every_step_prints):
    # Rule: a sweep's teacher cache, built as Ray tasks, prints its progress lines on the console of the sweep
    # (tuning.console.console_stream; stderr goes to sweep.log then), also without a terminal. (Ray is stubbed: a
    # task's reference is its shard, done at once.)
    log = Log()
    monkeypatch.setattr(console, "_console", log)
    monkeypatch.setattr(sweep.ray, "remote", lambda **options: lambda fn: type(
        "Task", (), {"remote": staticmethod(lambda config, name, shard, key, data: f"{name}/{shard}")}))
    monkeypatch.setattr(sweep.ray, "wait", lambda refs, num_returns: (refs[:num_returns], refs[num_returns:]))
    monkeypatch.setattr(sweep.ray, "get", lambda ref: None)
    sweep.shards_on_ray("data")(None, [("cnn", "shard-0", "key"), ("cnn", "shard-1", "key")], None)
    assert lines(log)[0].startswith("teacher cache: 1/2 shards (50%), ") and lines(log)[-1].startswith(
        "teacher cache: done, 2/2 shards (100%) in "), lines(log)
    assert capsys.readouterr().err == ""
