"""tuning.console: the sweep's progress line, driven as Tune drives its callbacks (trials as plain objects with the
attributes the callback reads) on a clock the test moves by hand; no Ray cluster is needed."""

import io
import pickle
from types import SimpleNamespace

import pytest

from kd_tune.progress import FIRST_LINE_S, LINE_INTERVAL_S
from kd_tune.tuning import console
from kd_tune.tuning.console import CLEAR_LINE, MAX_COLUMNS, SweepProgress
from fakes import Clock


def trial(trial_id: str, teacher: str = "cnn", schedule: str = "constant") -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"teacher": teacher, "alpha_schedule": schedule})


class Terminal(io.StringIO):
    def isatty(self) -> bool:  # a patched isatty stands in for a real terminal
        return True


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=clock))
    return clock


@pytest.fixture
def log(monkeypatch) -> io.StringIO:
    """The console of a run without a terminal (a log, `ray job submit`)."""
    out = io.StringIO()
    monkeypatch.setattr(console, "_console", out)
    return out


def test_the_best_so_far_comes_from_finished_trials_only(clock, log):
    # Rule: the progress line's best is the best of the trials that ended, named by trial id: a running trial's
    # better value is not shown until it ends (it could still change, and the leaderboard ranks ended trials).
    progress = SweepProgress(total=3, metric="frr_conditions", mode="min")
    fast, slow = trial("aaaa1111", "cnn", "linear"), trial("bbbb2222", "wav2vec2", "step")
    for t in (fast, slow):
        progress.on_trial_start(0, [], t)
    progress.on_trial_result(0, [], fast, {"frr_conditions": 0.1, "epoch": 1})
    progress.on_trial_result(0, [], slow, {"frr_conditions": 0.6, "epoch": 1})
    progress.on_trial_result(0, [], slow, {"frr_conditions": 0.5, "epoch": 2})
    progress.on_trial_complete(0, [], slow)
    progress.on_trial_result(0, [], fast, {"frr_conditions": 0.2, "epoch": 2})  # its best epoch stays 0.1
    progress.on_trial_error(0, [], fast)
    assert log.getvalue().splitlines() == [  # a line per ended trial; the clock never moved, so no line between
        "sweep: 1/3 done, best frr_conditions 0.5 (bbbb2222: wav2vec2, step); running aaaa1111 epoch 1 0s",
        "sweep: 2/3 done, 1 failed, best frr_conditions 0.1 (aaaa1111: cnn, linear)"]


def test_the_line_shows_each_running_trials_epoch_of_the_total_and_time_since_its_start(clock, log):
    # Rule: each running trial appears by id with its last reported epoch out of the sweep's epochs (0 before its
    # first result; the result's "epoch", else Tune's training_iteration) and the time since it started, the
    # earliest started first, after the done count and the best.
    progress = SweepProgress(total=6, metric="frr_conditions", mode="min", epochs=6)
    first, second, third = trial("1a2b3c4d"), trial("9f8e7d6c"), trial("5e5e5e5e")
    progress.on_trial_start(0, [], first)
    clock.now += 29
    progress.on_trial_start(0, [], second)
    progress.on_trial_start(0, [], third)
    clock.now += 12
    progress.on_trial_result(0, [], first, {"frr_conditions": 0.4, "epoch": 2, "training_iteration": 1})  # resumed
    progress.on_trial_result(0, [], second, {"training_iteration": 1})
    assert progress.line() == ("sweep: 0/6 done; running 1a2b3c4d epoch 2/6 41s, 5e5e5e5e epoch 0/6 12s, "
                               "9f8e7d6c epoch 1/6 12s")
    clock.now += 100
    progress.on_trial_complete(0, [], first)
    assert progress.line() == ("sweep: 1/6 done, best frr_conditions 0.4 (1a2b3c4d: cnn, constant); "
                               "running 5e5e5e5e epoch 0/6 1m52s, +1 more")
    progress.on_trial_complete(0, [], third)
    assert progress.line() == ("sweep: 2/6 done, best frr_conditions 0.4 (1a2b3c4d: cnn, constant); "
                               "running 9f8e7d6c epoch 1/6 1m52s")
    progress.on_trial_complete(0, [], second)
    assert progress.line() == "sweep: 3/6 done, best frr_conditions 0.4 (1a2b3c4d: cnn, constant)"


def test_many_running_trials_keep_the_line_within_120_columns(clock, log):
    # Rule: the line never passes MAX_COLUMNS (120): the running trials that do not fit are counted as "+N more";
    # where not even one fits, the line counts them, and a head too long on its own is cut.
    assert MAX_COLUMNS == 120
    progress = SweepProgress(total=100, metric="frr_conditions", mode="min", epochs=12)
    ended = trial("00000000", "wav2vec2", "cosine")
    progress.on_trial_start(0, [], ended)
    progress.on_trial_result(0, [], ended, {"frr_conditions": 0.7574, "epoch": 12})
    progress.on_trial_complete(0, [], ended)
    ids = [f"{i:08x}" for i in range(1, 21)]
    for i, trial_id in enumerate(ids):
        clock.now += 1
        progress.on_trial_start(0, [], trial(trial_id))
        progress.on_trial_result(0, [], trial(trial_id), {"frr_conditions": 0.9, "epoch": i % 12 + 1})
    line = progress.line()
    assert len(line) <= MAX_COLUMNS, line
    head, running = line.split("; running ")
    assert head == "sweep: 1/100 done, best frr_conditions 0.7574 (00000000: wav2vec2, cosine)"
    shown, more = running.split(", ")[:-1], running.split(", ")[-1]
    assert shown and shown[0] == "00000001 epoch 1/12 19s" and more == f"+{len(ids) - len(shown)} more"
    for trial_id, teacher, best in (("eeeeeeee", "t" * 40, 0.2), ("ffffffff", "t" * 100, 0.1)):
        better = trial(trial_id, teacher, "cosine")
        progress.on_trial_start(0, [], better)
        progress.on_trial_result(0, [], better, {"frr_conditions": best})
        progress.on_trial_complete(0, [], better)
        if best == 0.2:  # a head of 103 columns: no running trial fits, their count does
            assert progress.line().endswith("cosine); 20 running") and len(progress.line()) <= MAX_COLUMNS
    line = progress.line()
    assert len(line) == MAX_COLUMNS and line.endswith("…"), line


def test_without_a_terminal_a_line_comes_while_trials_run_at_most_every_interval(clock, log):
    # Rule: without a terminal, besides a line per ended trial, a line FIRST_LINE_S after the first trial starts and
    # within FIRST_LINE_S of the first result, then one every LINE_INTERVAL_S at most while trials run (Tune's loop
    # calls on_step_end several times a second); none while no trial runs.
    progress = SweepProgress(total=2, metric="frr_conditions", mode="min", epochs=6)
    started = clock.now
    running = trial("1a2b3c4d")
    progress.on_trial_start(0, [], running)
    printed_at, seen = [], 0
    for step in range(1, 10 * 60 * 10 + 1):  # ten minutes of steps, ten a second
        clock.now = started + step / 10
        if step == 10 * 60:  # its first result, a minute in
            progress.on_trial_result(0, [], running, {"frr_conditions": 0.5, "epoch": 1})
        progress.on_step_end(step, [])
        if len(log.getvalue().splitlines()) > seen:
            printed_at.append(round(clock.now - started, 1))
            seen = len(log.getvalue().splitlines())
    assert printed_at[:3] == [FIRST_LINE_S, FIRST_LINE_S + LINE_INTERVAL_S, 60 + FIRST_LINE_S]
    assert all(b - a >= LINE_INTERVAL_S for a, b in zip(printed_at[1:], printed_at[2:], strict=False))
    assert len(printed_at) <= 3 + 600 / LINE_INTERVAL_S
    lines = log.getvalue().splitlines()
    assert lines[0] == "sweep: 0/2 done; running 1a2b3c4d epoch 0/6 4s"
    assert lines[2] == "sweep: 0/2 done; running 1a2b3c4d epoch 1/6 1m04s"
    progress.on_trial_complete(0, [], running)  # an ended trial's line at once
    assert log.getvalue().splitlines()[-1] == "sweep: 1/2 done, best frr_conditions 0.5 (1a2b3c4d: cnn, constant)"
    before = log.getvalue()
    clock.now += 10 * LINE_INTERVAL_S
    progress.on_step_end(0, [])
    assert log.getvalue() == before  # nothing runs: nothing to report


def test_on_a_terminal_the_line_is_redrawn_in_place_as_the_seconds_pass(clock, monkeypatch):
    # Rule: on a terminal the line is rewritten in place (no newline), also between results, so the running
    # trials' times move on; at most every MIN_REDRAW_S.
    terminal = Terminal()
    monkeypatch.setattr(console, "_console", terminal)
    progress = SweepProgress(total=1, metric="frr_conditions", mode="min", epochs=3)
    progress.on_trial_start(0, [], trial("1a2b3c4d"))
    clock.now += 7
    progress.on_step_end(1, [])
    progress.on_step_end(2, [])  # no time passed: not redrawn
    drawn = terminal.getvalue().split(CLEAR_LINE)
    assert "\n" not in terminal.getvalue() and drawn[-1] == "sweep: 0/1 done; running 1a2b3c4d epoch 0/3 7s"
    assert len(drawn) == 3  # "" before the first, the start's line, the step's


def test_a_trial_retried_after_a_failure_runs_again_from_its_new_start(clock, log):
    # Rule: a trial that failed and waits for its retry (tune.max_failures) is not shown running; once it starts
    # again its time counts from the new start, its epoch the last one it reported.
    progress = SweepProgress(total=1, metric="frr_conditions", mode="min", epochs=6)
    retried = trial("1a2b3c4d")
    progress.on_trial_start(0, [], retried)
    progress.on_trial_result(0, [], retried, {"frr_conditions": 0.5, "epoch": 3})
    clock.now += 300
    progress.on_trial_recover(0, [], retried)
    assert progress.line() == "sweep: 0/1 done"
    clock.now += 20
    progress.on_trial_start(0, [], retried)
    clock.now += 5
    assert progress.line() == "sweep: 0/1 done; running 1a2b3c4d epoch 3/6 5s"


def test_a_progress_line_pickled_by_an_older_kd_tune_resumes(clock, log):
    # Rule: `kd-tune sweep --resume` unpickles the callbacks Tune saved in tuner.pkl; one saved before running_best,
    # the running trials' epochs and times and the interval lines existed must still take results and draw its line.
    progress = SweepProgress(total=2, metric="frr_conditions", mode="min")
    for name in ("running_best", "epochs", "started", "epoch", "due", "reported"):
        delattr(progress, name)  # as an older kd_tune pickled it
    restored = pickle.loads(pickle.dumps(progress))
    resumed = trial("cccc3333")
    restored.on_trial_start(0, [], resumed)
    clock.now += 3
    restored.on_trial_result(0, [], resumed, {"frr_conditions": 0.3, "epoch": 2})
    assert restored.running_best["cccc3333"][0] == 0.3
    assert restored.line() == "sweep: 0/2 done; running cccc3333 epoch 2 3s"
    clock.now += FIRST_LINE_S
    restored.on_step_end(0, [])
    assert log.getvalue().splitlines() == ["sweep: 0/2 done; running cccc3333 epoch 2 7s"]


def test_a_resumed_sweep_forgets_the_clock_of_the_process_that_pickled_it(clock, log):
    # Rule: clock readings in a pickled progress line belong to another process: after unpickling, a trial still
    # listed as running shows no time until it starts again, and the first interval line is timed afresh.
    progress = SweepProgress(total=2, metric="frr_conditions", mode="min", epochs=6)
    progress.on_trial_start(0, [], trial("dddd4444"))
    clock.now = -1e6  # the resuming process's clock: unrelated
    restored = pickle.loads(pickle.dumps(progress))
    assert restored.line() == "sweep: 0/2 done; running dddd4444 epoch 0/6"
    restored.on_step_end(0, [])
    assert log.getvalue() == ""
