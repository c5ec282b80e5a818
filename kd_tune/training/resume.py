"""What `fit` saves at the end of every epoch and resumes from: the run's counters, the student and the optimizer as
safetensors, everything else as JSON. No pickle."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_tune.config import Config
from kd_tune.store.checkpoint import Checkpoint, load_state_dict_strict, save_checkpoint

STUDENT_KIND = "student"  # the kind of every checkpoint `fit` saves


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0  # non-finite steps skipped so far
    consecutive_skips: int = 0


def optimizer_to_safe(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (`state.<param>.<slot>`) and JSON for everything else."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for param, slots in state_dict["state"].items():
        state[str(param)] = {}
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{slot}"] = value
            else:
                state[str(param)][slot] = value
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def optimizer_from_safe(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """The inverse of optimizer_to_safe, ready for optimizer.load_state_dict."""
    state = {int(param): dict(slots) for param, slots in meta["state"].items()}
    for key, value in tensors.items():
        _, param, slot = key.split(".", 2)
        state.setdefault(int(param), {})[slot] = value
    return {"state": state, "param_groups": [dict(group) for group in meta["param_groups"]]}


def save_training_checkpoint(parent: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                             state: TrainState, config: Config, metrics: dict, *, name: str | None = None) -> Path:
    """Student, optimizer tensors and RNG state as safetensors; everything else as JSON. No pickle.

    name: the run (or sweep trial) the checkpoint belongs to, bound by its signature."""
    opt_tensors, opt_json = optimizer_to_safe(optimizer.state_dict())
    save_checkpoint(parent, "checkpoint", {"model": student.state_dict(), "optimizer": opt_tensors,
                                           "rng": {"torch": torch.get_rng_state()}},
                    kind=STUDENT_KIND, name=name, config=config.to_dict(), epoch=state.epoch, step=state.step,
                    metrics=metrics,
                    extra={"optimizer": opt_json, "skipped_steps": state.skipped_steps,
                           "student": config.student.model_dump()})
    return parent / "checkpoint"


def restore(checkpoint: Checkpoint, student: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    load_state_dict_strict(student, checkpoint.tensors["model"])
    optimizer.load_state_dict(optimizer_from_safe(checkpoint.tensors["optimizer"],
                                                  checkpoint.manifest["extra"]["optimizer"]))
    torch.set_rng_state(checkpoint.tensors["rng"]["torch"])
    m = checkpoint.manifest
    return TrainState(step=m["step"], epoch=m["epoch"], skipped_steps=m["extra"]["skipped_steps"])
