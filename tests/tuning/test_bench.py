"""`kd-tune bench` at a tiny size: every figure is reported and positive. Figures only, never timing assertions."""

import json
import math
import os
import subprocess
import sys

import pytest

from kd_tune.config import validate
from kd_tune.tuning.bench import format_report, run_bench

FIELDS = {
    "machine": ("cpus", "torch_threads", "device", "python", "torch", "load_average_1m", "load_average_1m_after"),
    "cache_vs_live": ("teacher", "teacher_parameters", "clips", "views", "live_epoch_s", "cache_epoch_s", "speedup",
                      "live_steps_s", "cache_steps_s", "steps_speedup", "cache_build_s",
                      "cache_validation_share", "cache_shards",
                      "break_even_epochs", "live_student_loss",
                      "live_distillation_loss", "live_total_loss", "cache_student_loss", "cache_distillation_loss",
                      "cache_total_loss", "max_loss_difference"),
    "ray_vs_plain": ("threads", "ray_init_s", "plain_epoch_s", "ray_epoch_s", "epoch_ratio", "plain_steps_s",
                     "ray_steps_s", "plain_first_report_s", "empty_trial_start_s", "kd_tune_poll_s",
                     "kd_tune_trial_start_s", "kd_tune_first_report_s", "kd_tune_trial_total_s", "ray_default_poll_s",
                     "ray_default_trial_start_s", "ray_default_first_report_s", "ray_default_trial_total_s"),
    "pipeline": ("clips", "threads", "augment_samples_per_s", "features_samples_per_s", "pipeline_samples_per_s"),
    "onnx": ("student", "student_parameters", "onnx_bytes", "stream_onnx_bytes", "threads", "ms_per_window", "hop_ms",
             "ms_per_hop", "windowed_cpu_ms_per_audio_s", "streaming_cpu_ms_per_audio_s", "streaming_speedup"),
}
MAY_BE_ZERO = {"load_average_1m", "load_average_1m_after", "max_loss_difference"}


def check_figures(report: dict, parts: dict) -> None:
    assert {part: tuple(figures) for part, figures in report.items()} == parts
    for part, fields in parts.items():
        for field in fields:
            value = report[part][field]
            if isinstance(value, (int, float)):
                assert math.isfinite(value) and (value >= 0 if field in MAY_BE_ZERO else value > 0), (part, field)
    assert report["cache_vs_live"]["max_loss_difference"] < 1e-5
    assert report["cache_vs_live"]["cache_validation_share"] < 1  # validation is one part of an epoch


def test_bench_reports_every_figure(small_dataset, tmp_path):
    # Rule: the bench reports every figure of its parts, numbers finite and positive, in its table too, and the
    # cached and live teachers' losses are equal.
    config = validate({"data": {"root": str(small_dataset)}, "augment": {"enabled": True, "views": 2},
                       "training": {"batch_size": 16, "device": "cpu"}, "storage": {"root": str(tmp_path)}})
    report = run_bench(config, clips=32, teacher_source="tiny", with_ray=False)
    parts = {part: fields for part, fields in FIELDS.items() if part != "ray_vs_plain"}
    check_figures(report, parts)
    table = format_report(report)
    assert all(field in table for fields in parts.values() for field in fields)


@pytest.mark.slow
def test_bench_json_with_ray_is_clean_json_on_stdout(small_dataset, tmp_path):
    # Rule: `kd-tune bench --json` prints nothing but the JSON report on stdout, Ray Train part included, even though
    # the trial's workers print (Ray forwards worker output to the driver's stdout unless told not to). It takes
    # ~2.5 min on a quiet 2-core machine and over 10 beside two trainings, hence the generous guard.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "kd_tune", "bench", "--json", "--clips", "32", "--teacher-source",
                          "tiny", "--set", f"data.root={small_dataset}", "--set", "augment.enabled=true", "--set",
                          "augment.views=2", "--set", "training.batch_size=16", "--set", "training.device=cpu", "--set",
                          f"storage.root={tmp_path}"], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-5000:]
    check_figures(json.loads(out.stdout), FIELDS)
