"""Training pieces every loop shares (the Ray job and the plain baseline): schedules and the
resumable state of a run, stored as safetensors + JSON like model versions (no pickle)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class Schedule:
    """Learning rate and KL weight as functions of the optimizer step.

    lr: linear warm-up over lr_warmup_steps, then constant or cosine decay to min_lr_ratio * lr.
    beta: linear KL warm-up from 0 to beta over kl_warmup_steps (Bowman et al. 2016), so the
    decoder learns to use z before the KL term pushes the posterior onto the prior.
    """

    learning_rate: float
    total_steps: int
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    beta: float = 1.0
    kl_warmup_steps: int = 0

    def lr(self, step: int) -> float:
        if step < self.lr_warmup_steps:
            return self.learning_rate * (step + 1) / self.lr_warmup_steps
        if self.lr_schedule == "constant":
            return self.learning_rate
        progress = min(1.0, (step - self.lr_warmup_steps) / max(1, self.total_steps - self.lr_warmup_steps))
        return self.learning_rate * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def kl_weight(self, step: int) -> float:
        if step >= self.kl_warmup_steps:
            return self.beta
        return self.beta * (step + 1) / self.kl_warmup_steps


MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def save_training_state(
    directory: str | Path, model: torch.nn.Module, best_weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Everything needed to continue a run exactly: weights, best weights so far, optimizer moments, counters."""
    directory = Path(directory)
    save_file(_cpu(model.state_dict()), directory / MODEL_FILE)
    save_file(_cpu(best_weights), directory / BEST_FILE)
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value for index, slots in optimizer_state["state"].items() for name, value in slots.items()
    }
    save_file(_cpu(tensors), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps({**state, "param_groups": optimizer_state["param_groups"]}))


def load_training_state(
    directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore model and optimizer in place; returns (best weights, run state)."""
    directory = Path(directory)
    model.load_state_dict(load_file(directory / MODEL_FILE))
    state = json.loads((directory / STATE_FILE).read_text())
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(directory / OPTIMIZER_FILE).items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state.pop("param_groups")})
    return load_file(directory / BEST_FILE), state


def load_best_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / BEST_FILE)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
