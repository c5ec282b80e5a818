"""evaluation.compare (`kd-tune compare`): alpha = 0 against KD, over seeds, measured on the held-out test split."""

import json
import statistics

import pytest
import yaml

from kd_tune.cli import main
from kd_tune.config import dump_config, load_config
from kd_tune.evaluation.compare import COLUMNS, GRID_COLUMNS, NO_KD, arms_of, spread, table


def test_arms_are_alpha_zero_then_each_teacher_or_ensemble():
    # Rule: the first arm turns the teacher signal off (alpha 0 throughout); every other arm keeps the config's own
    # schedule and distils from one teacher or a "+"-joined ensemble.
    config = load_config(None, check_paths=False)
    arms = arms_of(config, ["cnn", "cnn+wav2vec2"])
    assert [a.name for a in arms] == [NO_KD, "KD cnn", "KD cnn+wav2vec2"]
    assert arms[0].changes["distillation.alpha_start"] == arms[0].changes["distillation.alpha_end"] == 0
    assert arms[2].changes == {"distillation.teachers": ["cnn", "wav2vec2"]} and arms[2].slug == "KD_cnn-wav2vec2"


def test_the_table_gives_mean_and_spread_over_seeds():
    # Rule: each arm's cell is the mean ± sample standard deviation of its seeds (the mean alone for one seed).
    rows = [{"arm": arm, "seed": seed, **{key: value + seed / 10 for _, key in COLUMNS}}
            for arm, value in ((NO_KD, 0.5), ("KD cnn", 0.2)) for seed in range(3)]
    lines = table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith(f"| {NO_KD} | 3 | 0.600 ± 0.100 |")
    assert lines[3].startswith("| KD cnn | 3 | 0.300 ± 0.100 |")
    assert spread([0.25]) == "0.250" and spread([None]) == "n/a"


def test_with_conditions_the_table_adds_the_grids_group_means():
    # Rule: with --conditions every run is also measured on the grid, and the table adds its mean FRR at 1 FA/h over
    # the grid and per group, as mean ± spread; without, the table is as it was.
    grid = {key: 0.1 for _, key in GRID_COLUMNS}
    rows = [{"arm": NO_KD, "seed": s, **{key: 0.5 for _, key in COLUMNS}, **grid} for s in range(2)]
    head = table(rows).splitlines()[0]
    assert head.endswith("| grid FRR @ 1 FA/h | clean | noise 10 dB | noise 0 dB | rooms | levels | mics |")
    assert table(rows).splitlines()[2].endswith("| 0.100 ± 0.000 |")
    assert "grid" not in table([{k: v for k, v in r.items() if k not in grid} for r in rows])


@pytest.mark.slow
def test_compare_trains_exports_and_evaluates_every_arm_at_every_seed(tmp_path, small_dataset, monkeypatch,
                                                                         capsys):
    # Rule: `kd-tune compare` runs each arm at each seed at equal budget (same epochs, data, student), exports its
    # best epoch and measures it on the test split; the rows, the table and each run's saved config agree. With
    # --best-of it takes a trained run's whole setting, needs nothing of the embedded default (no data.root), and
    # --set changes that setting (a lever measured on the best trial), never silently ignored.
    config = load_config(None, overrides=[
        f"data.root={small_dataset}", f"storage.root={tmp_path / 'runs'}",
        "teachers=[{name: cnn, arch: cnn, source: tiny, epochs: 1}]", "training.epochs=2", "training.batch_size=8",
        "training.device=cpu", "augment.enabled=false", "distillation.alpha_start=0.7",
        "distillation.alpha_end=0.7"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert main(["teacher", "train", str(path)]) == 0
    assert main(["compare", str(path), "--seeds", "2", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [(r["arm"], r["seed"]) for r in rows] == [(NO_KD, 0), ("KD cnn", 0), (NO_KD, 1), ("KD cnn", 1)]
    for row in rows:
        saved = yaml.safe_load((tmp_path / "runs" / "compare" / f"{row['arm'].replace('=', '').replace(' ', '_')}"
                                f"_seed{row['seed']}" / "config.yaml").read_text())
        assert saved["training"]["seed"] == row["seed"] and saved["training"]["epochs"] == 2
        assert saved["distillation"]["alpha_start"] == (0.0 if row["arm"] == NO_KD else 0.7)
        assert all(row[k] is None or 0 <= row[k] <= 1 for k in ("val_frr", "test_frr", "test_auc", "test_frr_at_2"))
        assert row["best_epoch"] in (1, 2) and row["test_hours"] > 0
    markdown = (tmp_path / "out" / "compare.md").read_text()
    no_kd = [r["test_frr_at_2"] for r in rows if r["arm"] == NO_KD]
    assert f"| {NO_KD} | 2 | {statistics.fmean(no_kd):.3f} ± {statistics.stdev(no_kd):.3f} |" in markdown
    monkeypatch.chdir(tmp_path)  # the default's data/hey_nova does not exist here
    best = tmp_path / "runs" / "compare" / "KD_cnn_seed0" / "checkpoints" / f"epoch_{rows[1]['best_epoch']:04d}"
    assert main(["compare", "--best-of", str(best), "--seeds", "1", "--name", "again", "--out", "again",
                 "--set", "training.epochs=1"]) == 0
    again = json.loads((tmp_path / "again" / "compare.json").read_text())
    assert [r["arm"] for r in again] == [NO_KD, "KD cnn"]
    saved = yaml.safe_load((tmp_path / "runs" / "again" / "KD_cnn_seed0" / "config.yaml").read_text())
    assert saved["distillation"]["alpha_start"] == 0.7 and saved["training"]["epochs"] == 1
    # A --set the trial's setting refuses is the trial's error (exit 2, one line), not the embedded default's.
    capsys.readouterr()
    assert main(["compare", "--best-of", str(best), "--set", "training.epochs=0"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{best}'s best trial" in error and "training.epochs" in error
