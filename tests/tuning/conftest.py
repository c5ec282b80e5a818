"""Fixtures of the Ray layer's tests: `sweep_config`, a config for fast sweeps over trained tiny teachers, and
`smoke_job`, one smoke sweep submitted with `ray job submit` that test_sweep checks as a job and test_board reads
back from TensorBoard (a trial costs ~10 s of Ray's own start-up here: each sweep saved is a minute)."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from ray_cluster import Jobs, config_with_trained_teachers, small_set_two_teachers

from kd_tune.config import Config

SMOKE_JOB_TIMEOUT_S = 600
SMOKE_NAME = "smoke"  # the experiment's name, and the search space's


@pytest.fixture(scope="session")
def sweep_config(small_dataset, tmp_path_factory) -> tuple[Path, Config]:
    """A config for fast sweeps over two tiny, already fine-tuned teachers: its path, and the config."""
    work = tmp_path_factory.mktemp("sweep")
    raw = small_set_two_teachers(small_dataset, cnn_epochs=2) | {
        "training": {"epochs": 3, "batch_size": 32},
        "tune": {"num_samples": 4, "max_concurrent_trials": 2, "asha_grace_period": 1},
        "storage": {"root": str(work / "runs")}}
    return config_with_trained_teachers(raw, work)


@dataclass
class SmokeJob:
    config: Config
    jobs: Jobs
    submission_id: str
    state: str

    @property
    def experiment(self) -> Path:
        return Path(self.config.storage.root) / SMOKE_NAME


@pytest.fixture(scope="session")
def smoke_job(cluster, sweep_config) -> SmokeJob:
    """`ray job submit ... kd-tune sweep CONFIG --search-space smoke --name smoke` on the session cluster, ended."""
    path, config = sweep_config
    jobs = Jobs(cluster)
    job = jobs.submit("sweep", str(path), "--search-space", SMOKE_NAME, "--name", SMOKE_NAME)
    state = jobs.wait(job, timeout=SMOKE_JOB_TIMEOUT_S)
    return SmokeJob(config, jobs, job, state)
