"""One typed, frozen configuration, validated once when it is loaded.

Frozen pydantic sections forbid unknown keys and non-finite floats. `load_config` reports every problem of a file
at once, on one line, each with its dotted path, the bad value (cut short) and what is allowed. `read_yaml` and
`parse_yaml` bound size, nesting and alias expansion before building anything. `Config.replace` validates again.
Loading a config imports no torch: the registries' names are listed here (a contract test keeps them in step).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, \
    model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from kd_tune.errors import SHOWN_CHARS, ConfigError, shown
from kd_tune.metrics import METRICS, RANKABLE
from kd_tune.uris import endpoint_problem, root_problem
from kd_tune.yamlfile import parse_yaml, read_yaml

DEFAULT_CONFIG_NAME = "default.yaml"
# The names training.distill and training.models implement; here so that validating a config needs no torch.
AlphaSchedule = Literal["constant", "linear", "cosine", "step"]
TemperatureSchedule = Literal["constant", "linear", "cosine"]
TeacherCombination = Literal["mean", "confidence"]
ALPHA_SCHEDULES = get_args(AlphaSchedule)
TEMPERATURE_SCHEDULES = get_args(TemperatureSchedule)
TEACHER_COMBINATIONS = get_args(TeacherCombination)
STUDENT_NAMES = ("bc_resnet", "ds_cnn", "tc_resnet")
TEACHER_ARCHS = ("cnn", "data2vec_audio", "hubert", "wav2vec2", "wavlm", "whisper")
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"

# Count caps: far above any useful run, low enough that a typo (1e29 epochs) is refused instead of running forever.
MAX_SEED = 2**31 - 1  # Optuna's TPESampler seeds numpy (< 2^32) and kd_tune adds epoch and view offsets to seeds
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 8192  # 1 s clips: 8192 x 16000 float32 is 0.5 GB per batch
MAX_VIEWS = 64  # each view is one more teacher pass over every training clip in the cache
MAX_TRIALS = 10_000
MAX_SYNTH_TRAIN_HOURS = 24.0  # of synthetic long/train/ speech: ~2.5 min of synthesis per hour on 2 cores
MAX_WORKERS = 1024  # trials at once, Train workers per trial, CPUs per worker: beyond any cluster kd_tune targets
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
CREDENTIAL_ERROR = "credentials"  # a pydantic error type whose bad value is never shown
CREDENTIAL_QUERY = re.compile(r"key|secret|token|passw|credential", re.IGNORECASE)

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Epochs = Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
BatchSize = Annotated[int, Field(ge=2, le=MAX_BATCH_SIZE)]  # a batch of one would train BatchNorm on one clip
Workers = Annotated[int, Field(ge=1, le=MAX_WORKERS)]
PathText = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]


class Section(BaseModel):
    # strict: "0.5" is not a number and "yes" is not a bool; a typo fails instead of being coerced.
    # allow_inf_nan=False: .inf or .nan in any float field (lr, temperatures, clip norms) is refused.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


def _voice_file(path: str, info: ValidationInfo) -> str:
    """A piper voice model's path (data.voices.N): its name ends in .onnx; when paths are checked, it exists with its
    .onnx.json beside it (synthesis checks the files' contents)."""
    allowed = "allowed: a piper voice model NAME.onnx with its config NAME.onnx.json beside it"
    if not path.endswith(".onnx"):
        raise ValueError(f"not a piper voice model, its name does not end in .onnx ({allowed})")
    if (info.context or {}).get("check_paths"):
        missing = [p for p in (path, f"{path}.json") if not os.path.isfile(p)]  # isfile never raises
        if missing:
            raise ValueError(f"{shown(missing[0])} is not a file ({allowed})")
    return path


class DataConfig(Section):
    root: PathText = "data/hey_nova"
    wakeword: str = Field("hey nova", min_length=2, max_length=64)
    synth_size: Literal["small", "default", "large"] = "default"
    synth_seed: Seed = 0
    synth_new_speakers: bool = True  # pitch, formant and speed changes make new speakers of the training voices
    # long/train/'s length in hours where not the size's (1 h at the default size): more negative speech to learn from
    synth_train_hours: float | None = Field(None, gt=0, le=MAX_SYNTH_TRAIN_HOURS)
    hard_negative_weight: Positive = 2.0
    # windows cutting each training positive inside long/train/ audio, labelled by the teacher alone (datasets.data)
    straddles_per_positive: int = Field(2, ge=0, le=8)
    # engines whose clips (manifest voice `<engine>:...`) are left out of every split: leave-one-engine-out runs
    exclude_engines: Annotated[tuple[Literal["piper", "espeak", "user"], ...], Field(strict=False)] = ()
    # piper voice models a user has (.onnx with .onnx.json beside it): synthesis shares piper's part among them and joe
    voices: list[Annotated[PathText, AfterValidator(_voice_file)]] = Field(default_factory=list)

    @field_validator("root")
    @classmethod
    def _root_exists(cls, root: str, info: ValidationInfo) -> str:
        if (info.context or {}).get("check_paths") and not os.path.isdir(root):  # isdir never raises
            raise ValueError(f"data directory {shown(root)} does not exist (allowed: an existing directory; "
                             "create one with `kd-tune data synth --out DIR`)")
        return root


class FeaturesConfig(Section):
    n_mels: int = Field(40, ge=8, le=128)
    window_ms: float = Field(25.0, gt=0, le=100)
    hop_ms: float = Field(10.0, gt=0, le=50)
    normalize: Literal["none", "mean", "pcen"] = "pcen"  # per window: see features.NORMALIZATIONS


class AugmentConfig(Section):
    enabled: bool = True
    time_shift_ms: float = Field(100.0, ge=0, le=500)
    gain_db: float = Field(6.0, ge=0, le=30)
    noise_prob: Fraction = 0.5
    snr_db_min: float = Field(0.0, ge=-10, le=60)
    snr_db_max: float = Field(20.0, ge=-10, le=60)
    # Relative odds of the noise kinds: the data set's background clips, coloured noise, generated music-like tones,
    # generated transients (clicks, knocks). Without background clips the bank's share goes to coloured noise.
    noise_bank_weight: Fraction = 0.4
    noise_coloured_weight: Fraction = 0.2
    noise_tones_weight: Fraction = 0.2
    noise_transients_weight: Fraction = 0.2
    reverb_prob: Fraction = 0.3
    band_limit_prob: Fraction = 0.25  # a microphone's or codec's band: one low-pass and one high-pass
    lowpass_hz_min: float = Field(3400.0, ge=1000, le=8000)  # 3.4 kHz is the telephone band, 8 kHz no low-pass
    lowpass_hz_max: float = Field(8000.0, ge=1000, le=8000)
    highpass_hz_min: float = Field(50.0, ge=10, le=1000)
    highpass_hz_max: float = Field(400.0, ge=10, le=1000)
    eq_prob: Fraction = 0.25  # random EQ: a low shelf, two peaks and a high shelf
    eq_db: float = Field(6.0, ge=0, le=24)  # each band's gain is uniform in +-eq_db
    clip_prob: Fraction = 0.1
    clip_db: float = Field(12.0, ge=0, le=40)  # the peak is driven up to this far past the clipping level
    bit_depth_prob: Fraction = 0.1
    bits_min: int = Field(8, ge=2, le=16)
    bits_max: int = Field(12, ge=2, le=16)
    level_prob: Fraction = 0.0  # clips moved to a random peak level: a near or far, loud or soft talker
    level_dbfs_min: float = Field(-50.0, ge=-90, le=0)
    level_dbfs_max: float = Field(-1.0, ge=-90, le=0)
    freq_mask_bins: int = Field(5, ge=0, le=128)  # at most every mel band (n_mels <= 128)
    time_mask_frames: int = Field(10, ge=0, le=1000)  # at most the frames of a 1 s clip at a 1 ms hop
    views: int = Field(4, ge=1, le=MAX_VIEWS)  # seeded views per clip, epoch e hears view e % views

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for low, high in [("snr_db_min", "snr_db_max"), ("lowpass_hz_min", "lowpass_hz_max"),
                          ("highpass_hz_min", "highpass_hz_max"), ("bits_min", "bits_max"),
                          ("level_dbfs_min", "level_dbfs_max")]:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} {getattr(self, low)} > {high} {getattr(self, high)} (allowed: min <= max)")
        weights = [self.noise_bank_weight, self.noise_coloured_weight, self.noise_tones_weight,
                   self.noise_transients_weight]
        if self.noise_prob > 0 and not any(weights):
            raise ValueError(f"noise_prob is {self.noise_prob} but every noise_*_weight is 0 (allowed: at least one "
                             "noise_*_weight > 0, or noise_prob 0)")
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
    source: PathText = "base"  # "tiny" | "base" (random init) | a Hugging Face id | a local directory
    epochs: Epochs = 3
    batch_size: BatchSize = 32
    lr: Positive = 1e-3
    weight_decay: float = Field(1e-2, ge=0)
    freeze_feature_encoder: bool = True
    augment: bool = False  # fine-tune with the augment section's effects too; off, they are the students' alone

    @field_validator("arch")
    @classmethod
    def _known(cls, arch: str) -> str:
        return _registered(arch, TEACHER_ARCHS, "teacher")


class DistillationConfig(Section):
    teachers: list[str] = Field(default_factory=list, description="teacher names; empty = every configured teacher")
    combine: TeacherCombination = "mean"
    alpha_schedule: AlphaSchedule = "constant"
    alpha_start: Fraction = 0.5
    alpha_end: Fraction = 0.5
    alpha_step_points: Annotated[tuple[Annotated[float, Field(gt=0, lt=1)], ...], Field(strict=False)] = (0.5,)
    temperature_schedule: TemperatureSchedule = "constant"
    temperature_start: Positive = 4.0
    temperature_end: Positive = 4.0
    teacher_mode: Literal["live", "cache"] = "live"
    # clean: the teacher labels each clip from its clean audio, the student learns to hear that through the effects
    teacher_hears: Literal["augmented", "clean"] = "clean"
    teacher_device: Literal["auto", "cpu"] = "auto"
    teacher_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_nonfinite_steps: int = Field(10, ge=1, le=1_000_000)

    @field_validator("alpha_step_points")
    @classmethod
    def _increasing(cls, points: tuple[float, ...]) -> tuple[float, ...]:
        if not points or any(a >= b for a, b in pairwise(points)):
            raise ValueError(f"alpha_step_points {shown(list(points))} must be a non-empty, strictly increasing "
                             "list of progress fractions in (0, 1)")
        return points


class TrainingConfig(Section):
    epochs: Epochs = 6
    batch_size: int | Literal["auto"] = Field(64, union_mode="left_to_right")
    lr: Positive = 3e-3
    weight_decay: float = Field(1e-2, ge=0)
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    grad_clip_norm: Positive = 5.0
    mixed_precision: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: Seed = 0
    target_fa_per_hour: Positive = 2.0
    refractory_seconds: float = Field(1.0, ge=0)
    eval_hop_ms: float = Field(100.0, ge=10, le=1000)  # an exported card (deploy.detect) needs a hop of >= 10 ms
    mined_negatives: int = Field(0, ge=0, le=100_000)  # per epoch, from long/train/ by the student (training.mining)
    # hours of long/train/'s windows a student epoch reads, a fresh share each epoch; None: all. Cheaper, but measured
    # worse than all of them (README, the 3 h training stream), hence not the default
    long_hours_per_epoch: float | None = Field(None, gt=0, le=MAX_SYNTH_TRAIN_HOURS)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, batch_size: int | str) -> int | str:
        if isinstance(batch_size, int) and not 2 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size {shown(batch_size)} must be 2 to {MAX_BATCH_SIZE} or 'auto'")
        return batch_size


class TuneConfig(Section):
    num_samples: int = Field(6, ge=1, le=MAX_TRIALS)
    # RANKABLE is computed from METRICS: pydantic takes the tuple as the literal's values, mypy only written ones
    metric: Literal[RANKABLE] = "frr_conditions"  # type: ignore[valid-type]
    max_concurrent_trials: Workers = 2
    workers_per_trial: Workers = 1
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_WORKERS)
    use_gpu: bool = False
    asha_grace_period: Epochs = 2
    asha_reduction_factor: Annotated[float, Field(gt=1, le=100)] = 2.0
    max_failures: Annotated[int, Field(ge=0, le=100)] = 2
    seed: Seed = 0

    @property
    def mode(self) -> str:
        goal = METRICS[self.metric].goal
        assert goal is not None  # RANKABLE holds only the metrics with a goal
        return goal


class StorageConfig(Section):
    root: PathText = "runs"  # a local or NFS path, or s3://bucket/prefix
    teachers: PathText | None = None  # where fine-tuned teachers live; None: <root>/teachers
    endpoint_override: PathText | None = None  # for S3-compatible stores, e.g. http://127.0.0.1:9000
    region: str | None = Field(None, max_length=64)
    keep_best: int = Field(2, ge=1, le=1000)

    @property
    def teachers_uri(self) -> str:
        return self.teachers or f"{self.root.rstrip('/')}/teachers"

    @field_validator("root", "teachers", "endpoint_override")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri is not None and has_credentials(uri):  # the error type keeps the secret out of the message
            raise PydanticCustomError(CREDENTIAL_ERROR, "credentials in a URI are refused (allowed: credentials "
                                      "from the environment or the standard AWS config files only)")
        return uri

    @field_validator("root", "teachers", "endpoint_override")
    @classmethod
    def _usable(cls, uri: str | None, info: ValidationInfo) -> str | None:
        problem = uri and (endpoint_problem if info.field_name == "endpoint_override" else root_problem)(uri)
        if problem:  # found here, not as a traceback from pyarrow when the first file is written
            raise ValueError(problem)
        return uri


def has_credentials(uri: str) -> bool:
    """Whether a URI carries a user name, password or key: `s3://user:pw@bucket`, `?secret_key=...`."""
    if re.search(r"(access_key|secret_key|session_token)=", uri):
        return True
    if "://" not in uri:
        return False
    try:
        parts = urlsplit(uri)
    except ValueError:  # a malformed authority: pyarrow cannot use it either; be safe
        return True
    return "@" in parts.netloc or any(CREDENTIAL_QUERY.search(k) for k, _ in parse_qsl(parts.query))


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
            set_dotted(raw, dotted, value, source=source)
        return with_absolute_paths(validate(raw, source=source))


def _registered(name: str, registry: tuple[str, ...], what: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {what} {shown(name)} (allowed: {', '.join(sorted(registry))})")
    return name


def format_problem(error: ErrorDetails) -> str:
    """One pydantic error as `dotted.path: message (got value)`, the value cut short (or hidden if secret)."""
    path = ".".join(str(p) for p in error["loc"]) or "<root>"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key (allowed: the keys shown by `kd-tune config show`)"
    bad = error.get("input")
    hidden = isinstance(bad, dict) or error["type"] == CREDENTIAL_ERROR
    return f"{path}: {message}" + ("" if hidden else f" (got {shown(bad)})")


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
        dotted, sep, text = item.partition("=")
        if not sep or not dotted:
            raise ConfigError("--set", [f"{shown(item)} has no key; allowed: section.key=value, e.g. "
                                        "training.epochs=3"])
        source = f"--set {dotted[:SHOWN_CHARS]}"
        set_dotted(raw, dotted, parse_yaml(text, source=source), source=source)
    return raw


def set_dotted(raw: dict, dotted: str, value: Any, *, source: str) -> None:
    """Set `section.key` (or `teachers.0.key`, a list entry by index) in raw settings; missing keys are created, so
    that validation names a misspelt one."""
    *parents, leaf = dotted.split(".")
    node = raw
    for depth, part in enumerate(parents):
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[_list_index(node, part, ".".join(parents[:depth]), source=source)]
    if isinstance(node, dict):
        node[leaf] = value
    else:
        node[_list_index(node, leaf, ".".join(parents), source=source)] = value


def _list_index(node: Any, key: str, where: str, *, source: str) -> int:
    """The index `key` names in the list `node` (at dotted path `where`); anything else is a ConfigError."""
    if not isinstance(node, list):
        raise ConfigError(source, [f"{where} holds {shown(node)}, not a section; allowed: a key inside a section, "
                                   f"e.g. --set {where}=VALUE"])
    if not (key.isdecimal() and int(key) < len(node)):
        raise ConfigError(source, [f"{where}.{key[:SHOWN_CHARS]}: not an entry of the {len(node)}-entry list {where}; "
                                   f"allowed: an index from 0 to {len(node) - 1}"])
    return int(key)


def merged(base: dict, override: dict) -> dict:
    """`override` over `base`, section by section: a file only needs the keys it changes."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def default_raw() -> dict:
    return yaml.safe_load(resources.files("kd_tune").joinpath(DEFAULT_CONFIG_NAME).read_text())


def load_config(path: str | Path | None = None, *, overrides: Sequence[str] = (), check_paths: bool = True) -> Config:
    """Load a YAML file over the embedded default, apply overrides and validate everything at once."""
    source = str(path) if path else f"<embedded {DEFAULT_CONFIG_NAME}>"
    if path is None:
        raw = default_raw()
    else:
        try:
            raw = read_yaml(Path(path), source=source) or {}
        except OSError as e:
            raise ConfigError(source, [f"cannot read the file ({e.strerror or e}); allowed: a readable YAML "
                                       "file"]) from None
    if isinstance(raw, dict):
        raw = apply_overrides(merged(default_raw(), raw) if path else raw, list(overrides))
    return with_absolute_paths(validate(raw, source=source, check_paths=check_paths))


def with_absolute_paths(config: Config) -> Config:
    """Local paths resolved against the current directory once, here: Ray workers run in other directories."""
    data = config.data.model_copy(update={"root": os.path.abspath(config.data.root)})
    s = config.storage
    store = s.model_copy(update={"root": absolute(s.root), "teachers": s.teachers and absolute(s.teachers)})
    return config.model_copy(update={"data": data, "storage": store})


def absolute(path_or_uri: str) -> str:
    return path_or_uri if "://" in path_or_uri else os.path.abspath(path_or_uri)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)

