"""kd_tune.evaluation.robustness (`kd-tune eval --conditions`): figures with known answers from a hand-built model."""

import json

import pytest
from test_heldout import peak_model  # a model whose every answer can be worked out by hand

from kd_tune.cli import main


def test_levels_change_what_a_peak_detector_finds_as_worked_out_by_hand(folder, tmp_path, capsys):
    # Rule: each condition is applied to the positives and the long audio alike, and scored at the model's threshold.
    # The model's probability is the window's peak, its threshold 0.5: at -3 dBFS every positive peaks at 0.71 and is
    # found; at -45 dBFS none is, and the long audio's bursts (peaks 0.95 at 5, 25, 45 s) no longer fire either.
    model = peak_model(tmp_path / "peak.onnx")
    out = tmp_path / "out"
    assert main(["eval", str(model), str(folder), "--out", str(out),
                 "--conditions", "clean,level_-3dBFS,level_-45dBFS"]) == 0
    report = json.loads((out / "conditions.json").read_text())
    rows = {r["condition"]: r for r in report["scorers"]["model"]}
    assert report["conditions"] == ["clean", "level_-3dBFS", "level_-45dBFS"]
    assert rows["clean"]["frr"] == pytest.approx(0.25) and rows["clean"]["fa_per_hour"] == pytest.approx(180.0)
    assert rows["level_-3dBFS"]["frr"] == 0.0
    assert rows["level_-45dBFS"]["frr"] == 1.0 and rows["level_-45dBFS"]["fa_per_hour"] == 0.0
    table = (out / "conditions.md").read_text()
    assert "| level_-45dBFS | 1.000 | 0.00 |" in table and (out / "conditions.png").stat().st_size > 0
    assert "model: FRR at 1 FA/h, mean per group: clean" in capsys.readouterr().out


def test_a_bad_grid_or_noise_folder_is_one_line(folder, tmp_path, capsys):
    # Rule: --conditions and --noise mistakes are one line naming the option and what is allowed, exit 2.
    model = peak_model(tmp_path / "peak.onnx")
    assert main(["eval", str(model), str(folder), "--out", str(tmp_path / "o"), "--conditions", "nosuch"]) == 2
    assert "--conditions 'nosuch': unknown" in capsys.readouterr().err
    assert main(["eval", str(model), str(folder), "--out", str(tmp_path / "o"), "--conditions", "clean",
                 "--noise", "fan"]) == 2
    assert "--noise 'fan': not NAME=FOLDER" in capsys.readouterr().err
