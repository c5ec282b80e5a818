"""A real Ray cluster for tests: `ray start` on 127.0.0.1 with its own temp dir, free ports and token auth.

Only what these helpers start is stopped, by PID: never `ray stop`, since other Ray instances may share the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil


BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
STATE_LIMIT = 10_000  # the State API's largest page
NODE_STOP_GRACE_S = 3.0  # a raylet exits within a second of its SIGTERM
CLEANUP_TIMEOUT_S = 60.0  # a dead job's actors and placement groups are gone within seconds; a leak stays forever
# Ray's detached per-cluster singletons, created by the first job that needs them and meant to outlive it.
RAY_SINGLETONS = {"_AutoscalingCoordinatorActor", "TrainStateActor"}
NODE_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                   "runtime-env-agent-port", "node-manager-port", "object-manager-port")
HEAD_PORT_FLAGS = (*NODE_PORT_FLAGS, "ray-client-server-port")


def free_ports(count: int, *, avoid: set[int] = frozenset()) -> list[int]:
    """`count` distinct free local ports, none in `avoid`: all held open at once, so none is handed out twice."""
    ports: list[int] = []
    with contextlib.ExitStack() as held:
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            if (port := sock.getsockname()[1]) not in avoid:
                ports.append(port)
    return ports


def ray_env(token_file: Path) -> dict[str, str]:
    """The environment every client of the test cluster needs: token auth on, the token from a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_ADDRESS"}
    env.pop("RAY_ADDRESS", None)
    return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                  "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


def _name(pid: int) -> str:
    """A process's name; "" once it is gone."""
    try:
        return psutil.Process(pid).name()
    except psutil.NoSuchProcess:
        return ""


@dataclass
class RayNode:
    """One `ray start --block` process and what it spawned."""

    process: subprocess.Popen
    temp_dir: Path
    log: Path

    def pids(self) -> list[int]:
        try:
            return [self.process.pid] + [c.pid for c in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def raylet_pid(self) -> int:
        for pid in self.pids():
            if _name(pid).startswith("raylet"):
                return pid
        raise RuntimeError(f"no raylet among {self.pids()}; see {self.log}")

    def stop(self) -> None:
        """SIGTERM to the raylet, then to the rest; SIGKILL what is left after NODE_STOP_GRACE_S. Once a cluster has
        run a Train job, its GCS and Ray's own Python processes outlive a SIGTERM by 15 s or more, whichever order
        (`ray start --block` too): a test cluster has nothing to save, so they are not waited for."""
        processes = []
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                processes.append(psutil.Process(pid))
        for group in ([p for p in processes if _name(p.pid).startswith("raylet")], processes):
            for process in group:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.terminate()
            _, alive = psutil.wait_procs(group, timeout=NODE_STOP_GRACE_S)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.process.wait()


@dataclass
class RayCluster:
    root: Path
    token_file: Path
    gcs_port: int = field(init=False)
    dashboard_port: int = field(init=False)
    nodes: list[RayNode] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. S3 credentials: workers inherit the node's env

    def __post_init__(self) -> None:
        self.gcs_port, self.dashboard_port = free_ports(2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        # The State API of *this* cluster: Train V2's placement-group cleaner must not guess among instances.
        return ray_env(self.token_file) | self.extra_env | {"RAY_API_SERVER_ADDRESS": self.dashboard}

    def start_head(self, *, num_cpus: int = 2) -> RayNode:
        node = self._start("head", ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                                    "--dashboard-host=127.0.0.1", "--include-dashboard=true"], num_cpus,
                           port_flags=HEAD_PORT_FLAGS)
        self._wait(lambda: self._dashboard_up(), node, "dashboard")
        return node

    def add_worker(self, *, num_cpus: int = 1, wrapper: list[str] = ()) -> RayNode:
        """A second node on this host; `wrapper` runs it inside another command (e.g. a private mount namespace)."""
        before = self.alive_nodes()
        node = self._start(f"worker{len(self.nodes)}", [f"--address={self.address}"], num_cpus, wrapper)
        self._wait(lambda: self.alive_nodes() > before, node, "worker node")
        return node

    def alive_nodes(self) -> int:
        """Alive nodes, from the State API (`/api/v0/nodes`)."""
        return sum(n["state"] == "ALIVE" for n in self.state("nodes"))

    def get(self, path: str):
        request = urllib.request.Request(f"{self.dashboard}{path}",
                                         headers={"Authorization": f"Bearer {self.token_file.read_text()}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def state(self, kind: str) -> list[dict]:
        """Every entry, with details, of a State API list: nodes, actors, placement_groups, jobs..."""
        return self.get(f"/api/v0/{kind}?limit={STATE_LIMIT}&detail=1")["data"]["result"]["result"]

    def leftovers(self, job_id: str) -> list[str]:
        """What a finished job left on the cluster: its placement groups not REMOVED and its actors not DEAD, but
        for Ray's own detached per-cluster singletons (created by whichever job first needs them)."""
        groups = [f"placement group {g['placement_group_id']} {g['state']} {g['bundles']}"
                  for g in self.state("placement_groups")
                  if g["creator_job_id"] == job_id and g["state"] != "REMOVED"]
        actors = [f"actor {a['class_name']} {a['state']} pid {a['pid']}" for a in self.state("actors")
                  if a["job_id"] == job_id and a["state"] != "DEAD"
                  and not (a.get("is_detached") and a["class_name"] in RAY_SINGLETONS)]
        return groups + actors

    def wait_until_clean(self, job_id: str, *, timeout: float = CLEANUP_TIMEOUT_S) -> list[str]:
        """`leftovers` once the cluster has had `timeout` seconds to tear the job down; [] as soon as it has."""
        deadline = time.monotonic() + timeout
        while (left := self.leftovers(job_id)) and time.monotonic() < deadline:
            time.sleep(1)
        return left

    def _start(self, name: str, args: list[str], num_cpus: int, wrapper: list[str] = (), *,
               port_flags: tuple[str, ...] = NODE_PORT_FLAGS) -> RayNode:
        temp_dir = self.root / name  # a node needs its own temp dir, or it deletes the job's working dir
        temp_dir.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        # Drawn together: ports drawn one by one can repeat, and Ray refuses one port for two components.
        ports = free_ports(len(port_flags), avoid={self.gcs_port, self.dashboard_port})
        command = [*wrapper, str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                   f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                   *(f"--{flag}={port}" for flag, port in zip(port_flags, ports, strict=True)),
                   "--disable-usage-stats", *args]
        process = subprocess.Popen(command, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        node = RayNode(process, temp_dir, log)
        self.nodes.append(node)
        return node

    def _dashboard_up(self) -> bool:
        request = urllib.request.Request(f"{self.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {self.token_file.read_text()}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    @staticmethod
    def _wait(ready, node: RayNode, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {node.process.returncode}: {node.log.read_text()[-3000:]}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not up after {timeout} s: {node.log.read_text()[-3000:]}")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


class Jobs:
    """The Ray job CLI against the test cluster, as a user would run it."""

    def __init__(self, cluster):
        self.cluster, self.ray = cluster, str(BIN / "ray")

    def submit(self, *args: str) -> str:
        """`ray job submit --working-dir <repo> -- python -m kd_tune ARGS`; returns the submission id."""
        runtime_env = json.dumps({"env_vars": {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "30"}})
        out = subprocess.run([self.ray, "job", "submit", "--address", self.cluster.dashboard, "--working-dir",
                              str(REPO), "--runtime-env-json", runtime_env, "--no-wait", "--", "python", "-m",
                              "kd_tune", *args], env=self.cluster.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return next(w.strip("'") for w in out.stdout.split() if w.strip("'").startswith("raysubmit_"))

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.ray, "job", *args[:1], "--address", self.cluster.dashboard, *args[1:]],
                              env=self.cluster.env, capture_output=True, text=True, timeout=120)

    def job_id(self, submission_id: str) -> str:
        """The Ray job id (the creator id that the State API shows) of a submitted job."""
        return self.cluster.get(f"/api/jobs/{submission_id}")["job_id"]

    def status(self, job: str) -> str:
        out = self.run("status", job)
        said = (out.stdout + out.stderr).replace(job, "").upper()  # logged to stderr, e.g. "Job '...' succeeded"
        return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s in said), "?")

    def wait(self, job: str, *, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
            time.sleep(2)
        return state


def start_cluster(root: Path, *, extra_env: dict[str, str] | None = None, num_cpus: int = 2) -> RayCluster:
    """A head node on 127.0.0.1; `extra_env` goes to every node (and so every worker) and into `cluster.env`."""
    root.mkdir(parents=True, exist_ok=True)
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    cluster = RayCluster(root, token_file, extra_env=dict(extra_env or {}))
    try:
        cluster.start_head(num_cpus=num_cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def small_set_two_teachers(data_root: Path, *, cnn_epochs: int = 1) -> dict:
    """A raw config's data and teachers: the small synthetic set and two tiny teachers, cnn and wav2vec2."""
    return {"data": {"root": str(data_root), "synth_size": "small"},
            "teachers": [{"name": "cnn", "arch": "cnn", "source": "tiny", "epochs": cnn_epochs},
                         {"name": "wav2vec2", "arch": "wav2vec2", "source": "tiny", "epochs": 1}]}


def config_with_trained_teachers(raw: dict, directory: Path):
    """Write `raw` as directory/config.yaml, fine-tune every teacher it names onto its storage; (path, config)."""
    import yaml

    from kd_tune.config import load_config
    from kd_tune.datasets.data import load_dataset
    from kd_tune.training.train import fit_teacher

    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    data = load_dataset(config.data.root)
    for teacher in config.teachers:
        fit_teacher(config, teacher, data=data)
    return path, config


def kd_tune(*args: str, env: dict[str, str], timeout: float = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "python"), "-m", "kd_tune", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
