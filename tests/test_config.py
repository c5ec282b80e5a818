import subprocess
import sys

import pytest
import yaml

from kd_tune.config import ConfigError, default_raw, dump_config, load_config, validate


def write(tmp_path, raw) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def problems_of(tmp_path, raw, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, raw), **kwargs)
    return e.value.problems


def test_embedded_default_is_valid():
    # Rule: the embedded default validates (without a data directory) and names every section.
    config = load_config(None, check_paths=False)
    assert config.student.name == "tc_resnet" and config.teachers[0].name == "cnn"
    assert set(config.to_dict()) == {"data", "features", "augment", "student", "teachers", "distillation",
                                     "training", "tune", "storage"}


def test_save_then_load_gives_the_same_config(tmp_path):
    # Rule: a dumped config (what every run saves as config.yaml) loads back to an equal config.
    config = load_config(None, overrides=["training.epochs=3", "distillation.alpha_schedule=cosine"],
                         check_paths=False)
    (tmp_path / "saved.yaml").write_text(dump_config(config))
    assert load_config(tmp_path / "saved.yaml", check_paths=False) == config


@pytest.mark.parametrize("section,key,value,needle", [
    ("distillation", "alpha_start", 1.5, "distillation.alpha_start"),
    ("distillation", "alpha_end", -0.1, "distillation.alpha_end"),
    ("distillation", "temperature_start", 0.0, "distillation.temperature_start"),
    ("distillation", "temperature_end", -2.0, "distillation.temperature_end"),
    ("distillation", "alpha_schedule", "exponential", "distillation.alpha_schedule"),
    ("student", "name", "resnet152", "student.name"),
    ("training", "epochs", 0, "training.epochs"),
    ("training", "epochs", "ten", "training.epochs"),
    ("training", "lr", "fast", "training.lr"),
    ("training", "batch_size", -4, "training.batch_size"),
    ("augment", "noise_prob", 2.0, "augment.noise_prob"),
])
def test_each_bad_value_names_its_field_and_value(tmp_path, section, key, value, needle):
    # Rule: an invalid value is reported with its dotted path and the bad value.
    raw = default_raw()
    raw[section][key] = value
    [problem] = problems_of(tmp_path, raw, check_paths=False)
    assert problem.startswith(needle) and repr(value) in problem


def test_unknown_teacher_arch_lists_the_known_ones(tmp_path):
    # Rule: an unknown registry name lists what is allowed.
    raw = default_raw()
    raw["teachers"][0]["arch"] = "conformer_xxl"
    [problem] = problems_of(tmp_path, raw, check_paths=False)
    assert problem.startswith("teachers.0.arch") and "wav2vec2" in problem and "'conformer_xxl'" in problem


def test_unknown_keys_and_all_problems_at_once(tmp_path):
    # Rule: unknown keys are refused, and every problem in a file is reported together.
    raw = default_raw()
    raw["training"]["epoch"] = 3
    raw["surprise"] = {}
    raw["distillation"]["alpha_start"] = 7
    problems = problems_of(tmp_path, raw, check_paths=False)
    assert len(problems) == 3
    assert any(p.startswith("training.epoch: unknown key") for p in problems)
    assert any(p.startswith("surprise: unknown key") for p in problems)


def test_missing_data_directory_is_reported(tmp_path):
    # Rule: a data directory that does not exist is a load-time error naming the field and the path.
    raw = default_raw()
    raw["data"]["root"] = str(tmp_path / "nowhere")
    [problem] = problems_of(tmp_path, raw)
    assert problem.startswith("data.root") and "nowhere" in problem


def test_distillation_teachers_must_be_configured(tmp_path):
    # Rule: distillation.teachers may only name configured teachers.
    raw = default_raw()
    raw["distillation"]["teachers"] = ["cnn", "hubert_big"]
    [problem] = problems_of(tmp_path, raw, check_paths=False)
    assert "hubert_big" in problem and "'cnn'" in problem


def test_credentials_in_storage_uri_are_refused():
    # Rule: secrets never live in configs.
    raw = default_raw()
    raw["storage"]["root"] = "s3://bucket/x?access_key=AKIA&secret_key=abc"
    with pytest.raises(ConfigError, match="storage.root"):
        validate(raw)


def test_yaml_is_loaded_safely(tmp_path):
    # Rule: yaml.safe_load only: a Python object tag is refused, never constructed.
    path = tmp_path / "evil.yaml"
    path.write_text("training: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_cli_config_check_exits_2_with_the_problems(tmp_path):
    # Rule: `kd-tune config check` exits 2 and lists every problem; a valid file exits 0.
    raw = default_raw()
    raw["distillation"]["alpha_start"] = 3
    bad = write(tmp_path, raw)
    out = subprocess.run([sys.executable, "-m", "kd_tune", "config", "check", bad, "--no-path-check"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "distillation.alpha_start" in out.stderr
    good = tmp_path / "good.yaml"
    good.write_text(dump_config(load_config(None, check_paths=False)))
    out = subprocess.run([sys.executable, "-m", "kd_tune", "config", "check", str(good), "--no-path-check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_cli_config_show_prints_the_default():
    # Rule: `kd-tune config show` prints the embedded default as loadable YAML.
    out = subprocess.run([sys.executable, "-m", "kd_tune", "config", "show"], capture_output=True, text=True,
                         check=True)
    assert validate(yaml.safe_load(out.stdout)) == load_config(None, check_paths=False)
