"""Shared fixtures: `small_dataset`, a small synthetic data set; `moto_s3`, a real S3 protocol server (moto) on
127.0.0.1 for the whole session; `s3_bucket`, a fresh bucket on it; `folder`, a tiny eval folder with known answers."""

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from s3_server import MOTO_ENV, OUTSIDE_ENV, create_bucket
from kd_tune.tuning.sweep import free_port

MOTO_START_TIMEOUT_S = 30.0
MOTO_STOP_TIMEOUT_S = 5.0


def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*launcher, "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_answering(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"moto_server did not answer at {url} within {MOTO_START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """The endpoint URL (http://127.0.0.1:PORT) of a moto S3 server, stopped by its PID at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as out:  # a file, not a pipe: moto logs every request and a full pipe would block it
        proc = subprocess.Popen(_moto_command(port), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answering(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=MOTO_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(moto_s3, monkeypatch) -> str:
    """A fresh, empty bucket on `moto_s3`, with moto's fake credentials set in the environment for the test."""
    for name, value in MOTO_ENV.items():
        monkeypatch.setenv(name, value)
    for name in OUTSIDE_ENV:
        monkeypatch.delenv(name, raising=False)
    return create_bucket(moto_s3)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Root of the small synthetic data set (seed 0), built once per session."""
    from kd_tune.datasets.synth import synthesize

    root = tmp_path_factory.mktemp("small_dataset")
    synthesize(root, size="small", seed=0, progress=False)
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    """test_heldout's tiny eval folder, whose figures for its peak_model are worked out by hand (eval, condition
    grid and progress tests)."""
    from test_heldout import eval_folder

    return eval_folder(tmp_path)


@pytest.fixture
def no_signing_env(monkeypatch):
    """No signing key or requirement from the developer's environment: a test sets what it checks."""
    from kd_tune.signing import ENV_REQUIRE_SIGNATURE, ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE

    for name in (ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, ENV_REQUIRE_SIGNATURE):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def cluster():
    """One plain Ray cluster (a head of 2 CPUs on 127.0.0.1) for every test that only needs somewhere to run a
    sweep; test modules that need another (S3 credentials and a signing key, two nodes) override `cluster`."""
    from ray_cluster import start_cluster

    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="kdr", dir="/tmp")))  # short root: Ray's socket paths
    yield cluster
    cluster.stop()
