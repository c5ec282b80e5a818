"""kd_tune.plots: the sweep's and the exported model's PNGs, and the study rebuilt from a leaderboard."""

import matplotlib.image
import pytest

from kd_tune import plots
from kd_tune.space import load_search_space

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows(n: int) -> list[dict]:
    """Leaderboard rows, best first, with the effective values every row carries."""
    teachers, schedules = ["cnn", "wav2vec2"], ["constant", "linear"]
    out = [{"trial": f"t{i}", "teacher": teachers[i % 2], "alpha_schedule": schedules[(i // 2) % 2],
            "alpha_start": 0.2 + 0.1 * i, "alpha_end": 0.2 + 0.1 * i if i % 4 < 2 else 0.8, "temperature": 1.0 + i,
            "temperature_end": 1.0 + i, "frr_at_target_fa": 0.1 * i} for i in range(n)]
    return sorted(out, key=lambda r: r["frr_at_target_fa"])


def is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE and matplotlib.image.imread(path).ndim == 3


def test_study_from_rows_holds_one_trial_per_row_with_effective_values():
    # Rule: the rebuilt study has every row with a metric as a finished trial, its effective alpha_end included
    # (a constant schedule's alpha_end equals alpha_start, inside the widened range).
    study = plots.study_from_rows(rows(6) + [{"trial": "x", "teacher": "cnn"}], load_search_space("smoke"),
                                  metric="frr_at_target_fa", mode="min")
    assert len(study.trials) == 6 and study.best_value == 0.0
    assert {t.params["alpha_end"] for t in study.trials} >= {0.2, 0.8}


def test_sweep_plots_are_valid_pngs(tmp_path):
    # Rule: history, importances and the per-teacher-and-schedule plot are written as readable PNGs.
    study = plots.study_from_rows(rows(6), load_search_space("smoke"), metric="frr_at_target_fa", mode="min")
    written = [plots.optimization_history(study, tmp_path / "history.png"),
               plots.param_importances(study, tmp_path / "importances.png"),
               plots.metric_by_teacher_schedule(rows(6), tmp_path / "by_teacher.png", metric="frr_at_target_fa")]
    assert all(is_png(path) for path in written)
    assert not list(tmp_path.glob(".*.partial"))


def test_importances_need_two_different_results(tmp_path):
    # Rule: with fewer than two trials (or one value throughout) there is nothing to rank: no file, no error.
    study = plots.study_from_rows(rows(1), load_search_space("smoke"), metric="frr_at_target_fa", mode="min")
    assert plots.param_importances(study, tmp_path / "importances.png") is None
    assert not (tmp_path / "importances.png").exists()


@pytest.mark.parametrize("with_point", [True, False])
def test_det_curve_is_a_valid_png(tmp_path, with_point):
    # Rule: the DET curve plots FRR against FA/h (0 FA/h included) and marks the operating point when given.
    points = [{"threshold": t / 10, "frr": t / 10, "fa_per_hour": 100.0 / (t + 1) - 100.0 / 11} for t in range(11)]
    point = {"threshold": 0.5, "frr": 0.5, "fa_per_hour": 3.0} if with_point else None
    assert is_png(plots.det_curve(points, tmp_path / "det.png", operating_point=point))
