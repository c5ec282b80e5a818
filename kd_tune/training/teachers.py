"""Teachers: where a fine-tuned teacher lives on storage, whether it is current, loading it, and the live ensemble.

A teacher's `source` is "tiny" or "base" (random init), a Hugging Face id or a local save_pretrained directory, or a
PyTorch `.pt`/`.pth` state dict for the "base" architecture, read with torch's weights-only unpickler and nothing
else. The training loop asks its teachers for logits through the small `Teachers` protocol, which the live
`TeacherEnsemble` and the cached kd_tune.training.cache.CachedTeachers both implement.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from pickle import UnpicklingError  # only the error torch.load raises on refusal; nothing here unpickles
from typing import Protocol

import torch
from torch import Tensor, nn

from kd_tune.config import AugmentConfig, Config, TeacherConfig
from kd_tune.datasets.data import WakewordData
from kd_tune.errors import InputError, shown
from kd_tune.store.checkpoint import (CheckpointError, Identity, load_checkpoint, load_state_dict_strict,
                                      save_checkpoint, verify_checkpoint)
from kd_tune.store.storage import Storage, check_layout
from kd_tune.training.distill import combine_teachers
from kd_tune.training.models import build_teacher, count_parameters, hf_config, teacher_input_kind

LEGACY_SUFFIXES = (".pt", ".pth")
TEACHER_KIND = "teacher"
TEACHER_RECIPE = ("features", "augment")  # config sections a teacher's fine-tuning reads (augment: if it augments)
WEIGHTS_ONLY = "allowed: safetensors weights, or a plain state dict that torch's weights-only loader reads"


class StaleTeacherError(CheckpointError):
    """A stored teacher that verifies but was fine-tuned with another recipe or on other data."""


class Teachers(Protocol):
    """What the training loop asks of its teachers, live or cached."""

    input_kinds: frozenset[str]  # the inputs __call__ reads ("waveform", "features"); none when cached

    def __call__(self, inputs: dict[str, Tensor], *, view: int | None, index: Tensor) -> Tensor:
        """Combined logits [B, 2] for a batch: inputs {"waveform": [B, N_SAMPLES], "features": [B, n_mels, T]},
        its augmentation view (None: clean clips) and the clips' indices [B] in the training split."""

    def check_inputs(self, inputs: dict[str, Tensor]) -> None:
        """Fail at set-up, naming the teacher, when it cannot take what this run would give it."""


class TeacherEnsemble(nn.Module):
    """Frozen teachers in eval mode; each takes the input it declares, checked once at set-up."""

    def __init__(self, teachers: dict[str, nn.Module], *, combine: str, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.teachers = nn.ModuleDict(teachers).eval().requires_grad_(False)
        self.combine, self.device, self.dtype = combine, device, dtype
        self.input_kinds = frozenset(teacher_input_kind(t) for t in teachers.values())
        self.to(device=device, dtype=dtype)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        return super().train(False)  # teachers stay in eval mode: no dropout, no BatchNorm statistics updates

    @torch.no_grad()
    def forward(self, inputs: dict[str, Tensor], *, view: int | None = None, index: Tensor | None = None) -> Tensor:
        """Combined logits [B, 2] of the live teachers; view and index serve the cached alternative only."""
        logits = []
        for teacher in self.teachers.values():
            x = inputs[teacher_input_kind(teacher)].to(self.device, self.dtype)  # [B, N_SAMPLES] or [B, n_mels, T]
            logits.append(teacher(x).float())  # [B, 2]
        out = logits[0] if len(logits) == 1 else combine_teachers(logits, method=self.combine)
        return out.to(next(iter(inputs.values())).device)

    def check_inputs(self, inputs: dict[str, Tensor]) -> None:
        """Fail at set-up, naming the teacher, when it cannot take the input this run would give it."""
        for name, teacher in self.teachers.items():
            kind = teacher_input_kind(teacher)
            if kind not in inputs:
                raise ValueError(f"teacher {name!r} takes {kind} input, but this run provides only "
                                 f"{' and '.join(sorted(inputs))}")
            x = inputs[kind][:1].to(self.device, self.dtype)  # as forward() feeds it: half-precision teachers too
            try:
                out = teacher(x)  # one probe forward: a wrong shape fails here, not mid-epoch
            except RuntimeError as e:
                raise ValueError(f"teacher {name!r} cannot take {kind} input of shape {tuple(x.shape)}: {e}") from e
            if out.shape != (1, 2):
                raise ValueError(f"teacher {name!r} returned logits of shape {tuple(out.shape)} (expected [B, 2])")


def teacher_store(config: Config) -> Storage:
    """Where fine-tuned teachers live: storage.teachers, by default <storage.root>/teachers; each in <name>/.

    Its own setting, so that a sweep written elsewhere (`--storage`) still finds the teachers it distils from."""
    s = config.storage
    return Storage.from_uri(s.teachers_uri, endpoint_override=s.endpoint_override, region=s.region)


def configured_teachers(config: Config, names: list[str] | None = None) -> list[TeacherConfig]:
    """The teachers named (every configured one when None); a name the config does not define is refused."""
    configured = [t.name for t in config.teachers]
    unknown = [name for name in names or [] if name not in configured]
    if unknown:
        raise InputError(f"--only {shown(unknown[0])}: not a configured teacher; allowed: {', '.join(configured)}")
    return [config.teacher(name) for name in names or configured]


def check_teacher_store(config: Config) -> None:
    """Refuse a teacher store that overlaps storage.root, where a teacher could replace an experiment."""
    check_layout(Storage.from_config(config.storage), teacher_store(config))


def teacher_recipe(config: Config, teacher: TeacherConfig) -> Config:
    """The config a teacher is fine-tuned with: the augment section is the students' alone unless it augments."""
    return config if teacher.augment else config.model_copy(update={"augment": AugmentConfig(enabled=False)})


def teacher_identity(teacher: TeacherConfig) -> Identity:
    """What a stored teacher must be: a teacher checkpoint saved under this teacher's name."""
    return Identity(TEACHER_KIND, teacher.name)


def architecture_source(teacher: TeacherConfig) -> str:
    """The source that builds this teacher's architecture: a `.pt` state dict fills the "base" one."""
    return "base" if teacher.source.endswith(LEGACY_SUFFIXES) else teacher.source


def initial_teacher(teacher: TeacherConfig, *, n_mels: int) -> nn.Module:
    """The teacher that fine-tuning starts from: its source's weights, or random ones for "tiny" and "base"."""
    try:
        model = build_teacher(teacher.arch, source=architecture_source(teacher), n_mels=n_mels)
    except UnpicklingError as error:  # transformers read a pytorch_model*.bin with torch's weights-only unpickler
        raise CheckpointError(f"{pickled_weights(teacher.source)}: refused: {refusal_reason(error)}, and unpickling "
                              f"that could run code; {WEIGHTS_ONLY}") from None
    if teacher.source.endswith(LEGACY_SUFFIXES):
        load_state_dict_strict(model, load_legacy_pt(teacher.source))
    return model


def save_teacher(config: Config, teacher: TeacherConfig, model: nn.Module, data: WakewordData, *, epoch: int = 0,
                 step: int = 0, metrics: dict | None = None) -> None:
    """Store a teacher where `load_teacher` finds it, with what `teacher_is_current` compares."""
    check_teacher_store(config)
    save_checkpoint(teacher_store(config), teacher.name,
                    {"model": model.state_dict()}, kind=TEACHER_KIND, name=teacher.name, pinned=True,
                    config=teacher_recipe(config, teacher).to_dict(), epoch=epoch, step=step, metrics=metrics or {},
                    extra={"teacher": teacher.model_dump(), "hf_config": hf_config(model),
                           "parameters": count_parameters(model), "data_sha256": data.labelled_sha256})


def load_teacher(config: Config, teacher: TeacherConfig, data: WakewordData | None = None) -> nn.Module:
    """A fine-tuned teacher from the teacher store, verified, and refused (StaleTeacherError) when it was trained
    with another recipe, or, given `data`, on other data, before any weight is used."""
    store = teacher_store(config)
    ckpt = load_checkpoint(store, teacher.name, expect=teacher_identity(teacher))
    model = build_teacher(teacher.arch, source=architecture_source(teacher), n_mels=config.features.n_mels,
                          hf_config=ckpt.manifest["extra"].get("hf_config"))
    why = stale_reason(ckpt.manifest, config, teacher, data, model)
    if why is not None:
        raise StaleTeacherError(f"teacher {teacher.name} ({store.uri.rstrip('/')}/{teacher.name}): {why}; allowed: a "
                                f"teacher fine-tuned with this config: retrain it with `kd-tune teacher train CONFIG "
                                f"--only {teacher.name}`")
    load_state_dict_strict(model, ckpt.tensors["model"])
    return model


def require_current_teachers(config: Config, data: WakewordData, names: list[str] | None = None) -> None:
    """Refuse, before a run starts, any teacher it distils from (or named) that is missing or stale (load_teacher)."""
    for teacher in config.distill_teachers if names is None else [config.teacher(n) for n in names]:
        load_teacher(config, teacher, data)


def teacher_ensemble(config: Config, device: torch.device, data: WakewordData | None = None) -> TeacherEnsemble:
    d = config.distillation
    on = torch.device("cpu") if d.teacher_device == "cpu" else device
    dtype = getattr(torch, d.teacher_dtype) if on.type == "cuda" else torch.float32  # half precision only pays on CUDA
    teachers = {t.name: load_teacher(config, t, data) for t in config.distill_teachers}
    return TeacherEnsemble(teachers, combine=d.combine, device=on, dtype=dtype)


def teacher_is_current(config: Config, teacher: TeacherConfig, data: WakewordData) -> bool:
    """True when the stored teacher was fine-tuned with these settings (its own, the front end's and, if it augments,
    the augmentation's) on this exact data, and verifies."""
    try:
        manifest = verify_checkpoint(teacher_store(config), teacher.name, expect=teacher_identity(teacher))
    except (CheckpointError, FileNotFoundError):
        return False
    extra = manifest.get("extra")
    built = build_teacher(teacher.arch, source=architecture_source(teacher), n_mels=config.features.n_mels,
                          hf_config=extra.get("hf_config") if isinstance(extra, dict) else None)
    return stale_reason(manifest, config, teacher, data, built) is None


def stale_reason(manifest: dict, config: Config, teacher: TeacherConfig, data: WakewordData | None,
                 built: nn.Module) -> str | None:
    """Why a verified teacher checkpoint is not this config's teacher (None: it is); data None: not compared."""
    extra, trained_with = manifest.get("extra"), manifest.get("config") or {}
    if not isinstance(extra, dict) or stored_settings(extra.get("teacher"), trained_with) != teacher.model_dump():
        return "trained with other teacher settings"
    # straddle windows carry no label: a teacher never sees them, so the labelled hash is the one to compare
    if data is not None and extra.get("data_sha256") != data.labelled_sha256:
        return f"trained on other data than {data.root}"
    # The same teacher settings with another front end (or augmentation, if it augments) are another teacher.
    now = config.to_dict()
    recipe = [section for section in TEACHER_RECIPE if teacher.augment or section != "augment"]
    changed = [section for section in recipe if trained_with.get(section) != now[section]]
    if changed:
        return f"trained with other {changed[0]} settings"
    # The same settings can still mean another architecture after an upgrade: compare the parameter counts.
    if extra.get("parameters") != count_parameters(built):
        return f"holds {extra.get('parameters')} parameters, this version builds {count_parameters(built)}"
    return None


def stored_settings(settings: object, trained_with: dict) -> object:
    """A stored teacher's settings; one stored before `teachers[].augment` augmented as its config's section said."""
    if not isinstance(settings, dict) or "augment" in settings:
        return settings
    augment = trained_with.get("augment")
    return {**settings, "augment": isinstance(augment, dict) and augment.get("enabled") is True}


def load_legacy_pt(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from a PyTorch .pt/.pth file, read with torch's weights-only unpickler and nothing else."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except UnpicklingError as error:
        raise CheckpointError(f"{os.fspath(path)}: refused: {refusal_reason(error)}, and unpickling that could run "
                              f"code; {WEIGHTS_ONLY}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{os.fspath(path)}: expected a flat state dict of name -> Tensor, "
                              f"got {type(state).__name__}")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{os.fspath(path)}: expected a flat state dict of name -> Tensor; "
                              f"entries that are not: {bad}")
    return state


def refusal_reason(error: UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its message: the global a payload would have called."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    return f"it references {found.group(1)}" if found else "it holds more than tensors and plain containers"


def pickled_weights(source: str) -> str:
    """The pickled weight file(s) transformers reads from a local teacher directory, for error messages."""
    files = sorted(p.name for p in Path(source).glob("*.bin")) if Path(source).is_dir() else []
    return ", ".join(f"{source.rstrip('/')}/{name}" for name in files[:3]) or source
