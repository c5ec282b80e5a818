"""The command line end to end: `kd-tune demo`, the README's main command, at a small size."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from kd_tune.audio.features import N_SAMPLES
from kd_tune.cli import main
from kd_tune.progress import LINE_INTERVAL_S

# phases of `kd-tune demo` that print periodic lines: synthesis, streams, teacher epoch, cache, sweep, scoring, and
# room for more; each prints a first and a last line besides one per LINE_INTERVAL_S
DEMO_PHASES = 10


@pytest.mark.slow
def test_demo_runs_the_whole_job_and_ends_with_the_results(tmp_path):
    # Rule: `kd-tune demo --size small` synthesizes data, fine-tunes the teachers, sweeps (its own local Ray, stopped
    # at the end), exports the leaderboard's best trial as an ONNX model that onnxruntime runs, and measures it on the
    # held-out test split. Without a terminal its console is a line per phase (and a plain progress line per 30 s of a
    # long phase), no Ray tables or actor lines and no progress bars (those go to the experiment's sweep.log); it
    # ends with the leaderboard, the exported model and its held-out figures, the plots, the log's path and, last,
    # the result block: the winner, the model it became and what to run next (TensorBoard last), within 120 columns.
    # The plots are valid PNGs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "disabled"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "kd_tune", "demo", "--out", str(tmp_path), "--search-space", "smoke",
                          "--size", "small", "--set", "tune.num_samples=2", "--set",
                          "training.epochs=2", "--set", "teachers=[{name: cnn, arch: cnn, source: tiny, epochs: 1}]"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    console = (out.stdout + out.stderr).splitlines()
    assert not [line for line in console if any(ray in line for ray in RAY_OUTPUT)], console
    # the periodic lines grow with the wall time (436 s beside other work made 61 lines in all); the others do not
    periodic = [line for line in console if "elapsed" in line or re.match(r"sweep: \d+/\d+ done", line)]
    assert len(periodic) <= 2 * DEMO_PHASES + (time.monotonic() - started) / LINE_INTERVAL_S, console
    assert len(console) - len(periodic) < 60 and max(map(len, console)) < 400, console
    stdout = out.stdout.splitlines()
    assert stdout[-2] == f"  tensorboard --logdir {tmp_path / 'sweep'}" and "?smoothing=0" in stdout[-1]
    order = [next(i for i, line in enumerate(stdout) if line.startswith(start)) for start in
             ("data:", "teacher cnn:", "sweep: 2/2 done", "trial ", "model.onnx:", "at the model's threshold",
              "plot:", "Ray's log:", "result: trial ", f"  model: {tmp_path / 'model.onnx'}", "  test: ", "next:")]
    assert order == sorted(order), stdout
    # the block fits 120 columns, but for the user's own paths (here pytest's long temporary folder)
    assert max(len(line.replace(str(tmp_path), "OUT")) for line in stdout[order[-3]:]) <= 120, stdout
    plots = [line.removeprefix("plot: ") for line in stdout if line.startswith("plot: ")]
    assert len(plots) >= 2 and all(Path(p).read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in plots)
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
    from kd_tune.training.teachers import teacher_store
    from kd_tune.tuning.sweep import check_teachers_ready

    config = load_config(None, overrides=[f"storage.root={tmp_path / 'runs'}"], check_paths=False)
    for teacher in config.teachers:
        teacher_store(config).write_bytes(f"{teacher.name}/manifest.json", b"{}")
    moved = with_storage(config, str(tmp_path / "elsewhere"))
    assert moved.storage.root == str(tmp_path / "elsewhere")
    assert teacher_store(moved).uri == teacher_store(config).uri == str(tmp_path / "runs" / "teachers")
    check_teachers_ready(moved, load_search_space("default"))  # raises when a teacher is missing


# `kd-tune results` in a fresh interpreter, reporting whether it loaded Ray; the exit code is the command's.
RESULTS_PROBE = ("import sys; from kd_tune.cli import main; code = main(sys.argv[1:]); "
                 "print('ray loaded:', 'ray' in sys.modules); sys.exit(code)")


def kd_tune_results(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RESULTS_PROBE, "results", *args], capture_output=True, text=True,
                          timeout=300)


def files_of(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_results_is_read_only_loads_no_ray_and_ends_with_the_result_block(tmp_path):
    # Rule: `kd-tune results EXPERIMENT` reads: it writes nothing into the experiment (no plots/ unless --plots),
    # never imports Ray, prints the leaderboard and then the result block within 120 columns, TensorBoard last.
    from test_leaderboard import demo_rows, experiment

    path, _ = experiment(tmp_path, demo_rows())
    before = files_of(path)
    out = kd_tune_results(str(path))
    assert out.returncode == 0, out.stderr
    stdout = out.stdout.splitlines()
    assert stdout[-1] == "ray loaded: False" and files_of(path) == before, out.stdout
    printed = stdout[:-1]
    assert max(map(len, printed)) <= 120 and printed[0].startswith("trial ") and "plot:" not in out.stdout
    assert "result: trial 00ab59af is best by frr_conditions" in out.stdout
    assert printed[-2] == f"  tensorboard --logdir {path}" and "?smoothing=0" in printed[-1]


def test_results_of_a_copied_experiment_names_the_copy(tmp_path):
    # Rule: `kd-tune results --wide` on a copy of an experiment prints checkpoint paths and commands under the copy,
    # never the folder the sweep wrote.
    from test_leaderboard import demo_rows, experiment

    original, _ = experiment(tmp_path / "runs", demo_rows())
    copy = tmp_path / "moved" / "sweep"
    shutil.copytree(original, copy)
    out = kd_tune_results(str(copy), "--wide")
    assert out.returncode == 0, out.stderr
    assert str(original) not in out.stdout and out.stdout.count(f"{copy}/trial_") == 6, out.stdout


def test_results_writes_the_plots_when_asked(tmp_path):
    # Rule: `kd-tune results --plots` (re)writes the experiment's plots and prints their paths.
    from test_leaderboard import demo_rows, experiment

    path, _ = experiment(tmp_path, demo_rows())
    out = kd_tune_results(str(path), "--plots")
    assert out.returncode == 0, out.stderr
    plots = [line.removeprefix("plot: ") for line in out.stdout.splitlines() if line.startswith("plot: ")]
    assert plots and all(p.startswith(f"{path}/plots/") and os.path.isfile(p) for p in plots), out.stdout


@pytest.mark.parametrize("argv,needle", [
    (["compare", "--seeds", "0"], "argument --seeds: got 0; allowed: 1 to 100"),
    (["compare", "--seeds", "two"], "argument --seeds: got two; allowed: 1 to 100"),
    (["bench", "--clips", "0"], "argument --clips: got 0; allowed: an integer >= 1"),
    (["eval", "m.onnx", "d", "--max-hours", "nan"], "argument --max-hours: got nan; allowed: a number > 0"),
    (["eval", "m.onnx", "d", "--stream-minutes", "inf"], "argument --stream-minutes: got inf; allowed: a number > 0"),
])
def test_a_number_flag_out_of_range_is_refused_by_the_parser(capsys, argv, needle):
    # Rule: a numeric flag is checked where it is parsed (argparse `type=`), before any work, exit 2, naming the flag
    # and what is allowed.
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2 and needle in capsys.readouterr().err
