"""Search spaces: YAML names and ranges -> an Optuna define-by-run function -> one validated config per trial.

Every key of a space maps to one config field (TARGETS). The built-in spaces ship inside the package
(kd_tune/search_spaces/, also reachable as ./search_spaces in a checkout) and resolve by name, e.g. `smoke`. A
teacher choice may name an ensemble: `cnn+wav2vec2`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from kd_tune.config import ALPHA_SCHEDULES, TEMPERATURE_SCHEDULES, Config, ConfigError, Section, format_problem
from kd_tune.yamlfile import read_yaml

ENSEMBLE_JOIN = "+"  # teacher choice "cnn+wav2vec2": both, combined as distillation.combine says


class Choice(Section):
    choices: list[str | float] = Field(min_length=1)

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, self.choices)


class Range(Section):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be < high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)


class SearchSpace(Section):
    """What a sweep searches; every key maps to one config field (see TARGETS)."""

    teacher: Choice
    alpha_schedule: Choice
    alpha_start: Range
    alpha_end: Range | None = None  # sampled only for a non-constant schedule
    alpha_step_point: Range | None = None  # sampled only for the step schedule
    temperature: Range
    temperature_schedule: Choice | None = None
    temperature_end: Range | None = None  # sampled only for a non-constant temperature schedule
    lr: Range | None = None
    weight_decay: Range | None = None
    student_width: Choice | None = None

    @model_validator(mode="after")
    def _values_allowed(self) -> SearchSpace:
        _subset("alpha_schedule", self.alpha_schedule.choices, ALPHA_SCHEDULES)
        if self.temperature_schedule:
            _subset("temperature_schedule", self.temperature_schedule.choices, TEMPERATURE_SCHEDULES)
        for name in ("alpha_start", "alpha_end", "alpha_step_point"):
            r = getattr(self, name)
            if r and not (0 <= r.low and r.high <= 1):
                raise ValueError(f"{name}: [{r.low}, {r.high}] must lie within [0, 1]")
        if self.temperature.low <= 0:
            raise ValueError(f"temperature.low {self.temperature.low} must be > 0")
        if "step" in self.alpha_schedule.choices and not self.alpha_step_point:
            raise ValueError("alpha_step_point: required when alpha_schedule may be 'step'")
        if self.temperature_schedule and set(self.temperature_schedule.choices) - {"constant"} and \
                not self.temperature_end:
            raise ValueError("temperature_end: required when temperature_schedule may be other than 'constant'")
        return self

    @property
    def teacher_names(self) -> list[str]:
        """Every teacher some trial may distil from: the members of ensembles too, each once."""
        return list(dict.fromkeys(n for choice in self.teacher.choices for n in str(choice).split(ENSEMBLE_JOIN)))

    def check_teachers(self, config: Config, *, source: str) -> None:
        known = [t.name for t in config.teachers]
        unknown = [c for c in self.teacher.choices if not set(str(c).split(ENSEMBLE_JOIN)) <= set(known)]
        if unknown:
            raise ConfigError(source, [f"teacher.choices: {unknown} are not configured teachers (allowed: {known}, "
                                       f"or several joined by {ENSEMBLE_JOIN!r}: an ensemble)"])


def _subset(name: str, values: list, allowed: tuple) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name}.choices: {bad} not allowed (allowed: {', '.join(allowed)})")


def load_search_space(name_or_path: str | Path) -> SearchSpace:
    """A YAML search space from a file, or a built-in one by name (`default`, `smoke`)."""
    path = Path(name_or_path)
    builtin = resources.files("kd_tune").joinpath("search_spaces", f"{name_or_path}.yaml")
    source = path if path.exists() or path.suffix else builtin
    try:
        raw = read_yaml(source, source=str(name_or_path))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(str(name_or_path), [f"cannot read the search space: {e} (allowed: a YAML file, or a "
                                              f"built-in name: {', '.join(builtin_spaces())})"]) from None
    return space_from(raw, source=str(name_or_path))


def space_from(raw: Any, *, source: str) -> SearchSpace:
    """A search space from its parsed YAML; a ConfigError naming `source` and every field that is wrong."""
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, [format_problem(err) for err in e.errors()]) from None


def builtin_spaces() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("kd_tune").joinpath("search_spaces").iterdir()
                  if p.name.endswith(".yaml"))


class SpaceSampler:
    """Optuna define-by-run function: conditional parameters are sampled only where their schedule uses them."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> None:
        s = self.space
        s.teacher.suggest(trial, "teacher")
        schedule = s.alpha_schedule.suggest(trial, "alpha_schedule")
        s.alpha_start.suggest(trial, "alpha_start")
        if schedule != "constant" and s.alpha_end:
            s.alpha_end.suggest(trial, "alpha_end")
        if schedule == "step":
            assert s.alpha_step_point is not None  # _values_allowed requires it where "step" is a choice
            s.alpha_step_point.suggest(trial, "alpha_step_point")
        s.temperature.suggest(trial, "temperature")
        if s.temperature_schedule and s.temperature_schedule.suggest(trial, "temperature_schedule") != "constant":
            assert s.temperature_end is not None  # _values_allowed requires it for a non-constant choice
            s.temperature_end.suggest(trial, "temperature_end")
        for name in ("lr", "weight_decay", "student_width"):
            if getattr(s, name):
                getattr(s, name).suggest(trial, name)
# search-space parameter -> (config section, key, how the value is stored)
TARGETS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "teacher": ("distillation", "teachers", lambda v: v.split(ENSEMBLE_JOIN)),
    "alpha_schedule": ("distillation", "alpha_schedule", str),
    "alpha_start": ("distillation", "alpha_start", float),
    "alpha_end": ("distillation", "alpha_end", float),
    "alpha_step_point": ("distillation", "alpha_step_points", lambda v: [v]),
    "temperature": ("distillation", "temperature_start", float),
    "temperature_schedule": ("distillation", "temperature_schedule", str),
    "temperature_end": ("distillation", "temperature_end", float),
    "lr": ("training", "lr", float),
    "weight_decay": ("training", "weight_decay", float),
    "student_width": ("student", "width", float),
}


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's parameters; constant schedules keep their start value throughout."""
    changes = {f"{section}.{key}": convert(params[name]) for name, (section, key, convert) in TARGETS.items()
               if name in params}
    d = base.distillation
    if params.get("alpha_schedule") == "constant" or "alpha_end" not in params:
        changes["distillation.alpha_end"] = changes.get("distillation.alpha_start", d.alpha_start)
    if params.get("temperature_schedule", "constant") == "constant" or "temperature_end" not in params:
        changes["distillation.temperature_end"] = changes.get("distillation.temperature_start", d.temperature_start)
    return base.replace(changes, source=f"trial parameters {params}")


# ---------------------------------------------------------------- a trial's folder

TRIAL_PREFIX = "trial_"
DIRNAME_PARAMS = ("teacher", "alpha_schedule")  # what a trial's folder and TensorBoard run show besides its id


def trial_dirname(trial_id: str, params: dict) -> str:
    """trial_<id>_<teacher>_<alpha schedule>: Tune's folder for the trial, so also its TensorBoard run's name. The id
    comes first and ends at the next "_" (Tune's search-generated ids are 8 hex digits): trial_id_of gives it back."""
    # an ensemble's "+" becomes "-" (no teacher name has one): some S3 clients read "+" in a key as a space
    return TRIAL_PREFIX + "_".join([trial_id, *(str(params[name]).replace("+", "-") for name in DIRNAME_PARAMS)])


def trial_id_of(dirname: str) -> str:
    """The trial id in a folder name trial_dirname made (a path's last part)."""
    return dirname.rsplit("/", 1)[-1].removeprefix(TRIAL_PREFIX).split("_", 1)[0]
