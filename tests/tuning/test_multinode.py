"""Two Ray nodes on one machine (each its own temp dir and ports), storage on the loopback S3 server."""

import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import Jobs, config_with_trained_teachers, kd_tune, small_set_two_teachers, start_cluster
from s3_server import MOTO_ENV, create_bucket

from kd_tune.store import storage
from kd_tune.store.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def two_nodes():
    # One CPU per node: each trial's single Train worker takes one, so concurrent trials land on different nodes.
    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="kdm", dir="/tmp")), extra_env=MOTO_ENV, num_cpus=1)
    try:
        cluster.add_worker(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def bucket_config(small_dataset, moto_s3, tmp_path_factory):
    """A sweep config whose storage is a fresh bucket, with both tiny teachers fine-tuned into it."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in MOTO_ENV.items():
            env.setenv(key, value)
        bucket = create_bucket(moto_s3)
        raw = small_set_two_teachers(small_dataset) | {
            "training": {"epochs": 4, "batch_size": 32},
            "tune": {"num_samples": 4, "max_concurrent_trials": 2, "asha_grace_period": 4},
            "storage": {"root": f"s3://{bucket}/runs", "endpoint_override": moto_s3}}
        return config_with_trained_teachers(raw, tmp_path_factory.mktemp("multinode"))


def results(store: storage.Storage, experiment: str) -> dict[str, list[dict]]:
    """Every trial's reported results, read from the bucket."""
    out = {}
    for trial in store.listdir(experiment) if store.exists(experiment) else []:
        if trial.startswith("trial_") and store.exists(f"{experiment}/{trial}/result.json"):
            text = storage.read_text(store, f"{experiment}/{trial}/result.json")
            out[trial] = [json.loads(line) for line in text.splitlines()]
    return out


def test_two_node_sweep_spreads_trials_and_survives_a_node_kill(two_nodes, bucket_config, monkeypatch):
    # Rule: a smoke sweep submitted with `ray job submit` runs trials on both nodes with every checkpoint in the
    # bucket; killing the second node's raylet mid-sweep retries its trials on the head from their checkpoints and
    # the sweep ends with a complete leaderboard, no errored trial and none of its placement groups or actors left.
    for key, value in MOTO_ENV.items():
        monkeypatch.setenv(key, value)
    path, config = bucket_config
    store = storage.Storage.from_config(config.storage)
    jobs, started = Jobs(two_nodes), time.monotonic()
    job = jobs.submit("sweep", str(path), "--search-space", "smoke", "--name", "spread")

    nodes, deadline = set(), time.monotonic() + 300
    while len(nodes) < 2 and time.monotonic() < deadline:  # wait for a reported epoch from each node
        time.sleep(2)
        nodes = {r["node"] for lines in results(store, "spread").values() for r in lines}
    assert len(nodes) == 2, f"trials did not reach both nodes: {nodes}"
    worker_node = next(n for n in nodes if not n.endswith(head_node_id(two_nodes)))
    os.kill(two_nodes.nodes[1].raylet_pid(), 9)
    killed_at = time.monotonic()

    assert jobs.wait(job, timeout=600) == "SUCCEEDED", jobs.run("logs", job).stdout[-5000:]
    print(f"two-node sweep: {time.monotonic() - started:.0f} s, {time.monotonic() - killed_at:.0f} s after the kill")
    assert two_nodes.wait_until_clean(jobs.job_id(job)) == []

    rows = json.loads(storage.read_text(store, "spread/leaderboard.json"))
    assert len(rows) == config.tune.num_samples and all(r["status"] == "OK" for r in rows)
    per_trial = results(store, "spread")
    on_worker = [t for t, lines in per_trial.items() if any(r["node"] == worker_node for r in lines)]
    assert on_worker and len(on_worker) < len(per_trial), "trials were not spread over both nodes"
    for row in rows:  # every checkpoint landed in the bucket and verifies
        parent, name = row["checkpoint"].rsplit("/", 1)
        load_checkpoint(storage.Storage(store.filesystem, parent), name)
    finished_on_head = [t for t in on_worker if per_trial[t][-1]["node"] != worker_node]
    print(f"trials per node: {len(on_worker)} reached the worker, {len(finished_on_head)} finished on the head")


def head_node_id(cluster) -> str:
    """The first 8 characters of the head's Ray node id, as the `node` metric shows it."""
    import urllib.request

    request = urllib.request.Request(f"{cluster.dashboard}/api/v0/nodes?limit=100",
                                     headers={"Authorization": f"Bearer {cluster.token_file.read_text()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return next(n["node_id"][:8] for n in nodes if n["is_head_node"])


def test_local_storage_one_node_cannot_see_is_refused_up_front(two_nodes, small_dataset, tmp_path):
    # Rule: a local storage path that only some nodes can see is refused before any trial starts, naming the
    # path; the blind node runs in a private mount namespace with an empty tmpfs over the storage directory.
    shared = tmp_path / "only-here"
    shared.mkdir()
    two_nodes.add_worker(num_cpus=1, wrapper=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                              f"mount -t tmpfs none {shared} && exec \"$@\"", "sh"])
    from kd_tune.store.checkpoint import save_checkpoint

    for name in ("cnn", "wav2vec2"):  # the teacher check comes first: give it stored teachers to find
        save_checkpoint(shared, f"teachers/{name}", {"model": {}}, kind="teacher", config={})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(small_dataset)}, "storage": {"root": str(shared)}}))
    out = kd_tune("sweep", str(config), "--search-space", "smoke", "--name", "blind", "--address",
                  two_nodes.address, env=two_nodes.env, timeout=180)
    assert out.returncode != 0
    assert "is a local path that nodes" in out.stderr and str(shared) in out.stderr, out.stderr[-3000:]
    assert not (shared / "blind").exists()  # refused before the experiment was written
