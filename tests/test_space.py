"""kd_tune.space: search spaces validated from YAML, sampled define-by-run, mapped onto one config per trial."""

from importlib import resources

import pytest
import yaml

from kd_tune.config import ConfigError, load_config
from kd_tune.space import SpaceSampler, builtin_spaces, load_search_space, trial_config, trial_dirname, trial_id_of


# The embedded default holds the teachers that earned a place (cnn alone); these tests also map a tiny wav2vec2.
TWO_TEACHERS = ["teachers=[{name: cnn, arch: cnn}, {name: wav2vec2, arch: wav2vec2, source: tiny, epochs: 1}]"]


@pytest.mark.parametrize("name", builtin_spaces())
def test_every_builtin_search_space_is_valid(name):
    # Rule: every built-in space resolves by name, validates and names only configured teachers of the default.
    space = load_search_space(name)
    space.check_teachers(load_config(None, check_paths=False), source=name)


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s["temperature"].update(low=0.0), "temperature"),
    (lambda s: s["alpha_schedule"].update(choices=["exponential"]), "alpha_schedule"),
    (lambda s: s["alpha_start"].update(high=1.5), "alpha_start"),
    (lambda s: s.update(learning_rate={"low": 1e-3, "high": 1e-2}), "learning_rate"),
    (lambda s: s.pop("teacher"), "teacher"),
    (lambda s: s["lr"].update(low=0.1, high=0.01), "lr"),
    (lambda s: s.pop("temperature_end"), "temperature_end: required"),  # was an AttributeError in the sampler
])
def test_invalid_search_space_names_the_key(tmp_path, edit, needle):
    # Rule: an invalid space is a clear error naming the key.
    raw = yaml.safe_load(resources.files("kd_tune").joinpath("search_spaces", "default.yaml").read_text())
    edit(raw)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_search_space(path)
    assert needle in str(e.value)


def test_unconfigured_teacher_in_space_is_refused():
    # Rule: the teacher choices must be configured teachers.
    space = load_search_space("smoke")
    space = space.model_copy(update={"teacher": space.teacher.model_copy(update={"choices": ["cnn", "wav2vec2"]})})
    config = load_config(None, overrides=["teachers=[{name: cnn, arch: cnn}]", "distillation.teachers=[cnn]"],
                         check_paths=False)
    with pytest.raises(ConfigError, match="wav2vec2"):
        space.check_teachers(config, source="smoke")


def test_define_by_run_samples_conditional_parameters_only_where_used():
    # Rule: alpha_end is sampled only for non-constant schedules, alpha_step_point only for `step`.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampler = SpaceSampler(load_search_space("default"))
    for _ in range(40):
        trial = study.ask()
        sampler(trial)
        study.tell(trial, 0.0)
        params = trial.params
        assert ("alpha_end" in params) == (params["alpha_schedule"] != "constant")
        assert ("alpha_step_point" in params) == (params["alpha_schedule"] == "step")
        assert ("temperature_end" in params) == (params["temperature_schedule"] != "constant")


def test_trial_config_maps_parameters_onto_the_config():
    # Rule: each searched parameter lands in its config field; a constant schedule keeps alpha_end = alpha_start.
    base = load_config(None, overrides=TWO_TEACHERS, check_paths=False)
    config = trial_config(base, {"teacher": "wav2vec2", "alpha_schedule": "constant", "alpha_start": 0.3,
                                 "temperature": 7.5, "student_width": 0.5})
    d = config.distillation
    assert d.teachers == ["wav2vec2"] and d.alpha_start == d.alpha_end == 0.3
    assert d.temperature_start == d.temperature_end == 7.5 and config.student.width == 0.5
    stepped = trial_config(base, {"teacher": "cnn", "alpha_schedule": "step", "alpha_start": 0.1, "alpha_end": 0.9,
                                  "alpha_step_point": 0.4, "temperature": 2.0})
    assert stepped.distillation.alpha_step_points == (0.4,) and stepped.distillation.alpha_end == 0.9


def test_a_teacher_choice_joined_by_plus_is_an_ensemble():
    # Rule: a choice "cnn+wav2vec2" distils from both configured teachers at once; one unknown member refuses it,
    # and its trial folder carries "-" instead of "+" (some S3 clients read "+" in a key as a space).
    base = load_config(None, overrides=TWO_TEACHERS, check_paths=False)
    config = trial_config(base, {"teacher": "cnn+wav2vec2", "alpha_schedule": "constant", "alpha_start": 0.5,
                                 "temperature": 2.0})
    assert config.distillation.teachers == ["cnn", "wav2vec2"]
    space = load_search_space("default")
    space.model_copy(update={"teacher": space.teacher.model_copy(update={"choices": ["cnn+wav2vec2"]})}) \
        .check_teachers(base, source="space")
    with pytest.raises(ConfigError, match="cnn\\+nope"):
        space.model_copy(update={"teacher": space.teacher.model_copy(update={"choices": ["cnn+nope"]})}) \
            .check_teachers(base, source="space")
    assert trial_dirname("1a2b3c4d", {"teacher": "cnn+wav2vec2", "alpha_schedule": "step"}) \
        == "trial_1a2b3c4d_cnn-wav2vec2_step"
    # the teachers a sweep must find fine-tuned and cache: each member of an ensemble, once
    both = space.model_copy(update={"teacher": space.teacher.model_copy(update={"choices": ["cnn", "cnn+wav2vec2"]})})
    assert both.teacher_names == ["cnn", "wav2vec2"]


def test_a_trial_folder_gives_its_id_back():
    # Rule: one pair names a trial's folder and reads its id back (the leaderboard, plots, export and the sweep's
    # error lines all use trial_id_of), from the folder's name or a path ending in it.
    name = trial_dirname("1a2b3c4d", {"teacher": "cnn+wav2vec2", "alpha_schedule": "linear"})
    assert name == "trial_1a2b3c4d_cnn-wav2vec2_linear"
    assert trial_id_of(name) == trial_id_of(f"runs/sweep/{name}") == "1a2b3c4d"
