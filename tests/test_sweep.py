"""The sweep: search spaces, trial configs, and real sweeps on a real local Ray cluster (started by PID, own ports)."""

import json
import os
from importlib import resources
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import BIN, REPO, Jobs, config_with_trained_teachers, kd_tune, start_cluster

from kd_tune.checkpoint import load_checkpoint
from kd_tune.config import ConfigError, load_config
from kd_tune.space import SearchSpace, builtin_spaces, SpaceSampler, load_search_space, trial_config
from kd_tune.sweep import RAY_SETTINGS, apply_ray_settings, coverage_points

TRIAL_TAGS = ("loss/student", "loss/distillation", "loss/total", "schedule/alpha", "schedule/temperature",
              "val/frr_at_target_fa")


# ---------------------------------------------------------------- search spaces (fast)


@pytest.mark.parametrize("name", builtin_spaces())
def test_every_builtin_search_space_is_valid(name):
    # Rule: every built-in space resolves by name, validates and names only configured teachers of the default.
    space = load_search_space(name)
    space.check_teachers(load_config(None, check_paths=False), source=name)


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s["temperature"].update(low=0.0), "temperature"),
    (lambda s: s["alpha_schedule"].update(choices=["exponential"]), "alpha_schedule"),
    (lambda s: s["alpha_start"].update(high=1.5), "alpha_start"),
    (lambda s: s.update(learning_rate={"low": 1e-3, "high": 1e-2}), "learning_rate"),
    (lambda s: s.pop("teacher"), "teacher"),
    (lambda s: s["lr"].update(low=0.1, high=0.01), "lr"),
])
def test_invalid_search_space_names_the_key(tmp_path, edit, needle):
    # Rule: an invalid space is a clear error naming the key.
    raw = yaml.safe_load(resources.files("kd_tune").joinpath("search_spaces", "default.yaml").read_text())
    edit(raw)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_search_space(path)
    assert needle in str(e.value)


def test_unconfigured_teacher_in_space_is_refused():
    # Rule: the teacher choices must be configured teachers.
    space = load_search_space("smoke")
    config = load_config(None, overrides=["teachers=[{name: cnn, arch: cnn}]", "distillation.teachers=[cnn]"],
                         check_paths=False)
    with pytest.raises(ConfigError, match="wav2vec2"):
        space.check_teachers(config, source="smoke")


def test_define_by_run_samples_conditional_parameters_only_where_used():
    # Rule: alpha_end is sampled only for non-constant schedules, alpha_step_point only for `step`.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampler = SpaceSampler(load_search_space("default"))
    for _ in range(40):
        trial = study.ask()
        sampler(trial)
        study.tell(trial, 0.0)
        params = trial.params
        assert ("alpha_end" in params) == (params["alpha_schedule"] != "constant")
        assert ("alpha_step_point" in params) == (params["alpha_schedule"] == "step")
        assert ("temperature_end" in params) == (params["temperature_schedule"] != "constant")


def test_trial_config_maps_parameters_onto_the_config():
    # Rule: each searched parameter lands in its config field; a constant schedule keeps alpha_end = alpha_start.
    base = load_config(None, check_paths=False)
    config = trial_config(base, {"teacher": "wav2vec2", "alpha_schedule": "constant", "alpha_start": 0.3,
                                 "temperature": 7.5, "student_width": 0.5})
    d = config.distillation
    assert d.teachers == ["wav2vec2"] and d.alpha_start == d.alpha_end == 0.3
    assert d.temperature_start == d.temperature_end == 7.5 and config.student.width == 0.5
    stepped = trial_config(base, {"teacher": "cnn", "alpha_schedule": "step", "alpha_start": 0.1, "alpha_end": 0.9,
                                  "alpha_step_point": 0.4, "temperature": 2.0})
    assert stepped.distillation.alpha_step_points == (0.4,) and stepped.distillation.alpha_end == 0.9


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


# ---------------------------------------------------------------- real sweeps on a real cluster (slow)


@pytest.fixture(scope="module")
def cluster():
    # A short root keeps Ray's unix socket paths under the 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="kdr", dir="/tmp"))
    cluster = start_cluster(root)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def sweep_config(small_dataset, tmp_path_factory):
    """A config for fast sweeps over two tiny, already fine-tuned teachers."""
    work = tmp_path_factory.mktemp("sweep")
    raw = {"data": {"root": str(small_dataset), "synth_size": "small"},
           "teachers": [{"name": "cnn", "arch": "cnn", "source": "tiny", "epochs": 2},
                        {"name": "wav2vec2", "arch": "wav2vec2", "source": "tiny", "epochs": 1}],
           "training": {"epochs": 3, "batch_size": 32},
           "tune": {"num_samples": 4, "max_concurrent_trials": 2, "asha_grace_period": 1},
           "storage": {"root": str(work / "runs")}}
    return config_with_trained_teachers(raw, work)


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
def test_resume_after_driver_kill_reruns_no_finished_trial(cluster, sweep_config):
    # Rule: `kd-tune sweep --resume` continues a sweep whose driver was killed; finished trials are not rerun.
    path, config = sweep_config
    experiment = Path(config.storage.root) / "resumed"
    command = [str(BIN / "python"), "-m", "kd_tune", "sweep", str(path), "--search-space", "smoke", "--name",
               "resumed", "--address", cluster.address, "--set", "tune.max_concurrent_trials=1", "--set",
               "tune.num_samples=2"]
    driver = subprocess.Popen(command, env=cluster.env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    finished: dict[str, int] = {}
    deadline = time.monotonic() + 300
    while not finished and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(1)
        for trial_dir in experiment.glob("trial_*"):
            lines = result_lines(trial_dir)
            if lines and lines[-1]["training_iteration"] == config.training.epochs:
                finished[trial_dir.name] = len(lines)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert finished, "no trial finished before the deadline"
    time.sleep(6)  # let the cluster notice the dead driver and release its trials' resources

    out = kd_tune("sweep", "--resume", str(experiment), "--address", cluster.address, env=cluster.env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = json.loads((experiment / "leaderboard.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "OK" for r in rows)
    for name, count in finished.items():
        assert len(result_lines(experiment / name)) == count, f"{name} ran again after resume"


@pytest.mark.slow
def test_smoke_sweep_submitted_as_a_ray_job_end_to_end(cluster, sweep_config):
    # Rule: `ray job submit --working-dir . -- kd-tune sweep ...` against a token-auth cluster runs the smoke sweep
    # (>= 4 trials, >= 2 teachers, >= 2 alpha schedules); every trial leaves TensorBoard scalars (student and
    # distillation loss apart, plus HParams), a verified checkpoint on storage and a row in leaderboard.csv/json;
    # `kd-tune results` prints the same leaderboard.
    path, config = sweep_config
    jobs = Jobs(cluster)
    job = jobs.submit("sweep", str(path), "--search-space", "smoke", "--name", "smoke")
    assert jobs.wait(job, timeout=600) == "SUCCEEDED", jobs.run("logs", job).stdout[-5000:]
    experiment = Path(config.storage.root) / "smoke"
    rows = json.loads((experiment / "leaderboard.json").read_text())
    assert len(rows) == 4 and (experiment / "leaderboard.csv").read_text().count("\n") == 5
    assert len({r["teacher"] for r in rows}) >= 2 and len({r["alpha_schedule"] for r in rows}) >= 2
    for row in rows:
        tags, hparams = events(experiment / f"trial_{row['trial']}")
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
    # Rule: `ray job stop` (RAY_JOB_STOP_SIGNAL=SIGINT in the job's environment) stops a sweep with its state saved.
    path, config = sweep_config
    jobs = Jobs(cluster)
    job = jobs.submit("sweep", str(path), "--search-space", "smoke", "--name", "stopped", "--set",
                      "training.epochs=20")
    experiment = Path(config.storage.root) / "stopped"
    deadline = time.monotonic() + 300
    while not any(result_lines(d) for d in experiment.glob("trial_*")) and time.monotonic() < deadline:
        time.sleep(1)
    jobs.run("stop", job)
    assert jobs.wait(job, timeout=120) == "STOPPED"
    assert list(experiment.glob("experiment_state-*.json")) and (experiment / "tuner.pkl").exists()


# The sweep driver of the test below: kd-tune itself, with a loader that moves the data folder away once read.
HIDING_DRIVER = """
import shutil, sys
from kd_tune import cli, sweep

load_dataset = sweep.load_dataset

def load_then_hide(root):
    data = load_dataset(root)
    shutil.move(root, root + ".hidden")
    return data

sweep.load_dataset = load_then_hide
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_trials_train_on_the_data_the_sweep_loaded(cluster, sweep_config, tmp_path):
    # Rule: the sweep reads the data set once and trials get it from Ray's object store: no trial reads data.root
    # (here the folder is moved away as soon as the sweep driver has loaded it).
    path, config = sweep_config
    data_root = shutil.copytree(config.data.root, tmp_path / "data")
    out = subprocess.run([str(BIN / "python"), "-c", HIDING_DRIVER, "sweep", str(path), "--search-space", "smoke",
                          "--name", "hidden_data", "--address", cluster.address, "--set", f"data.root={data_root}",
                          "--set", "tune.num_samples=2"], env=cluster.env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert not data_root.exists() and (tmp_path / "data.hidden").is_dir()
    rows = json.loads((Path(config.storage.root) / "hidden_data" / "leaderboard.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "OK" and r["epochs"] >= 1 for r in rows)


@pytest.mark.slow
def test_a_wheel_install_finds_the_builtin_search_spaces_by_name(cluster, sweep_config, tmp_path):
    # Rule: the wheel carries the built-in search spaces: after a non-editable install, `kd-tune sweep
    # --search-space smoke` resolves the name and runs (the installed copy, not this checkout, is imported).
    path, config = sweep_config
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "-w", str(wheels)], check=True, timeout=600)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("kd_tune-*.whl"))],
                   check=True, timeout=300)
    env = {**cluster.env, "PYTHONPATH": str(site)}
    where = subprocess.run([str(BIN / "python"), "-c", "import kd_tune; print(kd_tune.__file__)"], env=env,
                           cwd=elsewhere, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)
    out = kd_tune("sweep", str(path), "--search-space", "smoke", "--name", "from_wheel", "--address", cluster.address,
                  "--set", "tune.num_samples=1", "--set", "training.epochs=1", env=env, cwd=elsewhere)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((Path(config.storage.root) / "from_wheel" / "leaderboard.json").read_text())
    assert len(rows) == 1 and rows[0]["status"] == "OK"
