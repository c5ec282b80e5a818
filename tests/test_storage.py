import json
import os

import pytest
import torch

from kd_tune import storage, train
from kd_tune.checkpoint import ENV_REQUIRE_SIGNATURE, ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, copy_checkpoint, latest_checkpoint, signing_key
from kd_tune.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, prune_checkpoints, save_checkpoint, verify_checkpoint
from kd_tune.checkpoint import FORMAT
from kd_tune.storage import PathEscapeError, Storage
from kd_tune.teachers import load_legacy_pt

KEY = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _no_signing_env(monkeypatch):
    for name in (ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, ENV_REQUIRE_SIGNATURE):
        monkeypatch.delenv(name, raising=False)


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
    with pytest.raises(CheckpointError, match="ckpt: manifest.json signature does not match"):
        load_checkpoint(tmp_path, "ckpt")


def test_wrong_key_is_refused(tmp_path, monkeypatch):
    # rule: a checkpoint signed with another key does not verify
    monkeypatch.setenv(ENV_SIGNING_KEY, "another key")
    _save(tmp_path)
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    with pytest.raises(CheckpointError, match="manifest.json signature does not match"):
        verify_checkpoint(tmp_path, "ckpt")


@pytest.mark.parametrize("via_env", [True, False])
def test_unsigned_is_refused_when_signing_is_required(tmp_path, monkeypatch, via_env):
    # rule: KD_TUNE_REQUIRE_SIGNATURE=1 or require_signature=True refuses an unsigned manifest
    _save(tmp_path)
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    if via_env:
        monkeypatch.setenv(ENV_REQUIRE_SIGNATURE, "1")
    with pytest.raises(CheckpointError, match="manifest.json is unsigned"):
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


def test_both_key_variables_set_is_an_error(monkeypatch, tmp_path):
    # rule: an ambiguous key source is refused rather than guessed
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    monkeypatch.setenv(ENV_SIGNING_KEY_FILE, str(tmp_path / "key"))
    with pytest.raises(ValueError, match="only one of"):
        signing_key()


def test_copy_checkpoint_verifies_then_copies(tmp_path):
    # rule: copy_checkpoint refuses a tampered source and copies a good one byte-identical
    _save(tmp_path / "src")
    copy_checkpoint(tmp_path / "src" / "ckpt", tmp_path / "dst", "runs/epoch_0001")
    _assert_same(load_checkpoint(tmp_path / "dst", "runs/epoch_0001").tensors, _tensors())
    (tmp_path / "src" / "ckpt" / "optimizer.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        copy_checkpoint(tmp_path / "src" / "ckpt", tmp_path / "dst", "runs/epoch_0002")


# ---------------------------------------------------------------- path confinement


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "a\0b"])
def test_escaping_and_malformed_paths_are_refused(tmp_path, rel):
    # rule: absolute parts, '..', empty and NUL components are refused, naming the path and the root
    store = Storage.from_uri(tmp_path / "root")
    with pytest.raises(PathEscapeError, match="root"):
        store.path(rel)


def test_sibling_prefix_is_refused(tmp_path):
    # rule: confinement compares components, so a link to root_evil does not pass as inside root
    (tmp_path / "root").mkdir()
    (tmp_path / "root_evil").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "root_evil")
    store = Storage.from_uri(tmp_path / "root")
    with pytest.raises(PathEscapeError, match="root_evil"):
        store.path("link", "secret")


@pytest.mark.parametrize("target_is_dir", [False, True])
def test_symlinks_out_of_the_root_are_refused(tmp_path, target_is_dir):
    # rule: a file or directory symlink pointing outside the root is refused for paths and reads
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(outside if target_is_dir else outside / "secret")
    store = Storage.from_uri(tmp_path / "root")
    rel = "link/secret" if target_is_dir else "link"
    with pytest.raises(PathEscapeError):
        store.path(rel)
    with pytest.raises(PathEscapeError):
        store.read_bytes(rel)


def test_symlink_swapped_in_after_the_check_is_not_followed(tmp_path):
    # rule: local reads open component by component with O_NOFOLLOW, so a swap after path() is not followed
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    (root / "data" / "f").write_text("inside")
    outside.mkdir()
    (outside / "f").write_text("outside")
    store = Storage.from_uri(root)
    store.path("data/f")  # the check passes on the real directory
    (root / "data" / "f").unlink()
    (root / "data").rmdir()
    (root / "data").symlink_to(outside)
    with pytest.raises(PathEscapeError, match="symlink 'data'"):
        storage._open_nofollow(store.root, "data/f")
    (root / "plain").write_text("x")
    fd = storage._open_nofollow(store.root, "plain")
    assert os.read(fd, 10) == b"x"
    os.close(fd)


def test_storage_basics_stay_inside_the_root(tmp_path):
    # rule: the plain file API (json, listdir, exists, delete) works under the root and never deletes the root
    store = Storage.from_uri(tmp_path / "root")
    storage.write_json(store, "a/b.json", {"x": [1, 2]})
    assert storage.read_json(store, "a/b.json") == {"x": [1, 2]}
    assert store.listdir("a") == ["b.json"] and store.exists("a/b.json") and store.is_local
    store.delete_dir("a")
    assert not store.exists("a")
    with pytest.raises(PathEscapeError, match="root"):
        store.delete_dir(".")


def test_uris_parse_without_exposing_credentials(monkeypatch):
    # rule: S3 URIs are bucket/prefix only; keys and other schemes are refused; endpoint scheme comes from the URL
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    store = Storage.from_uri("s3://bucket/runs/exp", endpoint_override="http://127.0.0.1:9", region="eu-west-1")
    assert (store.root, store.uri, store.is_local) == ("bucket/runs/exp", "s3://bucket/runs/exp", False)
    with pytest.raises(ValueError, match="environment") as error:
        Storage.from_uri("s3://bucket/runs?access_key=AKIA&secret_key=SECRET")
    assert "SECRET" not in str(error.value)
    with pytest.raises(ValueError, match="not supported"):
        Storage.from_uri("gs://bucket/runs")
    with pytest.raises(PathEscapeError):
        Storage.from_uri("s3://bucket/../other")


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


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    # rule: optimizer state travels as safetensors + JSON (no pickle) and restores the same optimizer state
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, meta = train.optimizer_to_safe(optimizer.state_dict())
    save_checkpoint(tmp_path, "c", {"optimizer": tensors}, kind="trial", config={}, extra={"optimizer": meta})
    ckpt = load_checkpoint(tmp_path, "c")
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(train.optimizer_from_safe(ckpt.tensors["optimizer"], ckpt.manifest["extra"]["optimizer"]))
    for slot in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state_dict()["state"][0][slot], optimizer.state_dict()["state"][0][slot])


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


def test_s3_endpoint_from_environment(moto_s3, s3_bucket, monkeypatch):
    # rule: AWS_ENDPOINT_URL is honoured when no endpoint_override is given
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    store = Storage.from_uri(f"s3://{s3_bucket}")
    storage.write_json(store, "x.json", {"ok": True})
    assert storage.read_json(store, "x.json") == {"ok": True}


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
