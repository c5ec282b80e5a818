"""kd_tune.console: the sweep's progress line, driven as Tune drives its callbacks (trials as plain objects with the
attributes the callback reads); no Ray cluster is needed."""

import io
from types import SimpleNamespace

from kd_tune import console
from kd_tune.console import SweepProgress


def trial(trial_id: str, teacher: str, schedule: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"teacher": teacher, "alpha_schedule": schedule})


def test_the_best_so_far_comes_from_finished_trials_only(monkeypatch):
    # Rule: the progress line's best is the best of the trials that ended, named by trial id: a running trial's
    # better value is not shown until it ends (it could still change, and the leaderboard ranks ended trials).
    out = io.StringIO()  # not a terminal: a line per ended trial
    monkeypatch.setattr(console, "_console", out)
    progress = SweepProgress(total=3, metric="frr_conditions", mode="min")
    fast, slow = trial("aaaa1111", "cnn", "linear"), trial("bbbb2222", "wav2vec2", "step")
    for t in (fast, slow):
        progress.on_trial_start(0, [], t)
    progress.on_trial_result(0, [], fast, {"frr_conditions": 0.1})
    progress.on_trial_result(0, [], slow, {"frr_conditions": 0.6})
    progress.on_trial_result(0, [], slow, {"frr_conditions": 0.5})
    progress.on_trial_complete(0, [], slow)
    progress.on_trial_result(0, [], fast, {"frr_conditions": 0.2})  # its best epoch stays 0.1
    progress.on_trial_error(0, [], fast)
    assert out.getvalue().splitlines() == [
        "sweep: 1/3 trials done, 1 running, best frr_conditions 0.5 (trial bbbb2222: wav2vec2, step)",
        "sweep: 2/3 trials done, 0 running, 1 failed, best frr_conditions 0.1 (trial aaaa1111: cnn, linear)"]


def test_a_progress_line_pickled_by_an_older_kd_tune_resumes():
    # Rule: `kd-tune sweep --resume` unpickles the callbacks Tune saved in tuner.pkl; one saved before running_best
    # existed must still take results.
    import pickle

    progress = SweepProgress(total=2, metric="frr_conditions", mode="min")
    del progress.running_best  # as an older kd_tune pickled it
    restored = pickle.loads(pickle.dumps(progress))
    restored.on_trial_result(0, [], trial("cccc3333", "cnn", "constant"), {"frr_conditions": 0.3})
    assert restored.running_best["cccc3333"][0] == 0.3
