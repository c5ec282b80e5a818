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
def test_demo_runs_the_whole_job_and_ends_with_the_results(tmp_path):
    # Rule: `kd-tune demo --size small` synthesizes data, fine-tunes the teachers, sweeps (its own local Ray, stopped
    # at the end), exports the leaderboard's best trial as an ONNX model that onnxruntime runs, and measures it on the
    # held-out test split. Without a terminal its console is a line per phase, no Ray tables or actor lines and no progress
    # bars (those go to the experiment's sweep.log); it ends with the leaderboard, the exported model and its
    # held-out figures, the plots, the log's path and, last, the TensorBoard command. The plots are valid PNGs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "kd_tune", "demo", "--out", str(tmp_path), "--search-space", "smoke",
                          "--size", "small", "--set", "tune.num_samples=2", "--set",
                          "training.epochs=2", "--set", "teachers=[{name: cnn, arch: cnn, source: tiny, epochs: 1}, "
                          "{name: wav2vec2, arch: wav2vec2, source: tiny, epochs: 1}]"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    console = (out.stdout + out.stderr).splitlines()
    assert not [line for line in console if any(ray in line for ray in RAY_OUTPUT)], console
    assert len(console) < 40 and max(map(len, console)) < 400, console
    stdout = out.stdout.splitlines()
    assert stdout[-1] == f"TensorBoard: tensorboard --logdir {tmp_path / 'sweep'}"
    order = [next(i for i, line in enumerate(stdout) if line.startswith(start)) for start in
             ("data:", "teacher cnn:", "sweep: 2/2 trials done", "trial ", "model.onnx:", "at the model's threshold",
              "plot:", "Ray's log:")]
    assert order == sorted(order), stdout
    plots = [line.removeprefix("plot: ") for line in stdout if line.startswith("plot: ")]
    assert len(plots) >= 2 and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert (tmp_path / "eval" / "det.png").is_file() and (tmp_path / "sweep" / "sweep.log").stat().st_size > 0
    rows = json.loads((tmp_path / "sweep" / "leaderboard.json").read_text())
    assert len(rows) == 2 and all(r["status"] == "OK" for r in rows)
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["source"]["trial"] == rows[0]["trial"] and 0 <= card["threshold"] <= 1
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (probability,) = session.run(None, {"audio": np.zeros((1, N_SAMPLES), dtype=np.float32)})
    assert probability.shape == (1,) and 0 <= probability[0] <= 1


RAY_OUTPUT = ("RayTrainWorker", "pid=", "Trial status", "╭", "PlacementGroupCleaner", "actor is dead", "it/s")


def test_storage_moves_the_experiment_but_not_the_teachers(tmp_path):
    # Rule: `kd-tune sweep --storage ELSEWHERE` writes the experiment elsewhere and still finds the teachers where
    # they were fine-tuned (storage.teachers is pinned to their old place).
    from kd_tune.cli import with_storage
    from kd_tune.config import load_config
    from kd_tune.space import load_search_space
    from kd_tune.sweep import check_teachers_ready
    from kd_tune.teachers import teacher_store

    config = load_config(None, overrides=[f"storage.root={tmp_path / 'runs'}"], check_paths=False)
    for teacher in config.teachers:
        teacher_store(config).write_bytes(f"{teacher.name}/manifest.json", b"{}")
    moved = with_storage(config, str(tmp_path / "elsewhere"))
    assert moved.storage.root == str(tmp_path / "elsewhere")
    assert teacher_store(moved).uri == teacher_store(config).uri == str(tmp_path / "runs" / "teachers")
    check_teachers_ready(moved, load_search_space("default"))  # raises when a teacher is missing
