"""kd_tune.teachers: a teacher's source, its stored checkpoint, and whether it is current."""

import pytest
import torch

from kd_tune.checkpoint import CheckpointError
from kd_tune.config import TeacherConfig, load_config
from kd_tune.models import build_teacher
from kd_tune.teachers import initial_teacher, load_teacher, save_teacher, teacher_is_current


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
    # set, other teacher settings or another augmentation make it stale, the straddle windows and the student's
    # settings do not (a teacher never trains on them).
    from kd_tune.data import load_dataset

    config = load_config(None, overrides=[f"data.root={small_dataset}", f"storage.root={tmp_path}",
                                          "teachers=[{name: cnn, arch: cnn, source: tiny}]"])
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
