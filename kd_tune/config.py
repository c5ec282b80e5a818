"""One typed, frozen configuration, validated once when it is loaded.

Every section is a frozen pydantic model that forbids unknown keys. `load_config` reports every problem in a file
at once, each with its dotted field path, the bad value and what is allowed; nothing starts on an invalid file.
`Config.replace` is the one way to change a setting afterwards: it validates again. Loading a config imports no
torch: the registries' names are listed here, and a contract test keeps them equal to kd_tune.models'.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from kd_tune.errors import KdTuneError
from kd_tune.metrics import METRICS, RANKABLE

DEFAULT_CONFIG_NAME = "default.yaml"
# The names kd_tune.distill and kd_tune.models implement; here so that validating a config needs no torch.
ALPHA_SCHEDULES = ("constant", "linear", "cosine", "step")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")
TEACHER_COMBINATIONS = ("mean", "confidence")
STUDENT_NAMES = ("bc_resnet", "ds_cnn", "tc_resnet")
TEACHER_ARCHS = ("cnn", "data2vec_audio", "hubert", "wav2vec2", "wavlm", "whisper")
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
Count = Annotated[int, Field(ge=1)]


class Section(BaseModel):
    # strict: "0.5" is not a number and "yes" is not a bool; a typo fails instead of being coerced.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DataConfig(Section):
    root: str = "data/hey_nova"
    wakeword: str = Field("hey nova", min_length=2, max_length=64)
    synth_size: Literal["small", "default"] = "default"
    synth_seed: int = 0
    hard_negative_weight: Positive = 2.0

    @field_validator("root")
    @classmethod
    def _root_exists(cls, root: str, info: ValidationInfo) -> str:
        if (info.context or {}).get("check_paths") and not Path(root).is_dir():
            raise ValueError(f"data directory {root!r} does not exist (allowed: an existing directory; "
                             "create one with `kd-tune data synth --out DIR`)")
        return root


class FeaturesConfig(Section):
    n_mels: int = Field(40, ge=8, le=128)
    window_ms: float = Field(25.0, gt=0, le=100)
    hop_ms: float = Field(10.0, gt=0, le=50)


class AugmentConfig(Section):
    enabled: bool = True
    time_shift_ms: float = Field(100.0, ge=0, le=500)
    gain_db: float = Field(6.0, ge=0, le=30)
    noise_prob: Fraction = 0.5
    snr_db_min: float = Field(5.0, ge=-10, le=60)
    snr_db_max: float = Field(20.0, ge=-10, le=60)
    reverb_prob: Fraction = 0.3
    freq_mask_bins: int = Field(5, ge=0)
    time_mask_frames: int = Field(10, ge=0)
    views: Count = 4  # seeded augmentation views per clip served from the teacher-output cache

    @model_validator(mode="after")
    def _snr_order(self) -> AugmentConfig:
        if self.snr_db_min > self.snr_db_max:
            raise ValueError(f"snr_db_min {self.snr_db_min} > snr_db_max {self.snr_db_max} (allowed: min <= max)")
        return self


class StudentConfig(Section):
    name: str = "tc_resnet"
    width: float = Field(1.0, gt=0, le=4)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return _registered(name, STUDENT_NAMES, "student")


class TeacherConfig(Section):
    name: str = Field(pattern=NAME_PATTERN)
    arch: str
    source: str = "base"  # "tiny" | "base" (random init) | a Hugging Face id | a local directory
    epochs: Count = 3
    batch_size: Count = 32
    lr: Positive = 1e-3
    weight_decay: float = Field(1e-2, ge=0)
    freeze_feature_encoder: bool = True

    @field_validator("arch")
    @classmethod
    def _known(cls, arch: str) -> str:
        return _registered(arch, TEACHER_ARCHS, "teacher")


class DistillationConfig(Section):
    teachers: list[str] = Field(default_factory=list, description="teacher names; empty = every configured teacher")
    combine: Literal[TEACHER_COMBINATIONS] = "mean"
    alpha_schedule: Literal[ALPHA_SCHEDULES] = "constant"
    alpha_start: Fraction = 0.5
    alpha_end: Fraction = 0.5
    alpha_step_points: Annotated[tuple[Annotated[float, Field(gt=0, lt=1)], ...], Field(strict=False)] = (0.5,)
    temperature_schedule: Literal[TEMPERATURE_SCHEDULES] = "constant"
    temperature_start: Positive = 4.0
    temperature_end: Positive = 4.0
    teacher_mode: Literal["live", "cache"] = "live"
    teacher_device: Literal["auto", "cpu"] = "auto"
    teacher_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_nonfinite_steps: Count = 10

    @field_validator("alpha_step_points")
    @classmethod
    def _increasing(cls, points: tuple[float, ...]) -> tuple[float, ...]:
        if not points or any(a >= b for a, b in zip(points, points[1:])):
            raise ValueError(f"alpha_step_points {list(points)} must be a non-empty, strictly increasing list of "
                             "progress fractions in (0, 1)")
        return points


class TrainingConfig(Section):
    epochs: Count = 6
    batch_size: int | Literal["auto"] = Field(64, union_mode="left_to_right")
    lr: Positive = 3e-3
    weight_decay: float = Field(1e-2, ge=0)
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    grad_clip_norm: Positive = 5.0
    mixed_precision: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    target_fa_per_hour: Positive = 30.0
    refractory_seconds: float = Field(1.0, ge=0)
    eval_hop_ms: float = Field(100.0, gt=0, le=1000)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, batch_size: int | str) -> int | str:
        if isinstance(batch_size, int) and batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1 or 'auto'")
        return batch_size


class TuneConfig(Section):
    num_samples: Count = 6
    metric: Literal[RANKABLE] = "frr_at_target_fa"
    max_concurrent_trials: Count = 2
    workers_per_trial: Count = 1
    cpus_per_worker: Positive = 1.0
    use_gpu: bool = False
    asha_grace_period: Count = 2
    asha_reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    max_failures: Annotated[int, Field(ge=0)] = 2
    seed: int = 0

    @property
    def mode(self) -> str:
        return METRICS[self.metric].goal


class StorageConfig(Section):
    root: str = "runs"  # a local or NFS path, or s3://bucket/prefix
    endpoint_override: str | None = None  # for S3-compatible stores, e.g. http://127.0.0.1:9000
    region: str | None = None
    keep_best: Count = 2

    @field_validator("root")
    @classmethod
    def _no_credentials(cls, root: str) -> str:
        if re.search(r"(access_key|secret_key|session_token)=", root):
            raise ValueError("credentials in the storage URI are refused (allowed: credentials from the environment "
                             "or the standard AWS config files only)")
        return root


class Config(Section):
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    augment: AugmentConfig = AugmentConfig()
    student: StudentConfig = StudentConfig()
    teachers: list[TeacherConfig] = Field(default_factory=lambda: [TeacherConfig(name="cnn", arch="cnn")], min_length=1)
    distillation: DistillationConfig = DistillationConfig()
    training: TrainingConfig = TrainingConfig()
    tune: TuneConfig = TuneConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _teacher_names(self) -> Config:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: duplicate names in {names} (allowed: unique names)")
        unknown = [n for n in self.distillation.teachers if n not in names]
        if unknown:
            raise ValueError(f"distillation.teachers: {unknown} are not configured teachers (allowed: {names})")
        return self

    def teacher(self, name: str) -> TeacherConfig:
        return next(t for t in self.teachers if t.name == name)

    @property
    def distill_teachers(self) -> list[TeacherConfig]:
        """The teachers a distillation run uses: the listed ones, or every configured teacher."""
        wanted = self.distillation.teachers or [t.name for t in self.teachers]
        return [self.teacher(n) for n in wanted]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def replace(self, changes: dict[str, Any], *, source: str = "<changed settings>") -> Config:
        """A copy with `{"section.key": value}` changed, validated again and with local paths made absolute."""
        raw = self.to_dict()
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[leaf] = value
        return with_absolute_paths(validate(raw, source=source))


class ConfigError(KdTuneError, ValueError):
    """Every problem found in one configuration, one per line."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"invalid configuration {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def _registered(name: str, registry: tuple[str, ...], what: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r} (allowed: {', '.join(sorted(registry))})")
    return name


def format_problem(error: dict) -> str:
    """One pydantic error as `dotted.path: message (got value)`."""
    path = ".".join(str(p) for p in error["loc"]) or "<root>"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key (allowed: the keys shown by `kd-tune config show`)"
    bad = error.get("input")
    shown = "" if isinstance(bad, dict) else f" (got {bad!r})"
    return f"{path}: {message}{shown}"


def validate(raw: Any, *, source: str = "<config>", check_paths: bool = False) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"<root>: expected a mapping of sections, got {type(raw).__name__}"])
    try:
        return Config.model_validate(raw, context={"check_paths": check_paths})
    except ValidationError as e:
        raise ConfigError(source, [format_problem(err) for err in e.errors()]) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.key=value` overrides, each value parsed as YAML (so `3` is an int and `cosine` a string)."""
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep or not dotted:
            raise ConfigError("--set", [f"{item!r}: expected section.key=value"])
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return raw


def merged(base: dict, override: dict) -> dict:
    """`override` over `base`, section by section: a file only needs the keys it changes."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def default_raw() -> dict:
    return yaml.safe_load(resources.files("kd_tune").joinpath(DEFAULT_CONFIG_NAME).read_text())


def load_config(path: str | Path | None = None, *, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Load a YAML file over the embedded default, apply overrides and validate everything at once."""
    source = str(path) if path else f"<embedded {DEFAULT_CONFIG_NAME}>"
    if path is None:
        raw = default_raw()
    else:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(source, [f"cannot read the file: {e.strerror}"]) from None
        except yaml.YAMLError as e:
            raise ConfigError(source, [f"not valid YAML: {e}"]) from None
    if isinstance(raw, dict):
        raw = apply_overrides(merged(default_raw(), raw) if path else raw, list(overrides))
    return with_absolute_paths(validate(raw, source=source, check_paths=check_paths))


def with_absolute_paths(config: Config) -> Config:
    """Local paths resolved against the current directory once, here: Ray workers run in other directories."""
    data = config.data.model_copy(update={"root": os.path.abspath(config.data.root)})
    root = config.storage.root
    store = config.storage.model_copy(update={"root": root if "://" in root else os.path.abspath(root)})
    return config.model_copy(update={"data": data, "storage": store})


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)

