"""kd_tune.store.checkpoint: the format, its verification (hashes, signature, identity, bounds), retention; and the
pickle refusals of kd_tune.training.teachers (legacy .pt files and Hugging Face folders)."""

import hashlib
import json
import logging
import os
import shutil
import tracemalloc

import pytest
import torch

from kd_tune.config import TeacherConfig, load_config
from kd_tune.signing import ENV_REQUIRE_SIGNATURE, ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, SigningError
from kd_tune.store.checkpoint import (FORMAT, MAX_FILE_BYTES, MAX_MANIFEST_BYTES, CheckpointError, Identity,
                                      copy_checkpoint, latest_checkpoint, load_checkpoint, load_state_dict_strict,
                                      prune_checkpoints, save_checkpoint, verify_checkpoint)
from kd_tune.store.storage import Storage
from kd_tune.training import resume
from kd_tune.training.teachers import initial_teacher, load_legacy_pt, load_teacher, save_teacher, teacher_is_current

KEY = "correct horse battery staple"


pytestmark = pytest.mark.usefixtures("no_signing_env")  # conftest: the environment's key never leaks in


def _tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    model = {"w": base.t(), "w_view": base[1], "b": torch.tensor([1.5, -2.0]), "n": torch.tensor(7),
             "half": torch.ones(2, 2, dtype=torch.bfloat16), "mask": torch.tensor([True, False])}
    return {"model": model, "optimizer": {"state.0.exp_avg": torch.zeros(3)}}


def _save(root, rel="ckpt", **overrides):
    kwargs = dict(kind="student", config={"lr": 0.01, "layers": [1, 2]}, epoch=2, step=40,
                  metrics={"val_loss": 0.25, "acc": 0.9}, trial_id="t1", extra={"seed": 3})
    kwargs.update(overrides)
    return save_checkpoint(root, rel, _tensors(), **kwargs)


def _assert_same(loaded, expected):
    assert loaded.keys() == expected.keys()
    for stem in expected:
        assert loaded[stem].keys() == expected[stem].keys()
        for name, tensor in expected[stem].items():
            assert loaded[stem][name].dtype == tensor.dtype
            assert torch.equal(loaded[stem][name], tensor)


# ---------------------------------------------------------------- local checkpoints


def test_round_trip_is_exact(tmp_path):
    # rule: save -> load returns the same tensors (views, shared storage, many dtypes) and manifest fields
    path = _save(tmp_path)
    ckpt = load_checkpoint(tmp_path, "ckpt")
    _assert_same(ckpt.tensors, _tensors())
    m = ckpt.manifest
    assert path == str(tmp_path.resolve() / "ckpt")
    assert (m["format"], m["kind"], m["epoch"], m["step"], m["trial_id"]) == (FORMAT, "student", 2, 40, "t1")
    assert m["config"] == {"lr": 0.01, "layers": [1, 2]} and m["extra"] == {"seed": 3}
    assert m["metrics"] == {"val_loss": 0.25, "acc": 0.9}
    assert set(m["files"]) == {"model.safetensors", "optimizer.safetensors"} and "signature" not in m


def test_non_finite_metrics_are_stored_as_null(tmp_path):
    # rule: the manifest is strict JSON, so NaN/inf metrics become null instead of breaking the save
    _save(tmp_path, metrics={"val_loss": float("nan"), "acc": 1.0})
    assert load_checkpoint(tmp_path, "ckpt").manifest["metrics"] == {"val_loss": None, "acc": 1.0}


def test_non_json_config_is_refused(tmp_path):
    # rule: only JSON goes into a manifest (no pickle), and the error names the field
    with pytest.raises(ValueError, match="config"):
        _save(tmp_path, config={"fn": object()})


def test_save_leaves_no_temp_dirs_and_replaces_old_checkpoint(tmp_path):
    # rule: saving is atomic: only the final dir remains, and overwriting leaves no stale files
    save_checkpoint(tmp_path, "ckpt", {"model": {"x": torch.ones(1)}, "old": {"y": torch.ones(1)}},
                    kind="trial", config={})
    _save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["manifest.json", "model.safetensors", "optimizer.safetensors"]
    _assert_same(load_checkpoint(tmp_path, "ckpt").tensors, _tensors())


def test_manifest_is_written_last_and_a_crash_leaves_nothing(tmp_path, monkeypatch):
    # rule: tensor files first, manifest last; a save interrupted at the manifest leaves no checkpoint behind
    written = []
    real_write = Storage.write_bytes

    def crash_on_manifest(self, rel, data):
        written.append(rel.rsplit("/", 1)[-1])
        if rel.endswith("manifest.json"):
            raise OSError("disk full")
        real_write(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path)
    assert written[-1] == "manifest.json" and len(written) == 3
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tamper, file", [
    ("flip", "model.safetensors"),
    ("truncate", "model.safetensors"),
    ("add", "extra.bin"),
    ("remove", "optimizer.safetensors"),
])
def test_tampered_files_are_refused(tmp_path, tamper, file):
    # rule: a flipped byte, truncation, an added or a removed file fails verification, naming the file
    _save(tmp_path)
    path = tmp_path / "ckpt" / file
    if tamper == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    elif tamper == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif tamper == "add":
        path.write_bytes(b"surprise")
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=rf"ckpt.*{file}"):
        load_checkpoint(tmp_path, "ckpt")


def test_no_manifest_is_not_a_checkpoint(tmp_path):
    # rule: a directory without manifest.json (half-written) is never loaded
    _save(tmp_path)
    (tmp_path / "ckpt" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(tmp_path, "ckpt")


def test_forged_manifest_is_refused_with_key(tmp_path, monkeypatch):
    # rule: with a key set, editing the manifest (a metric) without re-signing fails the HMAC
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    _save(tmp_path)
    manifest_path = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["metrics"]["val_loss"] = 0.0001
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="ckpt: manifest.json: signature does not match"):
        load_checkpoint(tmp_path, "ckpt")


def test_wrong_key_is_refused(tmp_path, monkeypatch):
    # rule: a checkpoint signed with another key does not verify
    monkeypatch.setenv(ENV_SIGNING_KEY, "another key")
    _save(tmp_path)
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    with pytest.raises(CheckpointError, match="manifest.json: signature does not match"):
        verify_checkpoint(tmp_path, "ckpt")


@pytest.mark.parametrize("via_env", [True, False])
def test_unsigned_is_refused_when_signing_is_required(tmp_path, monkeypatch, via_env):
    # rule: KD_TUNE_REQUIRE_SIGNATURE=1 or require_signature=True refuses an unsigned manifest
    _save(tmp_path)
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    if via_env:
        monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "1")
    with pytest.raises(CheckpointError, match="manifest.json: unsigned"):
        load_checkpoint(tmp_path, "ckpt", require_signature=None if via_env else True)


def test_signed_checkpoint_loads_with_the_right_key_from_a_file(tmp_path, monkeypatch):
    # rule: a signed checkpoint verifies with the key (here from KD_TUNE_SIGNING_KEY_FILE) when signing is required
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv(ENV_SIGNING_KEY_FILE, str(key_file))
    _save(tmp_path / "store")
    manifest = load_checkpoint(tmp_path / "store", "ckpt", require_signature=True).manifest
    assert manifest["signature"]["alg"] == "HMAC-SHA256"
    assert KEY not in (tmp_path / "store" / "ckpt" / "manifest.json").read_text()


def test_copy_checkpoint_verifies_then_copies(tmp_path):
    # rule: copy_checkpoint refuses a tampered source and copies a good one byte-identical
    _save(tmp_path / "src")
    copy_checkpoint(tmp_path / "src" / "ckpt", tmp_path / "dst", "runs/epoch_0001")
    _assert_same(load_checkpoint(tmp_path / "dst", "runs/epoch_0001").tensors, _tensors())
    (tmp_path / "src" / "ckpt" / "optimizer.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        copy_checkpoint(tmp_path / "src" / "ckpt", tmp_path / "dst", "runs/epoch_0002")


def resign_nothing_and_strip(ckpt_dir, new_weights: bytes) -> None:
    """Swap model.safetensors, recompute its hash and size in the manifest and delete the signature: what an
    attacker without the key can do."""
    (ckpt_dir / "model.safetensors").write_bytes(new_weights)
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": hashlib.sha256(new_weights).hexdigest(),
                                              "size": len(new_weights)}
    del manifest["signature"]
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_stripped_signature_is_refused_when_a_key_is_set(tmp_path, monkeypatch, caplog):
    # Rule: with a key set, a valid signature is required by default: swapped weights with recomputed hashes and no
    # signature are refused; KD_TUNE_REQUIRE_SIGNATURE=0 accepts them, with a warning naming the checkpoint.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    _save(tmp_path)
    save_checkpoint(tmp_path, "other", {"model": {"w": torch.zeros(3)}}, kind="student", config={})
    resign_nothing_and_strip(tmp_path / "ckpt", (tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"ckpt: manifest.json: unsigned, but a signature is required "
                                              r"\(a signing key is set\)"):
        load_checkpoint(tmp_path, "ckpt")
    monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "0")
    with caplog.at_level(logging.WARNING, logger="kd_tune.signing"):
        assert torch.equal(load_checkpoint(tmp_path, "ckpt").tensors["model"]["w"], torch.zeros(3))
    assert any("ckpt: manifest.json: unsigned, accepted only because" in r.getMessage() for r in caplog.records)


def test_require_signature_without_a_key_refuses_unsigned(tmp_path, monkeypatch):
    # Rule: KD_TUNE_REQUIRE_SIGNATURE=1 without any key refuses an unsigned checkpoint.
    _save(tmp_path)
    monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "1")
    with pytest.raises(CheckpointError, match="unsigned, but a signature is required .KD_TUNE_REQUIRE_SIGNATURE=1"):
        verify_checkpoint(tmp_path, "ckpt")


def test_an_empty_key_does_not_save_unsigned(tmp_path, monkeypatch):
    # Rule: an empty KD_TUNE_SIGNING_KEY is an error naming it, not a silently unsigned checkpoint.
    monkeypatch.setenv(ENV_SIGNING_KEY, "")
    with pytest.raises(SigningError, match=f"^{ENV_SIGNING_KEY}: set but empty"):
        _save(tmp_path)
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------- identity: what a checkpoint is, where it belongs


@pytest.fixture
def two_teachers(small_dataset, tmp_path, monkeypatch):
    """A config with teachers cnn and cnn_b on tmp_path, a signing key set, and cnn fine-tuned (saved) there."""
    from kd_tune.datasets.data import load_dataset

    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    config = load_config(None, overrides=[f"data.root={small_dataset}", f"storage.root={tmp_path}",
                                          "teachers=[{name: cnn, arch: cnn, source: tiny}, "
                                          "{name: cnn_b, arch: cnn, source: tiny}]"])
    data = load_dataset(small_dataset)
    save_teacher(config, config.teacher("cnn"), initial_teacher(config.teacher("cnn"), n_mels=40), data)
    return config, data


def test_a_signed_teacher_copied_to_another_teachers_place_is_refused(two_teachers, tmp_path):
    # Rule: the signature binds a teacher's name: teachers/cnn copied to teachers/cnn_b does not load as cnn_b (nor
    # count as current), and renaming it in the manifest breaks the signature; cnn itself still loads.
    config, data = two_teachers
    shutil.copytree(tmp_path / "teachers" / "cnn", tmp_path / "teachers" / "cnn_b")
    with pytest.raises(CheckpointError, match=r"teachers/cnn_b: holds 'teacher' checkpoint named 'cnn', expected "
                                              r"'teacher' checkpoint named 'cnn_b'"):
        load_teacher(config, config.teacher("cnn_b"))
    assert not teacher_is_current(config, config.teacher("cnn_b"), data)
    manifest_path = tmp_path / "teachers" / "cnn_b" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"name": "cnn"', '"name": "cnn_b"'))
    with pytest.raises(CheckpointError, match="signature does not match"):
        load_teacher(config, config.teacher("cnn_b"))
    load_teacher(config, config.teacher("cnn"))
    assert teacher_is_current(config, config.teacher("cnn"), data)


def test_a_signed_student_in_a_teachers_place_is_refused(two_teachers, tmp_path):
    # Rule: the signature binds the kind: a student checkpoint (as training writes it) in teachers/cnn is refused.
    from kd_tune.training.models import build_student

    config, _ = two_teachers
    student = build_student("ds_cnn", width=0.25)
    written = resume.save_training_checkpoint(tmp_path / "run", student, torch.optim.AdamW(student.parameters()),
                                              resume.TrainState(), config, {})
    shutil.rmtree(tmp_path / "teachers" / "cnn")
    shutil.copytree(written, tmp_path / "teachers" / "cnn")
    with pytest.raises(CheckpointError, match="teachers/cnn: holds 'student' checkpoint, expected 'teacher' "
                                              "checkpoint named 'cnn'"):
        load_teacher(config, config.teacher("cnn"))


def test_a_pinned_checkpoint_loads_only_from_where_it_was_saved(tmp_path, monkeypatch):
    # Rule: a pinned checkpoint (teachers, cache shards) records its place under the storage root: copied to another
    # place (a cache view's shard over another view's) it is refused there, also without `expect`.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    save_checkpoint(tmp_path, "cache/t-0123/view_000", {"logits": {"logits": torch.zeros(4, 2)}},
                    kind="teacher_cache", name="t", pinned=True, config={})
    shutil.copytree(tmp_path / "cache/t-0123/view_000", tmp_path / "cache/t-0123/view_001")
    with pytest.raises(CheckpointError, match=r"view_001: saved for 'cache/t-0123/view_000' under its storage root, "
                                              r"found at 'cache/t-0123/view_001'"):
        load_checkpoint(tmp_path, "cache/t-0123/view_001")
    with pytest.raises(CheckpointError, match="saved for 'cache/t-0123/view_000'"):
        verify_checkpoint(tmp_path / "cache", "t-0123/view_000")  # the same directory seen from another root
    assert load_checkpoint(tmp_path, "./cache/t-0123/view_000", expect=Identity("teacher_cache", "t")).manifest[
        "location"] == "cache/t-0123/view_000"


def test_an_unpinned_student_keeps_its_identity_through_a_ray_style_copy(tmp_path, monkeypatch):
    # Rule: a student's identity is its kind and run/trial name, which survive the plain directory copy Ray Train
    # makes into checkpoint_<timestamp>/; loading it as another trial's is refused.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    _save(tmp_path / "tmp", "checkpoint", name="trial_1")
    parent = tmp_path / "exp" / "trial_1" / "train"
    shutil.copytree(tmp_path / "tmp" / "checkpoint", parent / "checkpoint_2025-06-01_12-00-01.000000")
    loaded = load_checkpoint(parent, "checkpoint_2025-06-01_12-00-01.000000", expect=Identity("student", "trial_1"))
    _assert_same(loaded.tensors, _tensors())
    with pytest.raises(CheckpointError, match="holds 'student' checkpoint named 'trial_1', expected 'student' "
                                              "checkpoint named 'trial_2'"):
        load_checkpoint(parent, "checkpoint_2025-06-01_12-00-01.000000", expect=Identity("student", "trial_2"))


# ---------------------------------------------------------------- bounds: size, declared sizes, nesting


def peak_traced_bytes(call) -> int:
    """Peak Python allocation while `call` runs (bytes objects read from files included)."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_huge_manifest_is_refused_after_reading_at_most_the_cap(tmp_path):
    # Rule: manifest.json is read up to MAX_MANIFEST_BYTES + 1 bytes: a 200 MB one (sparse here) is refused at the
    # cost of the cap, not of the file, in load, latest_checkpoint and prune alike.
    _save(tmp_path, "ckpts/huge")
    with open(tmp_path / "ckpts" / "huge" / "manifest.json", "r+b") as f:
        f.truncate(200 * 2**20)

    def load():
        with pytest.raises(CheckpointError, match=f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes"):
            load_checkpoint(tmp_path, "ckpts/huge")

    assert peak_traced_bytes(load) < 8 * MAX_MANIFEST_BYTES
    assert peak_traced_bytes(lambda: latest_checkpoint(tmp_path, "ckpts")) < 8 * MAX_MANIFEST_BYTES


@pytest.mark.parametrize("declared", [10**18, MAX_FILE_BYTES + 1, 4 * 2**30])
def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path, declared):
    # Rule: a manifest's size for a file is capped (MAX_FILE_BYTES) and compared with the file's real size before
    # reading: claiming 10^18 or 4 GiB bytes for a small file allocates nothing and is a CheckpointError.
    _save(tmp_path)
    manifest_path = tmp_path / "ckpt" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.safetensors"]["size"] = declared
    manifest_path.write_text(json.dumps(manifest))

    def load():
        with pytest.raises(CheckpointError, match="model.safetensors") as error:
            load_checkpoint(tmp_path, "ckpt")
        assert "\n" not in str(error.value)

    assert peak_traced_bytes(load) < 4 * 2**20  # the manifest and the tensor file are a few KB


def test_a_deeply_nested_manifest_is_a_one_line_error_everywhere(tmp_path, caplog):
    # Rule: a manifest nested 100k levels deep is a one-line CheckpointError in load; latest_checkpoint and pruning
    # skip it with a one-line warning naming it, and keep working on the rest (no RecursionError anywhere).
    _save(tmp_path, "ckpts/good")
    (tmp_path / "ckpts" / "deep").mkdir()
    (tmp_path / "ckpts" / "deep" / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CheckpointError, match=r"ckpts/deep: manifest.json is not valid JSON: nested 100000 levels"):
        load_checkpoint(tmp_path, "ckpts/deep")
    with caplog.at_level(logging.WARNING, logger="kd_tune.store.checkpoint"):
        assert latest_checkpoint(tmp_path, "ckpts") == "ckpts/good"
        assert prune_checkpoints(tmp_path, "ckpts", metric="val_loss", keep_best=0) == []
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("ckpts/deep: manifest.json is not valid JSON: nested" in w and "\n" not in w
                                      for w in warnings), warnings
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["deep", "good"]


# ---------------------------------------------------------------- legacy .pt and state dicts


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_payload_in_pt_never_runs(tmp_path):
    # rule: .pt files load only with weights_only=True; a payload is refused and never executed
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused.*system"):
        load_legacy_pt(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_pickle_payload_in_a_hugging_face_teacher_folder_is_refused_naming_the_file(tmp_path):
    # Rule: a save_pretrained folder whose pytorch_model.bin carries a payload is refused with one line naming that
    # file (not a bare UnpicklingError), and the payload never runs.
    from kd_tune.training.models import build_teacher

    folder, marker = tmp_path / "w2v", tmp_path / "pwned"
    build_teacher("wav2vec2", source="tiny").model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.ones(1), "evil": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        initial_teacher(TeacherConfig(name="w", arch="wav2vec2", source=str(folder)), n_mels=40)
    message = str(error.value)
    assert message.startswith(f"{folder}/pytorch_model.bin: refused: it references posix.system")
    assert "\n" not in message and error.value.exit_code == 2
    assert not marker.exists()


def test_plain_weights_pt_loads(tmp_path):
    # rule: a plain state dict .pt loads exactly
    weights = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    torch.save(weights, tmp_path / "ok.pt")
    _assert_same({"m": load_legacy_pt(tmp_path / "ok.pt")}, {"m": weights})


def test_load_state_dict_strict_lists_every_problem():
    # rule: a mismatched state dict names missing keys, unexpected keys and shape mismatches
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    state = dict(model.state_dict())
    del state["1.bias"]
    state["0.weight"] = torch.zeros(5, 3)
    state["stray"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: 1\.bias.*unexpected keys: stray.*0\.weight"):
        load_state_dict_strict(model, state)
    load_state_dict_strict(model, torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)).state_dict())


# ---------------------------------------------------------------- retention


def _save_series(root, losses):
    for step, loss in enumerate(losses):
        save_checkpoint(root, f"ckpts/epoch_{step:04d}", {"model": {"x": torch.full((1,), float(step))}},
                        kind="trial", config={}, epoch=step, step=step * 10, metrics={"val_loss": loss})


def test_retention_keeps_best_k_plus_latest(tmp_path):
    # rule: prune keeps the K best by the metric (min or max) plus the latest by step, deleting the rest
    _save_series(tmp_path, [0.5, 0.1, 0.4, 0.2, 0.9])
    deleted = prune_checkpoints(tmp_path, "ckpts", metric="val_loss", mode="min", keep_best=2)
    assert deleted == ["epoch_0000", "epoch_0002"]
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["epoch_0001", "epoch_0003", "epoch_0004"]
    assert prune_checkpoints(tmp_path, "ckpts", metric="val_loss", mode="max", keep_best=1,
                             keep_latest=False) == ["epoch_0001", "epoch_0003"]
    assert latest_checkpoint(tmp_path, "ckpts") == "ckpts/epoch_0004"


def test_retention_deletes_old_half_written_dirs_only(tmp_path):
    # rule: dirs without a manifest older than the newest complete checkpoint are deleted; newer ones are kept
    (tmp_path / "ckpts" / "old_partial").mkdir(parents=True)
    (tmp_path / "ckpts" / "old_partial" / "model.safetensors").write_bytes(b"x")
    for path in (tmp_path / "ckpts" / "old_partial", tmp_path / "ckpts" / "old_partial" / "model.safetensors"):
        os.utime(path, (1, 1))
    _save_series(tmp_path, [0.3, 0.2])
    (tmp_path / "ckpts" / "new_partial").mkdir()
    future = (2**31, 2**31)
    os.utime(tmp_path / "ckpts" / "new_partial", future)
    assert prune_checkpoints(tmp_path, "ckpts", metric="val_loss", keep_best=1) == ["epoch_0000", "old_partial"]
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["epoch_0001", "new_partial"]


# ---------------------------------------------------------------- S3 (moto)


def _s3(moto_s3, bucket):
    return Storage.from_uri(f"s3://{bucket}/runs", endpoint_override=moto_s3)


def test_s3_round_trip(moto_s3, s3_bucket):
    # rule: the same checkpoint format round-trips exactly on S3
    store = _s3(moto_s3, s3_bucket)
    assert _save(store, "trial/ckpt") == f"{s3_bucket}/runs/trial/ckpt"
    ckpt = load_checkpoint(store, "trial/ckpt")
    _assert_same(ckpt.tensors, _tensors())
    assert ckpt.manifest["metrics"]["val_loss"] == 0.25
    _save(store, "trial/ckpt", metrics={"val_loss": 0.1})  # overwrite in place
    assert load_checkpoint(store, "trial/ckpt").manifest["metrics"]["val_loss"] == 0.1


def test_s3_flipped_byte_is_refused(moto_s3, s3_bucket):
    # rule: a flipped byte in an S3 object fails the SHA-256 check, naming the file
    store = _s3(moto_s3, s3_bucket)
    _save(store)
    data = bytearray(store.read_bytes("ckpt/model.safetensors"))
    data[100] ^= 0x01
    store.write_bytes("ckpt/model.safetensors", bytes(data))
    with pytest.raises(CheckpointError, match="ckpt: file model.safetensors does not match its SHA-256"):
        load_checkpoint(store, "ckpt")


def test_s3_manifest_last_and_required(moto_s3, s3_bucket, monkeypatch):
    # rule: on S3 the manifest is the last object written, and without it the directory is not loadable
    store = _s3(moto_s3, s3_bucket)
    written = []
    real_write = Storage.write_bytes

    def record(self, rel, data):
        written.append(rel)
        real_write(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", record)
    _save(store)
    assert written == ["ckpt/model.safetensors", "ckpt/optimizer.safetensors", "ckpt/manifest.json"]
    store.filesystem.delete_file(store.path("ckpt/manifest.json"))
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(store, "ckpt")


def test_s3_retention(moto_s3, s3_bucket):
    # rule: retention on S3 keeps the best K plus the latest
    store = _s3(moto_s3, s3_bucket)
    _save_series(store, [0.5, 0.1, 0.4])
    assert prune_checkpoints(store, "ckpts", metric="val_loss", keep_best=1) == ["epoch_0000"]
    assert store.listdir("ckpts") == ["epoch_0001", "epoch_0002"]


# ---------------------------------------------------------------- strict manifests, special files, no data loss


def test_a_manifest_with_a_key_twice_is_refused(tmp_path, monkeypatch):
    # rule: a signed manifest with a second "kind" put in front is refused, not read with the value one parser keeps
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    _save(tmp_path)
    manifest = tmp_path / "ckpt" / "manifest.json"
    manifest.write_text('{"kind": "teacher", ' + manifest.read_text().lstrip()[1:])
    with pytest.raises(CheckpointError, match="manifest.json is not valid JSON: key 'kind' appears more than once"):
        load_checkpoint(tmp_path, "ckpt")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_a_manifest_that_is_no_file_is_refused_without_blocking(tmp_path, kind):
    # rule: a manifest.json that is a FIFO (an open would wait for a writer forever) or a directory is a one-line
    # CheckpointError in load and verify, and retention skips it
    _save(tmp_path, "ckpts/a")
    manifest = tmp_path / "ckpts" / "a" / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest) if kind == "FIFO" else manifest.mkdir()
    with pytest.raises(CheckpointError, match=f"manifest.json is not a regular file \\(a {kind}\\)"):
        verify_checkpoint(tmp_path, "ckpts/a")
    assert latest_checkpoint(tmp_path, "ckpts") is None


def tree(root) -> dict:
    """Every file under root with its bytes: what a command must leave as it was."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("intruder", ["leaderboard.json", "trial_1/train/checkpoint_000001/manifest.json"])
def test_a_save_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path, intruder):
    # rule: a checkpoint replaces only a checkpoint: saved where an experiment is (a teacher named `sweep` in a
    # store that is the experiments' root), it is refused and not one file of the experiment goes
    (tmp_path / "sweep" / intruder).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "sweep" / intruder).write_text("[]")
    before = tree(tmp_path / "sweep")
    with pytest.raises(CheckpointError, match=f"sweep: holds '{intruder.split('/')[0]}', which is no part of a "
                                              "checkpoint"):
        _save(tmp_path, "sweep")
    assert tree(tmp_path / "sweep") == before
    _save(tmp_path, "ckpt")
    _save(tmp_path, "ckpt", epoch=3)  # over a checkpoint: replaced
    assert load_checkpoint(tmp_path, "ckpt").manifest["epoch"] == 3
