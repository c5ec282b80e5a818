"""kd_tune.training.teachers: a teacher's source, its stored checkpoint, and whether it is current."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from kd_tune.config import TeacherConfig, load_config
from kd_tune.errors import InputError
from kd_tune.store.checkpoint import CheckpointError
from kd_tune.training.models import build_teacher
from kd_tune.training.teachers import (StaleTeacherError, configured_teachers, initial_teacher, load_teacher,
                                       require_current_teachers, save_teacher, stored_settings,
                                       teacher_is_current)


def test_a_pt_source_starts_fine_tuning_from_its_weights(tmp_path):
    # Rule: a `.pt` teacher source is a state dict for the "base" architecture, loaded weights-only.
    weights = build_teacher("cnn", source="base").state_dict()
    torch.save(weights, tmp_path / "cnn.pt")
    model = initial_teacher(TeacherConfig(name="cnn", arch="cnn", source=str(tmp_path / "cnn.pt")), n_mels=40)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_a_pt_source_with_a_pickle_payload_is_refused(tmp_path):
    # Rule: nothing but tensors is unpickled: a payload is refused with the file named, and never runs.
    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        initial_teacher(TeacherConfig(name="cnn", arch="cnn", source=str(tmp_path / "evil.pt")), n_mels=40)


def test_a_saved_teacher_loads_back_and_is_current(small_dataset, tmp_path):
    # Rule: save_teacher stores what load_teacher reads back and what teacher_is_current compares; another data
    # set, other teacher settings or (for a teacher that augments) another augmentation make it stale; the straddle
    # windows and the student's settings do not (a teacher never trains on them).
    from kd_tune.datasets.data import load_dataset

    config = load_config(None, overrides=[f"data.root={small_dataset}", f"storage.root={tmp_path}",
                                          "teachers=[{name: cnn, arch: cnn, source: tiny, augment: true}]"])
    teacher, data = config.teacher("cnn"), load_dataset(small_dataset)
    model = initial_teacher(teacher, n_mels=40)
    save_teacher(config, teacher, model, data)
    loaded = load_teacher(config, teacher)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert teacher_is_current(config, teacher, data)
    straddled = load_dataset(small_dataset, straddles_per_positive=2)
    assert straddled.manifest_sha256 != data.manifest_sha256 and teacher_is_current(config, teacher, straddled)
    changed = config.replace({"teachers": [{**teacher.model_dump(), "epochs": teacher.epochs + 1}]})
    assert not teacher_is_current(changed, changed.teacher("cnn"), data)
    assert not teacher_is_current(config.replace({"augment.enabled": not config.augment.enabled}), teacher, data)
    assert teacher_is_current(config.replace({"student.width": 0.5, "training.epochs": 1}), teacher, data)


def test_a_teacher_that_does_not_augment_is_stored_without_the_students_augmentation(small_dataset, tmp_path):
    # Rule: with `augment: false` a teacher is fine-tuned on the clean clips, exactly as with augmentation off, and
    # stays current whatever the augment section (then the students' alone) says.
    from kd_tune.datasets.data import load_dataset
    from kd_tune.training.train import fit_teacher

    data = load_dataset(small_dataset)
    teacher = "teachers=[{name: cnn, arch: cnn, source: tiny, epochs: 1, augment: false}]"
    weights = []
    for enabled in (True, False):
        config = load_config(None, overrides=[f"data.root={small_dataset}", f"storage.root={tmp_path / str(enabled)}",
                                              teacher, f"augment.enabled={enabled}", "training.device=cpu"])
        fit_teacher(config, config.teacher("cnn"), data=data)
        weights.append(load_teacher(config, config.teacher("cnn")).state_dict())
        changed = config.replace({"augment.enabled": not enabled, "augment.noise_prob": 0.9, "augment.views": 2})
        assert teacher_is_current(changed, changed.teacher("cnn"), data)
    assert all(torch.equal(weights[0][k], v) for k, v in weights[1].items())


def test_settings_stored_before_the_augment_setting_read_as_what_the_stored_config_did():
    # Rule: a teacher stored before `teachers[].augment` existed augmented exactly when its config's augmentation was
    # on, so an upgrade retrains no teacher that was fine-tuned on clean clips.
    old = {"name": "cnn", "arch": "cnn"}
    assert stored_settings(old, {"augment": {"enabled": False}}) == old | {"augment": False}
    assert stored_settings(old, {"augment": {"enabled": True}}) == old | {"augment": True}
    assert stored_settings(old | {"augment": True}, {"augment": {"enabled": False}}) == old | {"augment": True}
    assert stored_settings(old, {}) == old | {"augment": False}


@pytest.fixture
def stored_teacher(small_dataset, tmp_path):
    """(config, teacher, data): a tiny cnn teacher saved for the small set."""
    from kd_tune.datasets.data import load_dataset

    config = load_config(None, overrides=[f"data.root={small_dataset}", f"storage.root={tmp_path}",
                                          "teachers=[{name: cnn, arch: cnn, source: tiny}]"])
    teacher, data = config.teacher("cnn"), load_dataset(small_dataset)
    save_teacher(config, teacher, initial_teacher(teacher, n_mels=40), data)
    return config, teacher, data


def test_a_stale_teacher_is_refused_with_the_command_that_retrains_it(stored_teacher, tmp_path):
    # Rule: loading a teacher fine-tuned on other data (given the data) or with another recipe (always; for a teacher
    # that augments, another augmentation too) is refused in one line that names the teacher and the command that
    # retrains it; a current one loads.
    config, teacher, data = stored_teacher
    other = dataclasses.replace(data, labelled_sha256="0" * 64, root=Path("/data/B"))
    retrain = ("; allowed: a teacher fine-tuned with this config: retrain it with "
               "`kd-tune teacher train CONFIG --only cnn`")
    with pytest.raises(StaleTeacherError, match=f"^teacher cnn \\({tmp_path}/teachers/cnn\\): trained on other data "
                                                f"than /data/B{re.escape(retrain)}$") as error:
        load_teacher(config, teacher, other)
    assert error.value.exit_code == 2
    with pytest.raises(StaleTeacherError, match="trained on other data"):
        require_current_teachers(config, other)
    augmenting = config.replace({"teachers": [{**teacher.model_dump(), "augment": True}]})
    save_teacher(augmenting, augmenting.teacher("cnn"), initial_teacher(teacher, n_mels=40), data)
    augmented = augmenting.replace({"augment.enabled": not config.augment.enabled})
    with pytest.raises(StaleTeacherError, match="trained with other augment settings"):
        load_teacher(augmented, augmented.teacher("cnn"))
    save_teacher(config, teacher, initial_teacher(teacher, n_mels=40), data)
    longer = config.replace({"teachers": [{**teacher.model_dump(), "epochs": teacher.epochs + 1}]})
    with pytest.raises(StaleTeacherError, match="trained with other teacher settings"):
        load_teacher(longer, longer.teacher("cnn"))
    require_current_teachers(config, data)
    load_teacher(config.replace({"student.width": 0.5}), teacher, data)


def test_kd_tune_train_refuses_a_teacher_of_another_data_set(stored_teacher, small_dataset, tmp_path, capsys):
    # Rule: `kd-tune train` on set B with a teacher fine-tuned on set A stops before the first epoch, in one line,
    # exit 2, having written no run.
    from kd_tune.cli import main

    config, teacher, data = stored_teacher
    save_teacher(config, teacher, initial_teacher(teacher, n_mels=40),
                 dataclasses.replace(data, labelled_sha256="0" * 64))  # as if fine-tuned on set A
    code = main(["train", "--set", f"data.root={small_dataset}", "--set", f"storage.root={tmp_path}", "--set",
                 "teachers=[{name: cnn, arch: cnn, source: tiny}]", "--set", "training.device=cpu"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("kd-tune: teacher cnn (") and "--only cnn`" in lines[0]
    assert not (tmp_path / "train").exists()


def test_only_configured_teachers_are_named():
    # Rule: `--only` names configured teachers; another name is one line listing the configured ones (no
    # StopIteration).
    config = load_config(None, overrides=["teachers=[{name: cnn, arch: cnn}, {name: w2v, arch: wav2vec2}]"],
                         check_paths=False)
    assert [t.name for t in configured_teachers(config, None)] == ["cnn", "w2v"]
    assert [t.name for t in configured_teachers(config, ["w2v"])] == ["w2v"]
    with pytest.raises(InputError, match="^--only 'nosuch': not a configured teacher; allowed: cnn, w2v$"):
        configured_teachers(config, ["w2v", "nosuch"])
