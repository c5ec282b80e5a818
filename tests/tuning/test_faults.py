"""Fault injection on a real local Ray cluster: SIGKILL of a Train worker, and of the sweep driver, mid-sweep.

Each test prints its figures (run `pytest -s` to see them): the epochs trained twice and the seconds lost. An epoch
counts as repeated when it had a checkpoint at the kill and was reported again afterwards. The node kill is in
tests/tuning/test_multinode.py.
"""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ray_cluster import BIN, REPO, config_with_trained_teachers, kd_tune, small_set_two_teachers

pytestmark = pytest.mark.slow

EPOCHS = 30  # ~0.4 s each on the small set: long enough to kill a trial in the middle
POLL_S = 0.5
START_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def fault_config(small_dataset, tmp_path_factory):
    """Sweeps of one trial at a time, EPOCHS epochs each, that ASHA never stops early."""
    work = tmp_path_factory.mktemp("faults")
    raw = small_set_two_teachers(small_dataset) | {
        "training": {"epochs": EPOCHS, "batch_size": 32},
        "tune": {"num_samples": 2, "max_concurrent_trials": 1, "asha_grace_period": EPOCHS},
        "storage": {"root": str(work / "runs")}}
    return config_with_trained_teachers(raw, work)


def sweep_driver(cluster, path: Path, name: str, *args: str) -> subprocess.Popen:
    """`kd-tune sweep` in the background; its output goes to a file (a full pipe would block it)."""
    command = [str(BIN / "python"), "-m", "kd_tune", "sweep", str(path), "--search-space", "smoke", "--name", name,
               "--address", cluster.address, *args]
    log = cluster.root / f"{name}.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command, env=cluster.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    driver.log = log
    return driver


def checkpoint_epochs(trial: Path) -> set[int]:
    """Epochs whose Train checkpoint is on storage now (Train writes them there itself, before Tune hears)."""
    epochs = set()
    for manifest in trial.glob("train/checkpoint_*/manifest.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):  # being written or pruned right now
            epochs.add(json.loads(manifest.read_text())["epoch"])
    return epochs


def history(trial: Path) -> list[dict]:
    path = trial / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, *, what: str, timeout: float = START_TIMEOUT_S, driver: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert driver is None or driver.poll() is None, f"the driver exited first: {driver.log.read_text()[-3000:]}"
        time.sleep(POLL_S)
    return value


def repeated_epochs(rows: list[dict], *, checkpointed: int, killed_at: float) -> int:
    """Epochs checkpointed before the kill that were trained and reported again after it."""
    after = [r["epoch"] for r in rows if r["timestamp"] >= killed_at]
    return max(0, checkpointed - min(after) + 1) if after else 0


def train_worker_pid(cluster) -> int:
    workers = [a for a in cluster.state("actors") if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]
    assert len(workers) == 1, workers
    return workers[0]["pid"]


def test_killed_train_worker_resumes_from_its_last_checkpoint(cluster, fault_config):
    # Rule: kill -9 of a Train worker in the middle of a trial: Train restarts the worker group and the trial
    # resumes from its last checkpoint with at most one epoch repeated, and ends OK with every epoch reported.
    path, config = fault_config
    experiment = Path(config.storage.root) / "worker_kill"
    driver = sweep_driver(cluster, path, "worker_kill", "--set", "tune.num_samples=1")
    try:
        trial = wait_for(lambda: next((t for t in experiment.glob("trial_*") if checkpoint_epochs(t)), None),
                         what="the first checkpoint", driver=driver)
        time.sleep(1.0)  # into the next epoch
        checkpointed = max(checkpoint_epochs(trial))
        pid, killed_at = train_worker_pid(cluster), time.time()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: max(checkpoint_epochs(trial)) > checkpointed, what="an epoch after the kill", driver=driver)
        recovered_s = time.time() - killed_at
        assert driver.wait(timeout=600) == 0, driver.log.read_text()[-5000:]
    finally:
        driver.kill()
        driver.wait()
    rows = history(trial)
    repeated = repeated_epochs(rows, checkpointed=checkpointed, killed_at=killed_at)
    normal_s = sorted(r["epoch_seconds"] for r in rows)[len(rows) // 2]
    print(f"\nworker kill -9 after epoch {checkpointed}: {repeated} epoch(s) repeated, next epoch reported "
          f"{recovered_s:.1f} s after the kill (median epoch {normal_s:.1f} s)")
    assert repeated <= 1
    assert sorted({r["epoch"] for r in rows}) == list(range(1, EPOCHS + 1))
    board = json.loads((experiment / "leaderboard.json").read_text())
    assert [(r["status"], r["epochs"]) for r in board] == [("OK", EPOCHS)]


def test_killed_sweep_driver_resumes_every_trial_and_keeps_their_history(cluster, fault_config):
    # Rule: kill -9 of the sweep driver, then `kd-tune sweep --resume`: every trial finishes, a finished trial is
    # not rerun, an unfinished one repeats at most one epoch and keeps the rows it reported before the kill
    # (result.json appends; the leaderboard counts its reported epochs, not Tune's restarted training_iteration).
    path, config = fault_config
    experiment = Path(config.storage.root) / "driver_kill"
    driver = sweep_driver(cluster, path, "driver_kill")

    def finished_and_running():  # as storage shows them: one trial done, another with a reported epoch
        trials = {t: history(t) for t in experiment.glob("trial_*")}
        done = [t for t, rows in trials.items() if rows and rows[-1]["epoch"] == EPOCHS]
        running = [t for t, rows in trials.items() if rows and t not in done]
        return (done[0], running[0]) if done and running else None

    try:
        finished, running = wait_for(finished_and_running, what="one finished and one running trial",
                                     timeout=2 * START_TIMEOUT_S, driver=driver)
        finished_rows, kept_rows = history(finished), history(running)
        checkpointed, killed_at = max(checkpoint_epochs(running)), time.time()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    time.sleep(6)  # let the cluster notice the dead driver and release its trials' resources

    started = time.monotonic()
    out = kd_tune("sweep", "--resume", str(experiment), "--address", cluster.address, env=cluster.env)
    resume_s = time.monotonic() - started
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = history(running)
    repeated = repeated_epochs(rows, checkpointed=checkpointed, killed_at=killed_at)
    first_new = min(r["timestamp"] for r in rows if r["timestamp"] >= killed_at)
    print(f"\ndriver kill -9 with one trial finished and one after epoch {checkpointed}: {repeated} epoch(s) "
          f"repeated; --resume took {resume_s:.0f} s, its first epoch came {first_new - killed_at:.0f} s after "
          f"the kill; history kept: {len(kept_rows)} row(s) from before the kill, {len(rows)} in all")
    assert history(finished) == finished_rows, "a finished trial ran again"
    assert rows[:len(kept_rows)] == kept_rows, "the resumed trial lost rows it reported before the kill"
    assert repeated <= 1
    board = json.loads((experiment / "leaderboard.json").read_text())
    assert len(board) == 2 and all((r["status"], r["epochs"]) == ("OK", EPOCHS) for r in board), board


def test_interrupted_sweep_exits_130_and_says_how_to_resume(cluster, fault_config):
    # Rule: Ctrl-C (SIGINT) of the sweep driver mid-sweep: Tune saves its state and stops; the driver then exits
    # 130, not 0 as if the sweep had finished, with one line saying how many trials are unfinished and how to resume.
    path, config = fault_config
    experiment = Path(config.storage.root) / "driver_sigint"
    driver = sweep_driver(cluster, path, "driver_sigint")
    try:
        wait_for(lambda: any(checkpoint_epochs(t) for t in experiment.glob("trial_*")), what="the first checkpoint",
                 driver=driver)
        driver.send_signal(signal.SIGINT)
        code = driver.wait(timeout=120)
    finally:
        driver.kill()
        driver.wait()
    log = driver.log.read_text()
    assert code == 130, log[-5000:]
    assert "of 2 trials unfinished" in log and f"kd-tune sweep --resume {experiment}" in log, log[-3000:]
    assert "Traceback" not in log
