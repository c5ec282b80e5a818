"""`kd-tune bench` at a tiny size: every figure is reported and positive. Figures only, never timing assertions."""

import math

import pytest

from kd_tune.bench import format_report, run_bench
from kd_tune.config import validate


FIELDS = {
    "machine": ("cpus", "torch_threads", "device", "python", "torch", "load_average_1m", "load_average_1m_after"),
    "cache_vs_live": ("teacher", "teacher_parameters", "clips", "views", "live_epoch_s", "cache_epoch_s", "speedup",
                      "live_steps_s", "cache_steps_s", "steps_speedup", "cache_build_s", "cache_shards", "break_even_epochs", "live_student_loss",
                      "live_distillation_loss", "live_total_loss", "cache_student_loss", "cache_distillation_loss",
                      "cache_total_loss", "max_loss_difference"),
    "ray_vs_plain": ("threads", "ray_init_s", "plain_epoch_s", "ray_epoch_s", "epoch_ratio", "plain_steps_s",
                     "ray_steps_s", "plain_first_report_s", "kd_tune_poll_s", "kd_tune_trial_start_s",
                     "kd_tune_first_report_s", "kd_tune_trial_total_s", "ray_default_poll_s",
                     "ray_default_trial_start_s", "ray_default_first_report_s", "ray_default_trial_total_s"),
    "pipeline": ("clips", "threads", "augment_samples_per_s", "features_samples_per_s", "pipeline_samples_per_s"),
    "onnx": ("student", "student_parameters", "onnx_bytes", "threads", "ms_per_window"),
}
MAY_BE_ZERO = {"load_average_1m", "load_average_1m_after", "max_loss_difference"}


@pytest.mark.parametrize("with_ray", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["no_ray", "ray"])
def test_bench_reports_every_figure(small_dataset, tmp_path, monkeypatch, with_ray):
    # Rule: the bench reports every figure of its parts (Ray Train's too when asked), numbers finite and positive,
    # and the cached and live teachers' losses equal.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "unset")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")  # connect_ray sets it for its own Ray; undone after the test
    config = validate({"data": {"root": str(small_dataset)}, "augment": {"views": 2},
                       "training": {"batch_size": 16, "device": "cpu"}, "storage": {"root": str(tmp_path)}})
    report = run_bench(config, clips=32, teacher_source="tiny", with_ray=with_ray)
    parts = {part: fields for part, fields in FIELDS.items() if with_ray or part != "ray_vs_plain"}
    assert {part: tuple(figures) for part, figures in report.items()} == parts
    for part, fields in parts.items():
        for field in fields:
            value = report[part][field]
            if isinstance(value, (int, float)):
                assert math.isfinite(value) and (value >= 0 if field in MAY_BE_ZERO else value > 0), (part, field)
    assert report["cache_vs_live"]["max_loss_difference"] < 1e-5
    table = format_report(report)
    assert all(field in table for fields in parts.values() for field in fields)
