"""The sweep: coverage points, Ray settings, and real sweeps on a real local Ray cluster (started by PID, own ports)."""

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from ray_cluster import BIN, REPO, Jobs, kd_tune

from kd_tune.config import load_config
from kd_tune.evaluation.leaderboard import leaderboard
from kd_tune.space import SearchSpace
from kd_tune.store.checkpoint import load_checkpoint
from kd_tune.tuning import sweep as sweep_module
from kd_tune.tuning.sweep import RAY_SETTINGS, apply_ray_settings, coverage_points, trials_that_fit
from kd_tune.space import trial_dirname
from kd_tune.tuning.trial import TRAIN_START_RETRIES

TRIAL_TAGS = ("loss/student", "loss/distillation", "loss/total", "schedule/alpha", "schedule/temperature",
              "eval/frr_at_target_fa")


def test_coverage_points_pair_every_teacher_and_schedule():
    # Rule: the first trials cover every teacher and every alpha schedule at least once.
    space = SearchSpace.model_validate({"teacher": {"choices": ["a", "b", "c"]},
                                        "alpha_schedule": {"choices": ["constant", "linear"]},
                                        "alpha_start": {"low": 0, "high": 1}, "temperature": {"low": 1, "high": 2}})
    points = coverage_points(space, num_samples=8)
    assert {p["teacher"] for p in points} == {"a", "b", "c"}
    assert {p["alpha_schedule"] for p in points} == {"constant", "linear"}


def test_ray_settings_are_defaults_that_the_user_can_override(monkeypatch):
    # Rule: a sweep sets Ray's state-sync and worker-poll intervals only where the environment has no value.
    for name in RAY_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    apply_ray_settings()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == RAY_SETTINGS["TUNE_GLOBAL_CHECKPOINT_S"]


def test_trials_that_fit_count_whole_workers_per_node():
    # Rule: a trial fits when its workers fit node by node (a worker never spans nodes), GPUs included; an
    # autoscaler's node type counts as many times as it may be added.
    two_small = [({"CPU": 2.0}, 1), ({"CPU": 1.0}, 1)]
    assert trials_that_fit(two_small, {"CPU": 1.0}, 1) == 3
    assert trials_that_fit(two_small, {"CPU": 1.5}, 1) == 1 and trials_that_fit(two_small, {"CPU": 1.5}, 2) == 0
    assert trials_that_fit(two_small, {"CPU": 64.0}, 1) == 0
    assert trials_that_fit(two_small, {"CPU": 1.0, "GPU": 1.0}, 1) == 0
    assert trials_that_fit([({"CPU": 4.0, "GPU": 1.0}, 2)], {"CPU": 1.0, "GPU": 1.0}, 2) == 1
    assert trials_that_fit([({"CPU": 0.0}, 1), ({"CPU": 8.0}, math.inf)], {"CPU": 8.0}, 1) == math.inf
    assert trials_that_fit([({"CPU": 8.0}, math.inf)], {"CPU": 1.0, "GPU": 1.0}, 1) == 0


def fake_result(tmp_path: Path, name: str, rows: list[dict], *, error: Exception | None = None):
    """A ResultGrid entry as Tune gives it: the trial's reported rows as a data frame, its path and error."""
    return SimpleNamespace(path=str(tmp_path / f"trial_{name}"), config={"teacher": "cnn"}, error=error,
                           metrics_dataframe=pd.DataFrame(rows))


def test_leaderboard_status_and_epochs_follow_the_reported_epochs(tmp_path):
    # Rule: a row's epochs are the last epoch `fit` reported (not Tune's training_iteration, which a resumed trial
    # restarts at 1); its status is OK only for a trial that reached training.epochs or that ASHA stopped (done on
    # its last report), INCOMPLETE for one stopped from outside, NOT_STARTED for one with no epoch, else ERROR.
    config = load_config(None, overrides=["training.epochs=3"], check_paths=False)
    resumed = [{"epoch": 1, "training_iteration": 1, "done": False},
               {"epoch": 2, "training_iteration": 2, "done": False},
               {"epoch": 3, "training_iteration": 1, "done": True}]  # resumed after epoch 2
    grid = [fake_result(tmp_path, "finished", resumed),
            fake_result(tmp_path, "asha", [{"epoch": 1, "training_iteration": 1, "done": True}]),
            fake_result(tmp_path, "stopped", resumed[:2]),
            fake_result(tmp_path, "never", []),
            fake_result(tmp_path, "failed", resumed[:1], error=RuntimeError("boom"))]
    rows = {r["trial"]: (r["status"], r["epochs"]) for r in leaderboard(grid, config)}
    assert rows == {"finished": ("OK", 3), "asha": ("OK", 1), "stopped": ("INCOMPLETE", 2),
                    "never": ("NOT_STARTED", 0), "failed": ("ERROR", 1)}


# ---------------------------------------------------------------- real sweeps on a real cluster (slow)


def events(directory: Path) -> tuple[set[str], bool]:
    """Scalar tags and whether an HParams summary is present, read back from a trial's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    hparams = any(v.metadata.plugin_data.plugin_name == "hparams"
                  for f in directory.glob("events.out.tfevents.*")
                  for event in EventFileLoader(str(f)).Load() for v in event.summary.value)
    return set(accumulator.Tags()["scalars"]), hparams


def result_lines(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_smoke_sweep_submitted_as_a_ray_job_end_to_end(cluster, smoke_job):
    # Rule: `ray job submit --working-dir . -- kd-tune sweep ...` against a token-auth cluster runs the smoke sweep
    # (>= 4 trials of its one teacher, >= 2 alpha schedules); every trial leaves TensorBoard scalars (student and
    # distillation loss apart, plus HParams), a verified checkpoint on storage and a row in leaderboard.csv/json;
    # `kd-tune results` prints the same leaderboard. ASHA stops every trial (at max_t, or earlier), and once the job
    # is over the State API shows none of its placement groups or actors left on the cluster.
    job, config, experiment = smoke_job, smoke_job.config, smoke_job.experiment
    assert job.state == "SUCCEEDED", job.jobs.run("logs", job.submission_id).stdout[-5000:]
    assert cluster.wait_until_clean(job.jobs.job_id(job.submission_id)) == []
    rows = json.loads((experiment / "leaderboard.json").read_text())
    assert len(rows) == 4 and (experiment / "leaderboard.csv").read_text().count("\n") == 5
    assert all(r["status"] == "OK" for r in rows)
    assert all(result_lines(experiment / trial_dirname(r["trial"], r))[-1]["done"] for r in rows)  # ASHA's STOP
    assert {r["teacher"] for r in rows} == {"cnn"} and len({r["alpha_schedule"] for r in rows}) >= 2
    for row in rows:
        tags, hparams = events(experiment / trial_dirname(row["trial"], row))
        assert set(TRIAL_TAGS) <= tags and hparams, (row["trial"], tags)
        checkpoint = Path(row["checkpoint"])
        manifest = load_checkpoint(checkpoint.parent, checkpoint.name).manifest
        assert manifest["kind"] == "student" and manifest["config"]["distillation"]["teachers"] == [row["teacher"]]
        assert row["student_loss"] > 0 and row["distillation_loss"] >= 0
    metric = config.tune.metric
    assert [r[metric] for r in rows] == sorted(r[metric] for r in rows)  # best first
    printed = kd_tune("results", str(experiment), env=cluster.env)
    assert printed.returncode == 0 and all(r["trial"] in printed.stdout for r in rows), printed.stderr


@pytest.mark.slow
def test_ray_job_stop_is_graceful_and_saves_the_state(cluster, sweep_config):
    # Rule: `ray job stop` (RAY_JOB_STOP_SIGNAL=SIGINT in the job's environment) stops a sweep with its state saved;
    # the leaderboard marks trials stopped before their last epoch INCOMPLETE and trials never started NOT_STARTED,
    # none OK; the State API then shows none of the job's placement groups or actors left on the cluster.
    path, config = sweep_config
    jobs = Jobs(cluster)
    job = jobs.submit("sweep", str(path), "--search-space", "smoke", "--name", "stopped", "--set",
                      "training.epochs=200", "--set", "tune.asha_grace_period=200")
    experiment = Path(config.storage.root) / "stopped"
    deadline = time.monotonic() + 300
    while not any(result_lines(d) for d in experiment.glob("trial_*")) and time.monotonic() < deadline:
        time.sleep(1)
    jobs.run("stop", job)
    assert jobs.wait(job, timeout=120) == "STOPPED"
    assert cluster.wait_until_clean(jobs.job_id(job)) == []
    assert list(experiment.glob("experiment_state-*.json")) and (experiment / "tuner.pkl").exists()
    rows = json.loads((experiment / "leaderboard.json").read_text())
    assert {r["status"] for r in rows} <= {"INCOMPLETE", "NOT_STARTED"}, rows
    assert any(r["status"] == "INCOMPLETE" and 1 <= r["epochs"] < 200 for r in rows), rows


# The sweep driver of the test below, run as another job: holds every CPU of the cluster until killed.
CPU_HOLDER = """
import sys, time, ray
ray.init(address=sys.argv[1])
group = ray.util.placement_group([{"CPU": float(sys.argv[2])}])
ray.get(group.ready())
print(group.id.hex(), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_trial_larger_than_the_cluster_is_refused_up_front(cluster, sweep_config):
    # Rule: a sweep whose trial needs more CPUs or GPUs than the cluster's nodes hold is refused before any trial
    # starts, with one line naming the field (exit 2), and writes nothing (it used to retry forever).
    path, config = sweep_config
    for setting, field in (("tune.cpus_per_worker=64", "tune.cpus_per_worker"), ("tune.use_gpu=true", "tune.use_gpu"),
                           ("tune.workers_per_trial=3", "tune.workers_per_trial")):
        started = time.monotonic()
        out = kd_tune("sweep", str(path), "--search-space", "smoke", "--name", "too_big", "--address",
                      cluster.address, "--set", setting, env=cluster.env, timeout=120)
        lines = [line for line in out.stderr.splitlines() if line.startswith("kd-tune:")]
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"kd-tune: {field}: "), out.stderr
        assert "Traceback" not in out.stderr and time.monotonic() - started < 60
    assert not (Path(config.storage.root) / "too_big").exists()


@pytest.mark.slow
def test_a_worker_group_that_cannot_start_fails_its_trial_with_the_reason(cluster, sweep_config):
    # Rule: when another job holds every CPU, a trial's Train worker group cannot start: after Train's bounded
    # retries (TRAIN_START_RETRIES) the trial fails with a one-line reason and the sweep exits non-zero instead of
    # waiting forever; the sweep's clean-up leaves the live job's placement group alone.
    path, config = sweep_config
    holder = subprocess.Popen([str(BIN / "python"), "-c", CPU_HOLDER, cluster.address, "2"], env=cluster.env,
                              stdout=subprocess.PIPE, text=True)
    try:
        held = holder.stdout.readline().strip()
        assert held, "the holder job did not get its placement group"
        started = time.monotonic()
        out = kd_tune("sweep", str(path), "--search-space", "smoke", "--name", "starved", "--address",
                      cluster.address, "--set", "tune.num_samples=1", "--set", "tune.max_failures=0",
                      env={**cluster.env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3"}, timeout=300)
        took = time.monotonic() - started
        assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
        reason = [line for line in out.stderr.splitlines() if "TrialStartError" in line and line.startswith("kd-tune:")]
        attempts = f"did not start in {TRAIN_START_RETRIES + 1} attempts"
        assert len(reason) == 1 and attempts in reason[0], out.stderr[-3000:]
        rows = json.loads((Path(config.storage.root) / "starved" / "leaderboard.json").read_text())
        assert [r["status"] for r in rows] == ["ERROR"]
        assert any(g["placement_group_id"] == held and g["state"] == "CREATED"
                   for g in cluster.state("placement_groups"))
        print(f"starved trial failed after {took:.0f} s")
    finally:
        holder.kill()
        holder.wait()


# The sweep driver of the test below: kd-tune itself, as installed, with a loader that moves the data folder away
# once read.
HIDING_DRIVER = """
import shutil, sys
from kd_tune import cli
from kd_tune.tuning import sweep

load_data = sweep.load_data

def load_then_hide(data_config):
    data = load_data(data_config)
    shutil.move(data_config.root, data_config.root + ".hidden")
    return data

sweep.load_data = load_then_hide
print(cli.__file__, flush=True)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_installed_wheel_sweeps_a_builtin_space_on_the_data_it_loaded_once(cluster, sweep_config, tmp_path):
    # Rules (one sweep: a trial costs ~10 s of Ray's own start-up): the wheel carries the built-in search spaces,
    # so after a non-editable install `kd-tune sweep --search-space smoke` resolves the name and runs (the installed
    # copy, not this checkout, is imported); and the sweep reads the data set once and its trials get it from Ray's
    # object store, so no trial reads data.root (the folder is moved away as soon as the driver has loaded it).
    path, config = sweep_config
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "-w", str(wheels)], check=True, timeout=600)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("kd_tune-*.whl"))],
                   check=True, timeout=300)
    data_root = shutil.copytree(config.data.root, tmp_path / "data")
    out = subprocess.run([str(BIN / "python"), "-c", HIDING_DRIVER, "sweep", str(path), "--search-space", "smoke",
                          "--name", "from_wheel", "--address", cluster.address, "--set", f"data.root={data_root}",
                          "--set", "tune.num_samples=2"], env={**cluster.env, "PYTHONPATH": str(site)},
                         cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert Path(out.stdout.splitlines()[0]).is_relative_to(site), out.stdout[:500]
    assert not data_root.exists() and (tmp_path / "data.hidden").is_dir()
    rows = json.loads((Path(config.storage.root) / "from_wheel" / "leaderboard.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "OK" and r["epochs"] >= 1 for r in rows)


def test_a_local_ray_that_fails_to_start_is_started_once_more(monkeypatch):
    # Rule: a local Ray whose start misses its own deadlines (a machine loaded to the hilt) is started once more, on a
    # fresh port that the State API address follows; a second failure is raised. ray.init is replaced here because a
    # start that fails under load cannot be produced on demand.
    calls = []

    def init(**kwargs):
        calls.append((kwargs["dashboard_port"], os.environ["RAY_API_SERVER_ADDRESS"]))
        if len(calls) == 1:
            raise RuntimeError("Failed to get node info: RPC error: Deadline Exceeded")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setattr(sweep_module.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep_module.ray, "init", init)
    monkeypatch.setattr(sweep_module.ray, "shutdown", lambda: None)
    sweep_module.connect_ray(None)
    assert len(calls) == 2 and all(address.endswith(f":{port}") for port, address in calls)
    calls.clear()
    monkeypatch.setattr(sweep_module.ray, "init", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("down")))
    with pytest.raises(RuntimeError, match="down"):
        sweep_module.connect_ray(None)
