"""evaluation.leaderboard's console view, Ray-free: the leaderboard within 120 columns, ASHA-stopped trials marked, the
checkpoint paths of a moved experiment, and the result block that ends every sweep and demo. The experiments are
fabricated from leaderboard rows, as a sweep writes them; no Ray cluster is needed."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kd_tune.config import load_config
from kd_tune.evaluation.leaderboard import (CLEAN_FRR_TARGET, CONSOLE_COLUMNS, LEADERBOARD_COLUMNS, format_leaderboard,
                                            read_leaderboard, result_block, write_leaderboard)
from kd_tune.metrics import METRICS
from kd_tune.space import load_search_space
from kd_tune.store.checkpoint import save_checkpoint
from kd_tune.store.storage import Storage, write_json, write_text
from kd_tune.training.teachers import TEACHER_KIND, teacher_store

pytestmark = pytest.mark.usefixtures("no_signing_env")  # conftest: the environment's key never leaks in
EPOCHS = 6
CHECKPOINT = "train/checkpoint_2026-11-28_02-20-55.696269"


def demo_rows() -> list[dict]:
    """Six rows, best first, as a default-size demo's leaderboard holds them: two teachers, four alpha schedules, a
    decaying temperature, three trials ASHA stopped early, and every metric column filled with full-precision floats."""
    settings = [("cnn", "linear", 0.5617, 0.2269, 18.84, 2.125, 6), ("cnn", "constant", 0.5293, None, 8.521, None, 6),
                ("wav2vec2", "cosine", 0.9123, 0.1011, 3.558, None, 4), ("cnn", "step", 0.2, 0.7, 1.234, None, 2),
                ("wav2vec2", "linear", 0.3312, 0.8871, 12.5, 1.75, 6),
                ("wav2vec2", "constant", 0.05, None, 2.0, None, 2)]
    rows = []
    for i, (teacher, schedule, start, end, temperature, t_end, epochs) in enumerate(settings):
        metrics = {name: 0.0703125 + 0.1234567 * i for name in METRICS if METRICS[name].column}
        rows.append({**metrics, "trial": f"{i:02d}ab59af", "status": "OK", "teacher": teacher,
                     "alpha_schedule": schedule, "alpha_start": start, "alpha_end": start if end is None else end,
                     "temperature": temperature, "temperature_schedule": "constant" if t_end is None else "cosine",
                     "temperature_end": t_end, "lr": 0.003123456, "student_width": 1.0, "epochs": epochs,
                     "fa_per_hour": 3.0 if i == 0 else 1.9876, "auc": 0.9876543, "accuracy": 0.9543210,
                     "node": "10.0.0.12"})
    return rows


def experiment(root: Path, rows: list[dict], *, name: str = "sweep") -> tuple[Path, object]:
    """An experiment folder as a sweep leaves it for `kd-tune results`: its saved config and search space, and
    leaderboard.csv/json whose checkpoint paths lie under it (results never opens the checkpoints)."""
    config = load_config(None, overrides=[f"storage.root={root}", f"training.epochs={EPOCHS}",
                                          f"data.root={root / 'data'}"], check_paths=False)
    store = Storage.from_uri(root)
    write_text(store, f"{name}/config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    space = load_search_space("default").model_dump()
    space["teacher"]["choices"] = ["cnn", "wav2vec2"]
    write_text(store, f"{name}/search_space.yaml", yaml.safe_dump(space))
    for row in rows:
        row["checkpoint"] = f"{store.root}/{name}/trial_{row['trial']}_{row['teacher']}_{row['alpha_schedule']}/" \
                            f"{CHECKPOINT}"
    write_leaderboard(store, name, rows)
    return root / name, config


def save_teacher_auc(config, name: str, auc: float) -> None:
    """A teacher in the teacher store with only what the result block reads: its verified manifest's metrics."""
    save_checkpoint(teacher_store(config), name, {"model": {"w": torch.zeros(2)}}, kind=TEACHER_KIND, name=name,
                    pinned=True, config=config.to_dict(), metrics={"auc": auc})


def test_console_leaderboard_fits_120_columns_and_the_files_keep_every_column(tmp_path):
    # Rule: the console's leaderboard fits 120 columns: no checkpoint path, the sweep's metric always, the shown
    # metrics (METRICS' `shown`) that fit, accuracy and fa_per_hour dropped first; leaderboard.csv/json keep them all.
    path, config = experiment(tmp_path, demo_rows())
    text = format_leaderboard(read_leaderboard(str(path), config), config, experiment=str(path))
    header = text.splitlines()[0].split()
    assert max(map(len, text.splitlines())) <= CONSOLE_COLUMNS, text
    assert {"frr_conditions", "frr_at_target_fa", "auc", "epochs"} <= set(header), header
    assert "checkpoint" not in header and "accuracy" not in header and "train/checkpoint_" not in text
    assert set(header) - {"trial", "status", "teacher", "schedule", "alpha", "T", "epochs"} <= {
        name for name, m in METRICS.items() if m.shown}
    csv_header = (path / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert list(LEADERBOARD_COLUMNS) == csv_header and {"checkpoint", "accuracy", "fa_per_hour"} <= set(csv_header)


def test_console_leaderboard_marks_trials_that_asha_stopped(tmp_path):
    # Rule: an OK trial with fewer epochs than training.epochs was stopped by ASHA and its status says so with how
    # far it got; a trial that ran to its end is plain OK, and other statuses show as they are.
    rows = demo_rows()
    rows[-1]["status"] = "INCOMPLETE"
    path, config = experiment(tmp_path, rows)
    lines = format_leaderboard(rows, config, experiment=str(path)).splitlines()[1:]
    status = {line.split()[0]: line.split("  ")[1].strip() for line in lines}
    assert status == {"00ab59af": "OK", "01ab59af": "OK", "02ab59af": "OK (ASHA, 4/6)",
                      "03ab59af": "OK (ASHA, 2/6)", "04ab59af": "OK", "05ab59af": "INCOMPLETE"}, lines


def test_wide_view_names_the_checkpoints_of_the_experiment_given_even_after_a_copy(tmp_path):
    # Rule: `--wide` adds the checkpoint paths, and they lie under the experiment it was given: a copied experiment
    # names the copy's checkpoints, not the folder the sweep wrote (leaderboard.json itself is not rewritten).
    original, config = experiment(tmp_path / "runs", demo_rows())
    copy = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(original, copy)
    text = format_leaderboard(read_leaderboard(str(copy), config), config, experiment=str(copy), wide=True)
    paths = [line.split()[-1] for line in text.splitlines()[1:]]
    assert all(p.startswith(f"{copy}/trial_") and p.endswith(CHECKPOINT) for p in paths), paths
    assert str(original) not in text and str(original) in (copy / "leaderboard.json").read_text()


def test_result_block_names_the_winner_its_setting_and_flags_missed_targets(tmp_path):
    # Rule: the result block names the winning trial, its setting in one line (teacher, alpha schedule start/end,
    # temperature, lr, width), its validation figures with their targets, MISSED where the FA/h is above
    # training.target_fa_per_hour, and what to run next (export, eval --conditions default, detect, TensorBoard);
    # every line fits 120 columns.
    path, config = experiment(tmp_path, demo_rows())
    block = result_block(read_leaderboard(str(path), config), config, experiment=str(path))
    lines = block.splitlines()
    assert max(map(len, lines)) <= CONSOLE_COLUMNS, block
    assert lines[1] == "result: trial 00ab59af is best by frr_conditions of 6 trials; 3 stopped early by ASHA"
    assert lines[2] == ("  setting: teacher cnn, alpha linear 0.56 -> 0.23, temperature 18.8 -> 2.12 (cosine), "
                        "lr 0.003123, width 1")
    figures = {line.split()[0]: line for line in lines if line.startswith("    ")}
    assert "FRR at 2 FA/h" in figures["frr_conditions"] and "MISSED" not in figures["frr_conditions"]
    assert "target <= 2" in figures["fa_per_hour"] and figures["fa_per_hour"].endswith("MISSED: above the target")
    assert f"  kd-tune export {path} --out model.onnx" in lines
    assert f"  kd-tune eval model.onnx {tmp_path / 'data'} --conditions default" in lines
    assert "  kd-tune detect model.onnx FILE.wav" in lines and lines[-2] == f"  tensorboard --logdir {path}"
    assert "http://localhost:6006/?smoothing=0" in lines[-1]


def test_result_block_shows_the_test_figures_against_their_targets(tmp_path):
    # Rule: given the exported model's evaluation report, the block shows its test figures: FRR at 1 FA/h against
    # the clean target, flagged MISSED above it, and FA/h at the model's threshold against target_fa_per_hour.
    path, config = experiment(tmp_path, demo_rows())
    report = {"positives": 328, "negative_hours": 1.0, "frr": 0.055, "fa_per_hour": 8.0,
              "frr_at_fa_per_hour": {"0.5": 0.448, "1": 0.323, "2": 0.162, "5": 0.067}}
    lines = result_block(demo_rows(), config, experiment=str(path), test=report).splitlines()
    assert max(map(len, lines)) <= CONSOLE_COLUMNS
    start = lines.index("  test: 328 wake words of voices never heard, 1.00 h of negative audio:")
    test = {line.split()[0]: line for line in lines[start + 1:start + 4]}
    assert test["frr_at_1_fa_h"].endswith(f"target <= {CLEAN_FRR_TARGET:g}  MISSED: above the target")
    assert " 0.323 " in test["frr_at_1_fa_h"] and "MISSED" not in test["frr"]
    assert test["fa_per_hour"].endswith("target <= 2  MISSED: above the target")
    report |= {"fa_per_hour": 1.0, "frr_at_fa_per_hour": {"1": 0.04}}
    met = result_block(demo_rows(), config, experiment=str(path), test=report)
    assert "MISSED" not in met.split("  test:")[1].split("next:")[0]


def test_result_block_flags_a_frr_of_one_and_a_tie(tmp_path):
    # Rule: a winner that catches no wake word at the target FA/h is flagged, and a tie on the metric is said (the
    # exported model may then hold another of the tied trials).
    rows = demo_rows()
    for row in rows[:3]:
        row |= {"frr_conditions": 1.0, "frr_at_target_fa": 1.0}
    path, config = experiment(tmp_path, rows)
    lines = result_block(rows, config, experiment=str(path)).splitlines()
    assert "tied with 2 others" in lines[1]
    assert all(line.endswith("MISSED: no wake word caught") for line in lines if line.startswith("    frr_"))


def test_result_block_flags_a_weak_teacher_from_its_verified_manifest(tmp_path):
    # Rule: a teacher the rows use whose validation AUC (its manifest's metrics, read through the checkpoint's
    # verifier) is below 0.8 is flagged with how many trials used it; a strong one is not; one whose manifest
    # cannot be verified is named with the reason instead of being trusted.
    path, config = experiment(tmp_path, demo_rows())
    save_teacher_auc(config, "cnn", 0.97)
    save_teacher_auc(config, "wav2vec2", 0.67)
    lines = result_block(demo_rows(), config, experiment=str(path)).splitlines()
    assert "  WEAK TEACHER wav2vec2: validation AUC 0.670 < 0.8, used by 3 of 6 trials" in lines
    assert not [line for line in lines if "cnn:" in line or "TEACHER cnn" in line]
    (tmp_path / "teachers" / "cnn" / "model.safetensors").write_bytes(b"altered")
    lines = result_block(demo_rows(), config, experiment=str(path)).splitlines()
    assert any(line.startswith("  teacher cnn: validation AUC not read: checkpoint ") for line in lines), lines
    assert max(map(len, lines)) <= CONSOLE_COLUMNS


def card(path: Path, trial: str) -> Path:
    """model.onnx's card with the fields detection checks and the source export records (the ONNX file is not read)."""
    write_json(path.parent, path.with_suffix(".json").name, {
        "format": "kd_tune.onnx/1", "onnx_sha256": "0" * 64, "sample_rate": 16000, "window_samples": 16000,
        "hop_samples": 1600, "threshold": 0.5, "refractory_seconds": 1.0, "source": {"trial": trial}})
    return path


def test_result_block_names_the_exported_model_and_the_trial_it_holds(tmp_path):
    # Rule: with an exported model (the demo's), the block names its path and the trial its card says it holds,
    # says so when that is not the leaderboard's first (export ranks the verified checkpoints), and the next
    # commands run that model instead of exporting one.
    rows = demo_rows()
    path, config = experiment(tmp_path, rows)
    model = card(tmp_path / "model.onnx", "00ab59af")
    lines = result_block(rows, config, experiment=str(path), model=str(model)).splitlines()
    assert f"  model: {model}" in lines and "    exported from trial 00ab59af" in lines
    assert f"  kd-tune eval {model} {tmp_path / 'data'} --conditions default" in lines
    assert f"  kd-tune detect {model} FILE.wav" in lines and not [line for line in lines if "kd-tune export" in line]
    card(model, "01ab59af")
    lines = result_block(rows, config, experiment=str(path), model=str(model)).splitlines()
    assert "    exported from trial 01ab59af (not 00ab59af: export ranks the verified checkpoints)" in lines
