"""The command line end to end: `kd-tune demo`, the README's main command, at a small size."""

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from kd_tune.features import N_SAMPLES


@pytest.mark.slow
def test_demo_runs_the_whole_job_and_exports_the_best_trial(tmp_path):
    # Rule: `kd-tune demo` synthesizes data, fine-tunes the teachers, sweeps (its own local Ray, stopped when the
    # process exits), and exports the leaderboard's best trial as an ONNX model that onnxruntime runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "kd_tune", "demo", "--out", str(tmp_path), "--search-space", "smoke",
                          "--set", "data.synth_size=small", "--set", "tune.num_samples=2", "--set",
                          "training.epochs=2"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = json.loads((tmp_path / "sweep" / "leaderboard.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "OK" for r in rows)
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["source"]["trial"] == rows[0]["trial"] and 0 <= card["threshold"] <= 1
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (probability,) = session.run(None, {"audio": np.zeros((1, N_SAMPLES), dtype=np.float32)})
    assert probability.shape == (1,) and 0 <= probability[0] <= 1
    assert f"tensorboard --logdir {tmp_path / 'sweep'}" in out.stdout
