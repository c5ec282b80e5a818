"""The one checkpoint format kd_tune reads and writes: safetensors files plus a hashed, signed manifest.

A checkpoint is a directory of `<stem>.safetensors` files plus `manifest.json`, written last (a directory without
one is never taken for a checkpoint); it replaces only a checkpoint. The manifest holds every file's SHA-256 and size,
the kind and name (a teacher's name, a run or trial id) and, when pinned, its place under the storage root; with a
key set an HMAC covers all of it and is required by default (kd_tune.signing). Loading checks sizes against caps,
then everything else, before building any tensor; a caller states what it expects (`Identity`). Nothing here
unpickles. Retention (`prune_checkpoints`) and the newest checkpoint of a run (`latest_checkpoint`) are here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import safetensors.torch
import torch
from safetensors import SafetensorError

from kd_tune import __version__
from kd_tune.errors import InputError, shown
from kd_tune.metrics import epoch_key
from kd_tune.signing import SpecialFileError, canonical_json, parse_json, signed, verify_signature
from kd_tune.store.storage import PUBLISHED_DIR_MODE, PathEscapeError, Storage, as_storage, pretty_json, remove_local

FORMAT = "kd_tune.checkpoint/1"
MANIFEST_NAME = "manifest.json"
TENSOR_SUFFIX = ".safetensors"
# kd_tune's manifests measure ~6 KB (a base wav2vec2 teacher's with its transformers config, a student's with its
# optimizer groups); 1 MiB is 170x that, and refusing a 200 MB manifest then costs 1 MiB of reading.
MAX_MANIFEST_BYTES = 2**20
# The largest tensor file: a 2-billion-parameter float32 teacher is 8 GB; twice that, so that a manifest claiming
# 10^18 bytes is refused before any read or allocation.
MAX_FILE_BYTES = 16 * 2**30
_STEM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILE_RE = re.compile(rf"{_STEM_RE.pattern}{re.escape(TENSOR_SUFFIX)}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_STAGING_RE = re.compile(r"\..+\.(tmp|old)-[A-Za-z0-9_]+")  # names save_checkpoint uses while swapping a dir in

log = logging.getLogger(__name__)


class CheckpointError(InputError):
    """A checkpoint that is incomplete, altered, unsigned where a signature is required, or not what was expected."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a caller expects a checkpoint to be: its kind ("teacher", "student", ...) and, unless None, its name."""

    kind: str
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its manifest, and one state dict per file stem."""

    manifest: dict
    tensors: dict[str, dict[str, torch.Tensor]]


def save_checkpoint(storage: Storage | str | os.PathLike, rel_dir: str,
                    tensors: Mapping[str, Mapping[str, torch.Tensor]], *, kind: str, config: dict,
                    name: str | None = None, pinned: bool = False, epoch: int | None = None,
                    step: int | None = None, metrics: Mapping[str, Any] | None = None, trial_id: str | None = None,
                    extra: Any = None) -> str:
    """Write a checkpoint directory: one `<stem>.safetensors` per entry of `tensors`, then manifest.json.

    kind and name (a teacher's name, a run or trial id) are what load_checkpoint(expect=Identity(...)) compares.
    pinned: it loads only from rel_dir (teachers, cache shards); unpinned ones may be copied (Ray's checkpoint dirs,
    `kd-tune train`'s epoch dirs). Non-finite metrics are stored as null. Returns the directory's filesystem path.
    """
    storage = as_storage(storage)
    files = {f"{stem}{TENSOR_SUFFIX}": _serialize(stem, state) for stem, state in _checked_stems(tensors).items()}
    location = _location(storage, rel_dir) if pinned else None
    manifest = _manifest(files, kind=kind, config=config, name=name, location=location, epoch=epoch, step=step,
                         metrics=metrics, trial_id=trial_id, extra=extra)
    _write_checkpoint_dir(storage, rel_dir, files, pretty_json(manifest))
    return storage.path(rel_dir)


def _checked_stems(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> Mapping:
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("tensors must be a non-empty dict of file stem -> state dict")
    bad = [stem for stem in tensors if not isinstance(stem, str) or not _STEM_RE.fullmatch(stem)]
    if bad:
        raise ValueError(f"tensor file stem {bad[0]!r} is not allowed (allowed: letters, digits, '_', '.', '-', "
                         "starting with a letter or digit)")
    return tensors


def _serialize(stem: str, state: Mapping[str, torch.Tensor]) -> bytes:
    if not isinstance(state, Mapping):
        raise TypeError(f"tensors[{stem!r}] must be a dict of name -> Tensor, got {type(state).__name__}")
    flat = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors[{stem!r}][{name!r}] must map a str to a Tensor, got {type(value).__name__}")
        # safetensors refuses views and shared storage: every tensor gets its own contiguous CPU copy.
        flat[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return safetensors.torch.save(flat)


def _location(storage: Storage, rel_dir: str) -> str:
    return posixpath.relpath(storage.path(rel_dir), storage.root)  # normalised: './a/b' and 'a/b' are one place


def _manifest(files: dict[str, bytes], *, kind: str, config: dict, name: str | None, location: str | None,
              epoch: int | None, step: int | None, metrics: Mapping[str, Any] | None, trial_id: str | None,
              extra: Any) -> dict:
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string such as 'student', 'teacher' or 'trial', got {kind!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (the resolved config), got {type(config).__name__}")
    for field, value in (("epoch", epoch), ("step", step)):
        if value is not None and (type(value) is not int or value < 0):
            raise ValueError(f"{field} must be a non-negative int or None, got {value!r}")
    for field, text in (("name", name), ("trial_id", trial_id)):
        if text is not None and not (isinstance(text, str) and text):
            raise ValueError(f"{field} must be a non-empty str or None, got {shown(text)}")
    manifest = {"format": FORMAT, "kd_tune_version": __version__, "kind": kind, "name": name, "location": location,
                "created_unix": time.time(), "config": config, "epoch": epoch, "step": step,
                "metrics": _json_metrics(metrics), "trial_id": trial_id, "extra": {} if extra is None else extra,
                "files": {file: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                          for file, data in files.items()}}
    for field in ("config", "extra"):
        _check_json(field, manifest[field])
    return signed(manifest)


def _json_metrics(metrics: Mapping[str, Any] | None) -> dict:
    metrics = {} if metrics is None else metrics
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    out = {str(k): None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    _check_json("metrics", out)
    return out


def _check_json(field: str, value: Any) -> None:
    try:
        canonical_json(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {field} must be plain JSON (dict/list/str/int/float/bool/None, no NaN): "
                         f"{error}") from None


def _write_checkpoint_dir(storage: Storage, rel_dir: str, files: dict[str, bytes], manifest: bytes) -> None:
    if storage.path(rel_dir) == storage.root:
        raise PathEscapeError(f"a checkpoint needs its own directory under the storage root {storage.uri}")
    _check_replaceable(storage, rel_dir)
    if storage.is_local:
        _write_local_dir(storage, rel_dir, files, manifest)
    else:
        if storage.exists(rel_dir):
            storage.delete_dir(rel_dir)  # stale files of an older checkpoint would fail the file-set check
        _write_files(storage, rel_dir, files, manifest)


def _check_replaceable(storage: Storage, rel_dir: str) -> None:
    """A checkpoint replaces only a checkpoint: a directory holding anything else (an experiment where a teacher of
    its name is saved) is refused, so that no save deletes what no save wrote."""
    found = storage.filesystem.get_file_info(storage.path(rel_dir)).type
    names = storage.listdir(rel_dir) if found == pafs.FileType.Directory else []
    foreign = [n for n in names if n != MANIFEST_NAME and not (_FILE_RE.fullmatch(n) or _STAGING_RE.fullmatch(n))]
    foreign += ["(it is a file)"] if found == pafs.FileType.File else []
    if foreign:
        raise CheckpointError(f"{_where(storage, rel_dir)}: holds {shown(foreign[0])}, which is no part of a "
                              "checkpoint; allowed: saving where nothing is, or over a checkpoint")


def _write_files(storage: Storage, rel_dir: str, files: dict[str, bytes], manifest: bytes) -> None:
    for name, data in files.items():
        storage.write_bytes(posixpath.join(rel_dir, name), data)
    storage.write_bytes(posixpath.join(rel_dir, MANIFEST_NAME), manifest)  # last: it marks the directory complete


def _write_local_dir(storage: Storage, rel_dir: str, files: dict[str, bytes], manifest: bytes) -> None:
    """Build the directory under a hidden sibling name, then rename it into place."""
    target = storage.path(rel_dir)
    parent, name = posixpath.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        os.chmod(staging, PUBLISHED_DIR_MODE)
        _write_files(storage, posixpath.relpath(staging, storage.root), files, manifest)
        _swap_in(staging, target)
    except BaseException:
        remove_local(staging)
        raise


def _swap_in(staging: str, target: str) -> None:
    """Rename `staging` to `target`; an existing target is moved aside and deleted only once the new one is in."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    parent, name = posixpath.split(target)
    aside = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    remove_local(aside)


def copy_checkpoint(source_dir: str | os.PathLike, storage: Storage | str | os.PathLike, rel_dir: str, *,
                    expect: Identity | None = None) -> str:
    """Verify the local checkpoint `source_dir`, then copy it to `rel_dir` (manifest last, same bytes verified)."""
    source = Path(source_dir)
    manifest, files = _read_verified(Storage.from_uri(source.parent), source.name, expect=expect)
    storage = as_storage(storage)
    _write_checkpoint_dir(storage, rel_dir, files, pretty_json(manifest))
    return storage.path(rel_dir)


def load_checkpoint(storage: Storage | str | os.PathLike, rel_dir: str, *, expect: Identity | None = None,
                    device: str | torch.device = "cpu", require_signature: bool | None = None) -> Checkpoint:
    """Verify a checkpoint (bounds, file set, sizes, SHA-256, signature, identity) and only then build its tensors.

    expect: the kind (and name) the caller needs (None: any); a pinned checkpoint must lie where it was saved in any
    case. require_signature: None follows kd_tune.signing's rules.
    """
    storage = as_storage(storage)
    manifest, files = _read_verified(storage, rel_dir, expect=expect, require_signature=require_signature)
    where = _where(storage, rel_dir)
    tensors = {name[: -len(TENSOR_SUFFIX)]: _deserialize(data, name, where, device) for name, data in files.items()}
    return Checkpoint(manifest, tensors)


def verify_checkpoint(storage: Storage | str | os.PathLike, rel_dir: str, *, expect: Identity | None = None,
                      require_signature: bool | None = None) -> dict:
    """Run every check load_checkpoint runs, without building tensors; returns the manifest."""
    return _read_verified(as_storage(storage), rel_dir, expect=expect, require_signature=require_signature)[0]


def _where(storage: Storage, rel_dir: str) -> str:
    return f"checkpoint {storage.uri.rstrip('/')}/{rel_dir}"


def _read_verified(storage: Storage, rel_dir: str, *, expect: Identity | None,
                   require_signature: bool | None = None) -> tuple[dict, dict[str, bytes]]:
    """The manifest and the bytes of every tensor file, each checked; these bytes are the ones to use (no re-read)."""
    where = _where(storage, rel_dir)
    names = _list_checkpoint(storage, rel_dir, where)
    if MANIFEST_NAME not in names:
        raise CheckpointError(f"{where}: {MANIFEST_NAME} is missing: the directory is incomplete or not a checkpoint")
    manifest = _read_manifest(storage, posixpath.join(rel_dir, MANIFEST_NAME), where)
    verify_signature(manifest, f"{where}: {MANIFEST_NAME}", require=require_signature, error=CheckpointError)
    _check_identity(manifest, expect, _location(storage, rel_dir), where)
    listed = set(manifest["files"]) | {MANIFEST_NAME}
    unlisted, missing = sorted(set(names) - listed), sorted(listed - set(names))
    if unlisted:
        raise CheckpointError(f"{where}: file {', '.join(unlisted)} is in the directory but not in {MANIFEST_NAME}")
    if missing:
        raise CheckpointError(f"{where}: file {', '.join(missing)} is listed in {MANIFEST_NAME} but missing")
    files = {name: _read_checked(storage, posixpath.join(rel_dir, name), entry, where)
             for name, entry in sorted(manifest["files"].items())}
    return manifest, files


def _list_checkpoint(storage: Storage, rel_dir: str, where: str) -> list[str]:
    try:
        return storage.listdir(rel_dir)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{where}: no such checkpoint directory") from None


def _read_manifest(storage: Storage, rel: str, where: str) -> dict:
    try:
        data = storage.read_head(rel, MAX_MANIFEST_BYTES + 1)  # never more than the cap, however large the file
    except SpecialFileError as error:  # a FIFO would block the read forever
        raise CheckpointError(f"{where}: {MANIFEST_NAME} is not a regular file ({error.kind})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{where}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes; allowed: at most "
                              f"{MAX_MANIFEST_BYTES} (kd_tune writes a few KB)")
    return _parse_manifest(data, where)


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = parse_json(data)
    except ValueError as error:
        raise CheckpointError(f"{where}: {MANIFEST_NAME} is not valid JSON: {error}; allowed: the manifest kd_tune "
                              "wrote") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{where}: {MANIFEST_NAME} format is {shown(found)}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not isinstance(manifest.get("metrics", {}), dict):
        raise CheckpointError(f"{where}: {MANIFEST_NAME} lists no tensor files, or its metrics are not a mapping")
    for name, entry in files.items():
        if not (_FILE_RE.fullmatch(name) and isinstance(entry, dict) and type(entry.get("size")) is int
                and 0 <= entry["size"] <= MAX_FILE_BYTES and _SHA256_RE.fullmatch(str(entry.get("sha256")))):
            raise CheckpointError(f"{where}: {MANIFEST_NAME} has a malformed entry for file {shown(name)}: "
                                  f"{shown(entry)}; allowed: {{\"sha256\": 64 hex digits, \"size\": 0 to "
                                  f"{MAX_FILE_BYTES} bytes}}")
    return manifest


def _check_identity(manifest: dict, expect: Identity | None, location: str, where: str) -> None:
    """The kind and name the caller expects, and for a pinned checkpoint the place it was saved for."""
    kind, name, pinned_to = manifest.get("kind"), manifest.get("name"), manifest.get("location")
    if expect is not None and (kind != expect.kind or (expect.name is not None and name != expect.name)):
        held, wanted = (f"{shown(k)} checkpoint" + ("" if n is None else f" named {shown(n)}")
                        for k, n in ((kind, name), (expect.kind, expect.name)))
        raise CheckpointError(f"{where}: holds {held}, expected {wanted}; allowed: a checkpoint saved as what is "
                              "loaded (copying one to another's place does not rename it: save or train it under "
                              "this name)")
    if pinned_to is not None and pinned_to != location:
        raise CheckpointError(f"{where}: saved for {shown(pinned_to)} under its storage root, found at "
                              f"{location!r}; allowed: a pinned checkpoint (teacher, cache) loads only from its own "
                              "place (move it back, or save it again here)")


def _read_checked(storage: Storage, rel: str, entry: dict, where: str) -> bytes:
    name, size = posixpath.basename(rel), entry["size"]
    try:  # the size from metadata first: a file of another size is refused before anything is allocated
        found = storage.size(rel)
    except OSError as error:
        raise CheckpointError(f"{where}: file {name} cannot be read: {error}") from None
    with storage.open_input(rel) as f:
        data = f.read(size + 1) if found == size else b""  # the real size, plus one byte to notice growth
    if len(data) != size:
        got = found if found != size else f"{len(data)} (it changed while read)"
        raise CheckpointError(f"{where}: file {name} has {got} bytes, {MANIFEST_NAME} says {size}")
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), entry["sha256"]):
        raise CheckpointError(f"{where}: file {name} does not match its SHA-256 in {MANIFEST_NAME} "
                              "(altered or corrupted)")
    return data


def _deserialize(data: bytes, name: str, where: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        state = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{where}: file {name} is not a valid safetensors file: {error}") from None
    return {key: value.to(device) for key, value in state.items()}


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    mtime_ns: int
    manifest: dict | None  # None: half-written


def prune_checkpoints(storage: Storage | str | os.PathLike, rel_parent: str, *, metric: str, mode: str = "min",
                      keep_best: int, keep_latest: bool = True) -> list[str]:
    """Keep the `keep_best` best checkpoints under `rel_parent` (metrics.epoch_key), plus the latest; delete the rest.

    Half-written directories (no manifest) older than the newest complete checkpoint are deleted too; a directory
    whose manifest is unreadable is left alone (with a warning). Returns the deleted names.
    """
    if mode not in ("min", "max") or type(keep_best) is not int or keep_best < 0:
        raise ValueError(f"mode must be 'min' or 'max' and keep_best a non-negative int, got {mode!r}, {keep_best!r}")
    storage = as_storage(storage)
    entries = _scan(storage, rel_parent)
    complete = [e for e in entries if e.manifest is not None]
    keep = _best(complete, metric, mode, keep_best)
    if keep_latest and complete:
        keep.add(_latest(complete).name)
    newest_ns = max((e.mtime_ns for e in complete), default=None)
    stale = [e.name for e in complete if e.name not in keep]
    abandoned = [e.name for e in entries if e.manifest is None and newest_ns is not None and e.mtime_ns < newest_ns]
    doomed = sorted(stale + abandoned)
    for name in doomed:
        storage.delete_dir(posixpath.join(rel_parent, name))
    return doomed


def latest_checkpoint(storage: Storage | str | os.PathLike, rel_parent: str) -> str | None:
    """The path (relative to the root) of the latest complete checkpoint under `rel_parent`, by step then epoch."""
    storage = as_storage(storage)
    complete = [e for e in _scan(storage, rel_parent) if e.manifest is not None]
    return posixpath.join(rel_parent, _latest(complete).name) if complete else None


def _scan(storage: Storage, rel_parent: str) -> list[_Entry]:
    names = storage.listdir(rel_parent) if storage.exists(rel_parent) else []
    folders = [name for name in names if storage.filesystem.get_file_info(
        storage.path(rel_parent, name)).type == pafs.FileType.Directory]
    return [e for e in (_entry(storage, posixpath.join(rel_parent, n), n) for n in folders) if e is not None]


def _entry(storage: Storage, rel: str, name: str) -> _Entry | None:
    """A complete checkpoint, a half-written one, or None for a directory with an unreadable manifest."""
    manifest_rel = posixpath.join(rel, MANIFEST_NAME)
    if _STAGING_RE.fullmatch(name) or not storage.exists(manifest_rel):
        return _Entry(name, _newest_mtime_ns(storage, rel), None)
    try:
        manifest = _read_manifest(storage, manifest_rel, _where(storage, rel))
    except CheckpointError as error:
        log.warning("skipping %s", error)
        return None
    return _Entry(name, storage.filesystem.get_file_info(storage.path(manifest_rel)).mtime_ns or 0, manifest)


def _newest_mtime_ns(storage: Storage, rel: str) -> int:
    # Not recursive: checkpoints are flat, and pyarrow's local recursive listing follows symlink loops.
    path = storage.path(rel)
    infos = [storage.filesystem.get_file_info(path), *storage.filesystem.get_file_info(pafs.FileSelector(path))]
    return max((info.mtime_ns for info in infos if info.mtime_ns is not None), default=0)


def _best(entries: list[_Entry], metric: str, mode: str, k: int) -> set[str]:
    scored = [(e.name, m["metrics"] | {"epoch": m.get("epoch")}) for e in entries  # all complete: `or {}` types it
              if _is_number((m := e.manifest or {}).get("metrics", {}).get(metric))]
    return {name for name, result in sorted(scored, key=lambda s: epoch_key(s[1], metric, mode))[:k]}


def _latest(entries: list[_Entry]) -> _Entry:
    def order(e: _Entry) -> tuple:
        step, epoch = (e.manifest or {}).get("step"), (e.manifest or {}).get("epoch")  # complete: `or {}` only types it
        return (step if _is_number(step) else -1, epoch if _is_number(epoch) else -1, e.mtime_ns, e.name)

    return max(entries, key=order)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """module.load_state_dict(strict=True), failing first with every missing key, unexpected key and bad shape."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    shapes = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
              for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    if problems:
        raise CheckpointError(f"state dict does not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict(state_dict, strict=True)

