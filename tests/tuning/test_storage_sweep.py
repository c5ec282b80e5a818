"""Sweeps on S3: a real moto server on 127.0.0.1 and a real local Ray cluster whose nodes hold the credentials.

S3 credentials and the signing key reach trial drivers and workers only through the environment of `ray start`
(never arguments, never runtime_env). The sweep's own driver runs without the signing key, so a signed checkpoint
proves the key came from the node.

Covered elsewhere, not repeated here: a .pt whose pickle carries a payload is refused without running it
(tests/store/test_storage.py::test_pickle_payload_in_pt_never_runs), and local traversal and symlink escapes
(test_escaping_and_malformed_paths_are_refused, test_symlinks_out_of_the_root_are_refused and
test_symlink_swapped_in_after_the_check_is_not_followed there).
"""

import json
import logging
import os
import secrets
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
import yaml
from ray_cluster import BIN, REPO, kd_tune, small_set_two_teachers, start_cluster
from s3_server import MOTO_ENV, OUTSIDE_ENV, create_bucket

from kd_tune.config import load_config
from kd_tune.signing import ENV_REQUIRE_SIGNATURE, ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE
from kd_tune.store import storage
from kd_tune.store.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from kd_tune.store.storage import PathEscapeError, Storage
from kd_tune.space import trial_dirname
from kd_tune.tuning.trial import verified_resume_point

# moto takes any credentials: unique secrets, so finding one anywhere means it leaked.
AWS_SECRET = f"kd-tune-test-secret-{secrets.token_hex(16)}"
SIGNING_KEY = f"kd-tune-test-key-{secrets.token_hex(16)}"
AWS_ENV = MOTO_ENV | {"AWS_SECRET_ACCESS_KEY": AWS_SECRET}
STATE_APIS = ("/api/jobs/", "/api/v0/actors?detail=1&limit=10000", "/api/v0/tasks?detail=1&limit=10000")
PREFIX = "experiments"
SMOKE = "smoke"
RESULT_POLL_S = 1.0
FIRST_TRIAL_TIMEOUT_S = 300.0


# ---------------------------------------------------------------- fixtures: credentials, bucket, cluster, teachers


@pytest.fixture(scope="module")
def aws_env():
    """moto's fake credentials in this process's environment for the module; no key, no endpoint from outside."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        for name in (*OUTSIDE_ENV, ENV_SIGNING_KEY,
                     ENV_SIGNING_KEY_FILE, ENV_REQUIRE_SIGNATURE):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def bucket(moto_s3, aws_env) -> str:
    return create_bucket(moto_s3)


@pytest.fixture(scope="module")
def cluster():
    # A short root keeps Ray's unix socket paths under the 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="kds", dir="/tmp"))
    cluster = start_cluster(root, extra_env=AWS_ENV | {ENV_SIGNING_KEY: SIGNING_KEY})
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def driver_env(cluster) -> dict[str, str]:
    """What `kd-tune sweep` runs with: the cluster's environment, credentials included, but not the signing key."""
    return {k: v for k, v in cluster.env.items() if k != ENV_SIGNING_KEY}


@pytest.fixture(scope="module")
def sweep_config(small_dataset, bucket, moto_s3, tmp_path_factory):
    """A config on s3://bucket/experiments with two tiny teachers fine-tuned (and signed) into the bucket."""
    from kd_tune.datasets.data import load_dataset
    from kd_tune.training.train import fit_teacher

    raw = small_set_two_teachers(small_dataset, cnn_epochs=2) | {
        "training": {"epochs": 3, "batch_size": 32},
        "tune": {"num_samples": 2, "max_concurrent_trials": 2, "asha_grace_period": 1},
        "storage": {"root": f"s3://{bucket}/{PREFIX}", "endpoint_override": moto_s3, "region": "us-east-1"}}
    path = tmp_path_factory.mktemp("s3_sweep") / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    data = load_dataset(config.data.root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_SIGNING_KEY, SIGNING_KEY)
        for teacher in config.teachers:
            fit_teacher(config, teacher, data=data)
    return path, config


@pytest.fixture(scope="module")
def smoke_sweep(cluster, driver_env, sweep_config):
    """One smoke sweep into the bucket, shared by the checks below: (config, storage, leaderboard rows)."""
    path, config = sweep_config
    out = kd_tune("sweep", str(path), "--search-space", "smoke", "--name", SMOKE, "--address", cluster.address,
                  env=driver_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    store = Storage.from_config(config.storage)
    return config, store, json.loads(storage.read_text(store, f"{SMOKE}/leaderboard.json"))


def result_lines(store: Storage, trial_dir: str) -> list[dict]:
    rel = f"{trial_dir}/result.json"
    return [json.loads(line) for line in storage.read_text(store, rel).splitlines()] if store.exists(rel) else []


def checkpoint_of(store: Storage, row: dict) -> tuple[Storage, str]:
    """The leaderboard row's checkpoint as (its parent directory on the same S3 filesystem, its name)."""
    parent, name = row["checkpoint"].rsplit("/", 1)
    return Storage(store.filesystem, parent), name


def object_paths(store: Storage) -> list[str]:
    selector = pafs.FileSelector(store.root, recursive=True)
    return [info.path for info in store.filesystem.get_file_info(selector) if info.type == pafs.FileType.File]


# ---------------------------------------------------------------- one sweep into the bucket (slow)


@pytest.mark.slow
def test_sweep_writes_results_checkpoints_and_tensorboard_to_the_bucket(smoke_sweep, bucket, monkeypatch):
    # Rule: with an s3:// storage root, the leaderboard, experiment state, every trial's checkpoint and TensorBoard
    # files land in the bucket (checkpoints verify there), and nothing is written to the local disk instead.
    config, store, rows = smoke_sweep
    names = store.listdir(SMOKE)
    assert {"leaderboard.json", "leaderboard.csv", "tuner.pkl", "config.yaml", "search_space.yaml"} <= set(names)
    assert any(n.startswith("experiment_state-") and n.endswith(".json") for n in names), names
    assert storage.read_text(store, f"{SMOKE}/leaderboard.csv").count("\n") == len(rows) + 1
    assert len(rows) == config.tune.num_samples and all(r["status"] == "OK" for r in rows), rows
    monkeypatch.setenv(ENV_SIGNING_KEY, SIGNING_KEY)
    for row in rows:
        trial = f"{SMOKE}/{trial_dirname(row['trial'], row)}"
        assert any(n.startswith("events.out.tfevents.") for n in store.listdir(trial)), store.listdir(trial)
        assert row["checkpoint"].startswith(f"{store.root}/{trial}/"), row["checkpoint"]
        parent, name = checkpoint_of(store, row)
        manifest = load_checkpoint(parent, name, require_signature=True).manifest
        assert manifest["kind"] == "student" and manifest["config"]["distillation"]["teachers"] == [row["teacher"]]
    for local in (REPO / "runs" / SMOKE, REPO / "runs" / "teachers", REPO / bucket, REPO / "s3:"):
        assert not local.exists(), f"{local} was written on the local disk"


@pytest.mark.slow
def test_sweep_signs_with_the_node_key(smoke_sweep, monkeypatch):
    # Rule: the signing key reaches workers through the node environment (the sweep's driver never has it): every
    # checkpoint of the sweep is signed with it, and fails verification with another key.
    _, store, rows = smoke_sweep
    for row in rows:
        parent, name = checkpoint_of(store, row)
        monkeypatch.setenv(ENV_SIGNING_KEY, SIGNING_KEY)
        assert verify_checkpoint(parent, name, require_signature=True)["signature"]["value"]
        monkeypatch.setenv(ENV_SIGNING_KEY, "another key")
        with pytest.raises(CheckpointError, match="signature does not match"):
            verify_checkpoint(parent, name)


@pytest.mark.slow
@pytest.mark.parametrize("secret", ["signing key", "AWS secret"])
def test_sweep_stores_no_secret_in_the_bucket_ray_state_or_logs(smoke_sweep, cluster, secret):
    # Rule: secrets come from the environment and stay there: neither the signing key nor the S3 secret appears in
    # any object in the bucket (tuner.pkl, experiment state, params, results, manifests), in the jobs, actors or
    # tasks the Ray state API shows (runtime_env included), or in the cluster's temp dir (session logs included).
    value = {"signing key": SIGNING_KEY, "AWS secret": AWS_SECRET}[secret].encode()
    _, store, _ = smoke_sweep
    paths = object_paths(store)
    assert any(p.endswith("tuner.pkl") for p in paths) and any(p.endswith("/params.json") for p in paths)
    assert not [p for p in paths if value in store.filesystem.open_input_stream(p).read()]
    token = cluster.token_file.read_text()
    for api in STATE_APIS:
        request = urllib.request.Request(cluster.dashboard + api, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert value not in response.read(), f"the {secret} is shown by {api}"
    files = [p for p in cluster.root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any("/logs/" in p.as_posix() for p in files)
    assert not [p for p in files if value in p.read_bytes()], f"the {secret} is written under {cluster.root}"


# ---------------------------------------------------------------- restore from the bucket (slow)


@pytest.mark.slow
def test_resume_from_the_bucket_after_the_driver_is_killed(cluster, driver_env, sweep_config):
    # Rule: `kd-tune sweep --resume s3://bucket/prefix/NAME CONFIG` finishes a sweep whose driver was SIGKILLed,
    # restoring from the bucket alone; a trial that had finished is not rerun.
    path, config = sweep_config
    store, name = Storage.from_config(config.storage), "resumed"
    command = [str(BIN / "python"), "-m", "kd_tune", "sweep", str(path), "--search-space", "smoke", "--name", name,
               "--address", cluster.address, "--set", "tune.max_concurrent_trials=1"]
    driver = subprocess.Popen(command, env=driver_env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    finished: dict[str, int] = {}
    deadline = time.monotonic() + FIRST_TRIAL_TIMEOUT_S
    try:
        while not finished and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(RESULT_POLL_S)
            trials = [n for n in store.listdir(name) if n.startswith("trial_")] if store.exists(name) else []
            for trial in trials:
                lines = result_lines(store, f"{name}/{trial}")
                if lines and lines[-1]["training_iteration"] == config.training.epochs:
                    finished[trial] = len(lines)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    assert finished, "no trial finished in the bucket before the deadline (or the driver exited first)"
    time.sleep(6)  # let the cluster notice the dead driver and release its trials' resources

    out = kd_tune("sweep", "--resume", f"{store.uri}/{name}", str(path), "--address", cluster.address,
                  env=driver_env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = json.loads(storage.read_text(store, f"{name}/leaderboard.json"))
    assert len(rows) == config.tune.num_samples and all(r["status"] == "OK" for r in rows), rows
    for trial, count in finished.items():
        assert len(result_lines(store, f"{name}/{trial}")) == count, f"{trial} ran again after resume"


# ---------------------------------------------------------------- resume point on S3 (in-process)

# Ray names checkpoints checkpoint_<timestamp>, so sorting by name is sorting by time.
CHECKPOINTS = ("checkpoint_2025-06-01_12-00-01.000000", "checkpoint_2025-06-01_12-00-02.000000",
               "checkpoint_2025-06-01_12-00-03.000000")
TRIAL = "x"
RUN = f"trial_{TRIAL}/train"


def save_step(store: Storage, name: str, step: int) -> None:
    tensors = {"model": {"w": torch.full((64, 8), float(step))}, "optimizer": {"state.0.exp_avg": torch.zeros(8)}}
    save_checkpoint(store, f"{RUN}/{name}", tensors, kind="student", name=TRIAL, config={}, epoch=step, step=step,
                    metrics={"frr_at_target_fa": 0.5 / step})


def flip_byte(store: Storage, rel: str) -> None:
    data = bytearray(store.read_bytes(f"{rel}/model.safetensors"))
    data[len(data) // 2] ^= 0x01
    store.write_bytes(f"{rel}/model.safetensors", bytes(data))


def add_file(store: Storage, rel: str) -> None:
    store.write_bytes(f"{rel}/extra.safetensors", b"not listed in the manifest")


def forge_metric(store: Storage, rel: str) -> None:
    manifest = storage.read_json(store, f"{rel}/manifest.json")
    manifest["metrics"]["frr_at_target_fa"] = 0.0
    storage.write_json(store, f"{rel}/manifest.json", manifest)


def resign_with_other_key(store: Storage, rel: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_SIGNING_KEY, "key1")
        save_step(store, rel.rsplit("/", 1)[1], 3)


@pytest.fixture
def s3_run(moto_s3, s3_bucket, monkeypatch) -> Storage:
    """Three signed checkpoints (steps 1, 2, 3) of one Ray Train run in a fresh bucket."""
    monkeypatch.setenv(ENV_SIGNING_KEY, "key2")
    store = Storage.from_uri(f"s3://{s3_bucket}/{PREFIX}", endpoint_override=moto_s3)
    for step, name in enumerate(CHECKPOINTS, start=1):
        save_step(store, name, step)
    return store


def ray_checkpoint(store: Storage, name: str):
    from ray.train import Checkpoint

    return Checkpoint(store.path(f"{RUN}/{name}"), store.filesystem)


@pytest.mark.parametrize("tamper,needle", [
    (flip_byte, "file model.safetensors does not match its SHA-256"),
    (add_file, "file extra.safetensors is in the directory but not in manifest.json"),
    (forge_metric, "signature does not match"),
    (resign_with_other_key, "signature does not match"),
], ids=["flipped-byte", "added-file", "forged-manifest", "other-key"])
def test_tampered_latest_checkpoint_is_refused_and_the_previous_good_one_resumes(s3_run, tamper, needle, caplog):
    # Rule: resuming on S3 verifies the newest checkpoint first; an altered one is refused with a warning naming
    # the checkpoint and the file or check that failed, and the trial resumes from the previous good checkpoint.
    newest = CHECKPOINTS[-1]
    tamper(s3_run, f"{RUN}/{newest}")
    with caplog.at_level(logging.WARNING, logger="kd_tune.tuning.trial"):
        point = verified_resume_point(ray_checkpoint(s3_run, newest), TRIAL)
    assert point.manifest["step"] == 2 and torch.equal(point.tensors["model"]["w"], torch.full((64, 8), 2.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and needle in warnings[0] and f"{RUN}/{newest}" in warnings[0], warnings


def test_resume_point_is_the_newest_good_checkpoint_and_none_good_is_an_error(s3_run, caplog):
    # Rule: an intact newest checkpoint is the resume point; when every checkpoint of the run fails verification
    # the trial fails with CheckpointError naming the run, after a warning for each refused checkpoint.
    assert verified_resume_point(ray_checkpoint(s3_run, CHECKPOINTS[-1]), TRIAL).manifest["step"] == 3
    for name in CHECKPOINTS:
        flip_byte(s3_run, f"{RUN}/{name}")
    with (caplog.at_level(logging.WARNING, logger="kd_tune.tuning.trial"),
          pytest.raises(CheckpointError, match=f"no checkpoint under {s3_run.root}/{RUN} passes verification")):
        verified_resume_point(ray_checkpoint(s3_run, CHECKPOINTS[-1]), TRIAL)
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [name for name in reversed(CHECKPOINTS) if any(name in m for m in refused)] == list(reversed(CHECKPOINTS))


# ---------------------------------------------------------------- confinement on S3 (fast)


@pytest.mark.parametrize("rel", ["../other-bucket", "../other-bucket/key", "a/../../other-bucket", "/other-bucket",
                                 "a//b"])
def test_s3_paths_cannot_leave_the_root(moto_s3, s3_bucket, rel):
    # Rule: on an s3:// root, '..', absolute and empty components are refused before any request is made, so no
    # object in another prefix or bucket is read, written or deleted.
    store = Storage.from_uri(f"s3://{s3_bucket}", endpoint_override=moto_s3)
    for operation in (store.path, store.exists, store.read_bytes, store.delete_dir, store.listdir,
                      lambda r: store.write_bytes(r, b"x")):
        with pytest.raises(PathEscapeError, match=f"root '{s3_bucket}'"):
            operation(rel)
    with pytest.raises(PathEscapeError, match="refusing to delete the storage root"):
        store.delete_dir(".")
