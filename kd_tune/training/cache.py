"""The teacher-output cache: every teacher pass of a sweep happens once, before the trials, which only read logits.

A teacher's logits of the clean training clips and of each seeded augmentation view, in verified checkpoint shards
under a key that covers everything they depend on; README, "Sweeps", shows the layout.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from kd_tune.audio.features import LogMel, front_end, render_view
from kd_tune.config import Config, TeacherConfig
from kd_tune.datasets.data import WakewordData, load_data
from kd_tune.progress import progress_bar
from kd_tune.store.checkpoint import (MANIFEST_NAME, MAX_MANIFEST_BYTES, CheckpointError, Identity, load_checkpoint,
                                      save_checkpoint, verify_checkpoint)
from kd_tune.store.storage import Storage
from kd_tune.training.distill import combine_teachers
from kd_tune.training.models import teacher_input_kind
from kd_tune.training.teachers import load_teacher, require_current_teachers, teacher_store

log = logging.getLogger(__name__)
CACHE_FORMAT = "kd_tune.teacher_cache/1"
CACHE_ROOT = "cache"
CLEAN, INDEX = "clean", "index"
SHARD_KIND, INDEX_KIND = "teacher_cache", "teacher_cache_index"
LOCK_NAME = "build.lock"


# ---------------------------------------------------------------- keys and names


def cache_key(config: Config, teacher: TeacherConfig, data: WakewordData) -> str:
    """sha256 over everything that decides the cached logits; temperature and schedules are not among them."""
    store, manifest = teacher_store(config), f"{teacher.name}/{MANIFEST_NAME}"
    if not store.exists(manifest):
        raise CheckpointError(f"teacher {teacher.name!r} has no checkpoint under {store.uri}/{teacher.name}: run "
                              "`kd-tune teacher train CONFIG` first")
    # Bounded like every manifest read: loading the teacher later verifies it in full.
    teacher_sha256 = hashlib.sha256(store.read_head(manifest, MAX_MANIFEST_BYTES + 1)).hexdigest()
    parts: dict[str, object] = {"teacher_manifest_sha256": teacher_sha256, "data_sha256": data.manifest_sha256,
                                "features": config.features.model_dump(mode="json"), "format": CACHE_FORMAT}
    if cached_views(config):  # without views, the logits of the clean clips: the same whatever the augmentation
        parts |= {"augment": config.augment.model_dump(mode="json"), "seed": config.training.seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_dir(teacher_name: str, key: str) -> str:
    return f"{CACHE_ROOT}/{teacher_name}-{key[:16]}"


def shard_names(config: Config) -> list[str]:
    """clean first, then one shard per view; none when the teacher hears only clean audio (augmentation off, or
    distillation.teacher_hears clean)."""
    return [CLEAN] + [f"view_{v:03d}" for v in range(cached_views(config))]


def cached_views(config: Config) -> int:
    hears_views = config.augment.enabled and config.distillation.teacher_hears == "augmented"
    return config.augment.views if hears_views else 0


def view_of(shard: str) -> int | None:
    return None if shard == CLEAN else int(shard.removeprefix("view_"))


# ---------------------------------------------------------------- building one shard (what a Ray task runs)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, audio: Tensor, log_mel: LogMel, *, batch_size: int,
                   device: torch.device) -> Tensor:
    """Logits [N, 2] float32 on the CPU of a frozen teacher for audio [N, N_SAMPLES], batch by batch."""
    teacher = teacher.to(device).eval()
    kind, out = teacher_input_kind(teacher), []
    for chunk in audio.split(batch_size):  # [B, N_SAMPLES]
        x = chunk if kind == "waveform" else log_mel(chunk)  # [B, N_SAMPLES] or [B, n_mels, T], as fit feeds it
        out.append(teacher(x.to(device)).float().cpu())  # [B, 2]
    return torch.cat(out)


def build_shard(config: Config, teacher_name: str, shard: str, key: str, *,
                data: WakewordData | None = None) -> str:
    """Compute one shard's logits and save it; returns its path. Run in-process or as a Ray task."""
    data = data or load_data(config.data)
    cpu = torch.device("cpu")
    # Rendered on the CPU with fit's own front end: the same audio a CPU training epoch of this view sees.
    log_mel, augment, _ = front_end(config, data.train.of_kind("background"), cpu)
    view = view_of(shard)
    audio = data.train.audio if view is None else render_view(data.train.audio, augment, view=view,
                                                              seed=config.training.seed)  # [N, N_SAMPLES]
    teacher = config.teacher(teacher_name)
    on_gpu = torch.cuda.is_available() and config.distillation.teacher_device != "cpu"
    logits = teacher_logits(load_teacher(config, teacher, data), audio, log_mel, batch_size=teacher.batch_size,
                            device=torch.device("cuda") if on_gpu else cpu)  # [N, 2]
    store = Storage.from_config(config.storage)
    return save_checkpoint(store, f"{cache_dir(teacher_name, key)}/{shard}", {"logits": {"logits": logits}},
                           kind=SHARD_KIND, name=teacher_name, pinned=True, config=config.to_dict(),
                           extra={"key": key, "view": view, "teacher": teacher_name, "clips": len(logits)})


# ---------------------------------------------------------------- checking what is there


def check_manifest(manifest: dict, *, kind: str, key: str, where: str) -> None:
    """Refuse a shard or index of another kind or built for another key."""
    found_kind, found_key = manifest.get("kind"), manifest.get("extra", {}).get("key")
    if found_kind != kind or found_key != key:
        raise CheckpointError(f"{where}: built as {found_kind!r} for cache key {found_key!r}, expected "
                              f"{kind!r} for key {key!r}: a stale cache is never used")


def shard_is_current(store: Storage, rel: str, key: str, teacher_name: str) -> bool:
    """True when the shard verifies and carries this key; a damaged or stale one is named in a warning."""
    if not store.exists(rel):
        return False
    try:
        manifest = verify_checkpoint(store, rel, expect=Identity(SHARD_KIND, teacher_name))
        check_manifest(manifest, kind=SHARD_KIND, key=key, where=rel)
    except CheckpointError as error:
        log.warning("rebuilding teacher-cache shard: %s", error)
        return False
    return True


def index_is_current(store: Storage, rel: str, key: str, shards: list[str], teacher_name: str) -> bool:
    if not store.exists(f"{rel}/{INDEX}"):
        return False
    try:
        manifest = verify_checkpoint(store, f"{rel}/{INDEX}", expect=Identity(INDEX_KIND, teacher_name))
        check_manifest(manifest, kind=INDEX_KIND, key=key, where=rel)
    except CheckpointError as error:
        log.warning("rewriting teacher-cache index: %s", error)
        return False
    return manifest["extra"].get("shards") == shards


def write_index(store: Storage, config: Config, teacher_name: str, key: str, clips: int) -> None:
    """The completion marker, written once every shard verifies."""
    save_checkpoint(store, f"{cache_dir(teacher_name, key)}/{INDEX}",
                    {"index": {"clips": torch.tensor([clips])}}, kind=INDEX_KIND, name=teacher_name, pinned=True,
                    config=config.to_dict(),
                    extra={"key": key, "teacher": teacher_name, "shards": shard_names(config)})


# ---------------------------------------------------------------- building the cache


Job = tuple[str, str, str]  # (teacher name, shard, cache key)
ShardRunner = Callable[[Config, list[Job], WakewordData], None]


def build_here(config: Config, jobs: list[Job], data: WakewordData) -> None:
    """The default shard runner: every shard in this process, one after another."""
    # a bar on a terminal, a line now and then without one (kd_tune.progress)
    for name, shard, key in progress_bar(len(jobs), "teacher cache", "shard", enabled=bool(jobs), iterable=jobs):
        build_shard(config, name, shard, key, data=data)


def build_cache(config: Config, teacher_names: list[str], *, data: WakewordData | None = None,
                run: ShardRunner = build_here) -> dict[str, str]:
    """Build whatever is missing, stale or damaged in the caches of these teachers; returns name -> cache path.

    Shards that verify with the right key are kept, so an interrupted build resumes. `run` builds the missing
    shards: here by default; the sweep passes one that makes each shard a Ray task (kd_tune.tuning.sweep.shards_on_ray).
    """
    data = data or load_data(config.data)
    require_current_teachers(config, data, teacher_names)  # a shard that verifies may be a stale teacher's
    store = Storage.from_config(config.storage)
    keys = {name: cache_key(config, config.teacher(name), data) for name in teacher_names}
    jobs = [(name, shard, key) for name, key in keys.items() for shard in shard_names(config)
            if not shard_is_current(store, f"{cache_dir(name, key)}/{shard}", key, name)]
    if jobs:
        run(config, jobs, data)
    rebuilt = {name for name, _, _ in jobs}
    for name, key in keys.items():
        if name in rebuilt or not index_is_current(store, cache_dir(name, key), key, shard_names(config), name):
            write_index(store, config, name, key, len(data.train.labels))
    return {name: store.path(cache_dir(name, key)) for name, key in keys.items()}


@contextlib.contextmanager
def build_lock(store: Storage) -> Iterator[None]:
    """One builder at a time per local storage root: flock, released by the kernel even if the holder dies.

    S3 has no atomic create-if-absent here, so there two first users may both build; shards are deterministic and
    written whole, so that costs time and nothing else.
    """
    if not store.is_local:
        yield
        return
    store.makedirs(CACHE_ROOT)
    fd = os.open(store.local_path(CACHE_ROOT, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


# ---------------------------------------------------------------- reading the cache


class CachedTeachers(nn.Module):
    """Cached teacher logits looked up by clip index, behind TeacherEnsemble's call signature."""

    logits: Tensor  # a buffer, declared: through nn.Module.__getattr__ it would read as Tensor | Module
    input_kinds: frozenset[str] = frozenset()  # looked up by index: no input is read

    def __init__(self, logits: Tensor, *, combine: str):
        super().__init__()
        if logits.ndim != 4 or logits.shape[-1] != 2 or 0 in logits.shape[:3]:
            raise ValueError(f"logits must be [teachers, 1 + views, clips, 2] with every size >= 1, got shape "
                             f"{tuple(logits.shape)}")
        self.register_buffer("logits", logits.float(), persistent=False)  # [K, S, N, 2], shard 0 = clean
        self.combine = combine

    @classmethod
    def load(cls, config: Config, data: WakewordData, *, device: torch.device | str = "cpu") -> CachedTeachers:
        """Every shard of every distillation teacher, verified; raises CheckpointError for anything incomplete,
        damaged or built for another key."""
        store = Storage.from_config(config.storage)
        clips = len(data.train.labels)
        per_teacher = []
        for teacher in config.distill_teachers:
            key = cache_key(config, teacher, data)
            rel = cache_dir(teacher.name, key)
            if not store.exists(f"{rel}/{INDEX}"):
                state = f"incomplete: its {INDEX}/ marker is missing" if store.exists(rel) else "not built yet"
                raise CheckpointError(f"teacher cache {store.uri}/{rel} is {state}")
            index = verify_checkpoint(store, f"{rel}/{INDEX}", expect=Identity(INDEX_KIND, teacher.name))
            check_manifest(index, kind=INDEX_KIND, key=key, where=f"{store.uri}/{rel}/{INDEX}")
            per_teacher.append(torch.stack([load_shard(store, f"{rel}/{s}", key, clips=clips, teacher_name=teacher.name)
                                            for s in shard_names(config)]))  # [S, N, 2]
        return cls(torch.stack(per_teacher), combine=config.distillation.combine).to(device)

    @torch.no_grad()
    def forward(self, inputs: dict[str, Tensor], *, view: int | None, index: Tensor) -> Tensor:
        """Combined logits [B, 2] of clips `index` [B] in view `view` (None: the clean clips)."""
        n_views = self.logits.shape[1] - 1
        if view is not None and n_views and not 0 <= view < n_views:
            raise ValueError(f"view {view} is not cached (allowed: 0 to {n_views - 1}, or None for clean clips)")
        shard = 0 if view is None or not n_views else 1 + view  # without augmentation every view is the clean audio
        logits = self.logits[:, shard, index.to(self.logits.device)]  # [K, B, 2]
        out = logits[0] if len(logits) == 1 else combine_teachers(logits, method=self.combine)
        return out.to(next(iter(inputs.values())).device)

    def check_inputs(self, inputs: dict[str, Tensor]) -> None:
        """Nothing to check: cached logits need no input, only clip indices."""


def load_shard(store: Storage, rel: str, key: str, *, clips: int, teacher_name: str) -> Tensor:
    where = f"{store.uri}/{rel}"
    checkpoint = load_checkpoint(store, rel, expect=Identity(SHARD_KIND, teacher_name))
    check_manifest(checkpoint.manifest, kind=SHARD_KIND, key=key, where=where)
    logits = checkpoint.tensors.get("logits", {}).get("logits")
    if logits is None or logits.shape != (clips, 2) or logits.dtype != torch.float32:
        shape = None if logits is None else tuple(logits.shape)
        raise CheckpointError(f"{where}: logits.safetensors holds logits of shape {shape}, expected "
                              f"float32 ({clips}, 2)")
    return logits


def cached_teachers(config: Config, data: WakewordData, device: torch.device) -> CachedTeachers:
    """The cache of the distillation teachers, built first (here, under a lock) if missing, stale or damaged."""
    try:
        return CachedTeachers.load(config, data, device=device)
    except CheckpointError as error:
        log.warning("teacher cache not usable, building it: %s", error)
    store = Storage.from_config(config.storage)
    with build_lock(store):
        # In this process even under Ray: a trial's worker already holds the CPUs that Ray tasks would wait for.
        build_cache(config, [t.name for t in config.distill_teachers], data=data)
    return CachedTeachers.load(config, data, device=device)
