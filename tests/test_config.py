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
    ("distillation", "teacher_hears", "noisy", "distillation.teacher_hears"),
    ("student", "name", "resnet152", "student.name"),
    ("training", "epochs", 0, "training.epochs"),
    ("training", "epochs", "ten", "training.epochs"),
    ("training", "lr", "fast", "training.lr"),
    ("training", "batch_size", -4, "training.batch_size"),
    ("augment", "noise_prob", 2.0, "augment.noise_prob"),
    ("data", "synth_train_hours", 0, "data.synth_train_hours"),
    ("data", "synth_train_hours", 25.0, "data.synth_train_hours"),
    ("training", "long_hours_per_epoch", 0, "training.long_hours_per_epoch"),
    ("training", "long_hours_per_epoch", 25.0, "training.long_hours_per_epoch"),
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


@pytest.mark.parametrize("dotted,value", [
    ("training.lr", ".inf"), ("training.lr", ".nan"), ("training.grad_clip_norm", ".inf"),
    ("training.weight_decay", ".inf"), ("distillation.temperature_start", ".inf"),
    ("distillation.temperature_end", ".nan"), ("distillation.alpha_step_points", "[.nan]"),
    ("teachers.0.lr", ".inf"), ("data.hard_negative_weight", ".inf"), ("tune.cpus_per_worker", ".inf"),
    ("training.target_fa_per_hour", ".inf"), ("training.refractory_seconds", ".inf"),
])
def test_non_finite_floats_are_refused(dotted, value):
    # Rule: every float field is finite: .inf and .nan are refused with the field named.
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides=[f"{dotted}={value}"], check_paths=False)
    [problem] = caught.value.problems
    assert problem.startswith(dotted) and "finite number" in problem


@pytest.mark.parametrize("dotted,value", [
    ("training.epochs", 10**29), ("training.seed", 2**40), ("tune.seed", -1), ("data.synth_seed", 2**31),
    ("training.batch_size", 10**9), ("teachers.0.epochs", 10**6), ("teachers.0.batch_size", 10**5),
    ("tune.num_samples", 10**6), ("augment.views", 10**4), ("tune.workers_per_trial", 10**5),
    ("tune.max_concurrent_trials", 10**5), ("tune.max_failures", 10**4), ("storage.keep_best", 10**6),
])
def test_counts_have_upper_bounds(dotted, value):
    # Rule: a value that counts something has an upper bound, so a typo (1e29 epochs) is refused, not run.
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides=[f"{dotted}={value}"], check_paths=False)
    assert any(p.startswith(dotted) for p in caught.value.problems), caught.value.problems


def test_a_huge_bad_value_is_shown_cut_short():
    # Rule: a message never echoes a huge value: the repr of a bad value is cut to ~80 characters.
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides=["training.epochs=" + "9" * 4000, "student.name=" + "x" * 200_000],
                    check_paths=False)
    message = str(caught.value)
    assert len(message) < 600 and "training.epochs" in message and "student.name" in message


def test_several_problems_are_one_line():
    # Rule: every problem of a file is reported at once, on one line.
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides=["training.epochs=0", "distillation.alpha_start=2"], check_paths=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("<embedded default.yaml>: 2 problems: ")
    assert " | " in message and "training.epochs" in message and "distillation.alpha_start" in message


@pytest.mark.parametrize("override,needle", [
    ("training.epochs=[", "--set training.epochs: not valid YAML (did not find expected node content)"),
    ("data.root.x=1", "--set data.root.x: data.root holds '"),
    ("teachers.7.name=x", "--set teachers.7.name: teachers.7: not an entry of the 1-entry list teachers; "
                          "allowed: an index from 0 to 0"),
    ("teachers.x.name=x", "--set teachers.x.name: teachers.x: not an entry"),
    ("training.epochs", "--set: 'training.epochs' has no key"),
    ("training.epochs=*a", "--set training.epochs: line 1: alias *a refers to a value that is not complete"),
])
def test_a_bad_set_is_one_config_error(override, needle):
    # Rule: a --set that cannot be parsed or applied is one ConfigError naming the override, not a traceback.
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides=[override], check_paths=False)
    assert str(caught.value).startswith(needle), str(caught.value)


def test_set_reaches_list_entries_by_index():
    # Rule: `--set teachers.0.name=x` sets a field of one list entry, validated like any other value.
    config = load_config(None, overrides=["teachers.0.name=x", "teachers.0.epochs=5",
                                          "distillation.alpha_step_points.0=0.3"], check_paths=False)
    assert [t.name for t in config.teachers] == ["x"] and config.teachers[0].epochs == 5
    assert config.distillation.alpha_step_points == (0.3,)
    with pytest.raises(ConfigError, match="teachers.0.name: String should match pattern"):
        load_config(None, overrides=["teachers.0.name=X Y"], check_paths=False)


@pytest.mark.parametrize("field,uri", [
    ("storage.root", "s3://user:pw@bucket/runs"),
    ("storage.root", "s3://AKIAXXXX:s3cr3t@bucket"),
    ("storage.root", "s3://bucket/runs?region=us-east-1&secret_key=s3cr3t"),
    ("storage.root", "gs://bucket/x?access_token=s3cr3t"),
    ("storage.endpoint_override", "http://minio:s3cr3t@127.0.0.1:9000"),
])
def test_credentials_in_any_uri_form_are_refused_without_echo(field, uri):
    # Rule: secrets never live in configs: a user name, password or key in a storage URI is refused at validation,
    # naming the field and never echoing the secret.
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides=[f"{field}={uri}"], check_paths=False)
    message = str(caught.value)
    assert message.startswith(f"<embedded default.yaml>: {field}: credentials in a URI are refused")
    assert "s3cr3t" not in message and "pw" not in message


def test_plain_storage_uris_still_pass():
    # Rule: the credential check refuses secrets only: ordinary local paths and URIs load.
    for uri in ("s3://bucket/runs", "s3://bucket/runs?region=eu-west-1", "/mnt/nfs/kd@tune", "runs/monkey=1"):
        assert load_config(None, overrides=[f"storage.root={uri}"], check_paths=False).storage.root.endswith(
            uri.split("/")[-1])
