"""Training pieces any loop can use (the Ray job's workers, the plain baseline): schedules, one
epoch of optimizer steps, the validation and importance-weighted sums (all-reducible), a worker's
key-hash shard as tensors, and the resumable state of a run, stored as safetensors + JSON like
model versions (no pickle). Nothing here knows about Ray."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

from vae.data.features import FeatureSchema, features_to_numpy
from vae.data.keys import is_validation, key_hash
from vae.data.normalizer import Normalizer
from vae.diagnostics import active_units, importance_weighted_nll, posterior_mean_variance
from vae.errors import InputError
from vae.losses import elbo_terms
from vae.model import VAE


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
        return self.learning_rate * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )

    def kl_weight(self, step: int) -> float:
        if step >= self.kl_warmup_steps:
            return self.beta
        return self.beta * (step + 1) / self.kl_warmup_steps


MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_REFERENCE_FILE = "reference.npz"  # the validation reference, in the final checkpoint


def save_training_state(
    directory: str | Path,
    model: torch.nn.Module,
    best_weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Everything needed to continue a run exactly: weights, best weights so far, optimizer moments,
    counters."""
    directory = Path(directory)
    save_file(_cpu(model.state_dict()), directory / MODEL_FILE)
    save_file(_cpu(best_weights), directory / BEST_FILE)
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value
        for index, slots in optimizer_state["state"].items()
        for name, value in slots.items()
    }
    save_file(_cpu(tensors), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(
        json.dumps({**state, "param_groups": optimizer_state["param_groups"]})
    )


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


def save_checkpoint_reference(
    directory: str | Path, latents: np.ndarray, scores: np.ndarray, labels: np.ndarray | None
) -> None:
    """The best weights' posterior means and anomaly scores of validation rows (and their labels):
    the version's monitoring reference and the report's plot, computed where the rows already are."""
    arrays = {"latents": latents, "scores": scores} | ({} if labels is None else {"labels": labels})
    np.savez(Path(directory) / CHECKPOINT_REFERENCE_FILE, **arrays)


def load_checkpoint_reference(directory: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    with np.load(Path(directory) / CHECKPOINT_REFERENCE_FILE, allow_pickle=False) as arrays:
        labels = arrays["labels"] if "labels" in arrays else None
        return arrays["latents"], arrays["scores"], labels


def load_best_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / BEST_FILE)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


@dataclass
class RunState:
    """Where a run stands: saved in every checkpoint, so a restarted run continues exactly."""

    epoch: int = 0  # last finished epoch
    step: int = 0  # optimizer steps so far
    history: list[dict] = field(default_factory=list)  # per-epoch metrics
    best_epoch: int = 0
    best_val: float = math.inf  # best validation loss so far (Objective.validation_loss)
    stale_epochs: int = 0  # epochs since the best, counted after KL warm-up
    final: dict | None = None  # set once the run has finished (IW-NLL, collapse check)
    resumed_from: list[int] = field(default_factory=list)  # epochs this run was restarted from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunState:
        """From a checkpoint's state.json (which also holds the optimizer's param_groups)."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in names})


@dataclass(frozen=True)
class Objective:
    """What an optimizer step minimizes and how: the schedule (learning rate, KL weight), the loss's
    settings (vae.losses.ElboTerms.loss), gradient clipping, dynamic binarization, autocast."""

    schedule: Schedule
    free_bits: float = 0.0
    trim_fraction: float = 0.0
    grad_clip_norm: float | None = None
    binarize: bool = False  # dynamic binarization of [0, 1] targets
    autocast: dict = field(default_factory=lambda: {"device_type": "cpu", "enabled": False})

    def validation_loss(self, metrics: dict) -> float:
        """What the run keeps its best weights by: the validation value of the loss it trains on, at
        the KL weight it warms up to (reconstruction + beta * KL, free bits per dimension as in
        training). beta 1 (the default): the negative ELBO. With another beta the ELBO would prefer the
        epochs before the warm-up reached it, a model that is not the one asked for."""
        kl = metrics["val_kl"]
        if self.free_bits > 0.0:
            kl = sum(max(value, self.free_bits) for value in metrics["val_kl_per_dim"])
        return metrics["val_reconstruction"] + self.schedule.beta * kl


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    objective: Objective,
    state: RunState,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of optimizer steps; advances state.step. Returns (rows, sum of reconstruction, sum
    of KL) as a float64 tensor and the largest gradient norm, both for the caller to all-reduce."""
    device, schedule = generator.device, objective.schedule
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    grad_norm_max = torch.zeros((), device=device)
    for x in batches:
        x = targets(x, objective.binarize, generator)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(state.step)
        with torch.autocast(**objective.autocast):
            terms = elbo_terms(model, x, generator=generator)
        loss = terms.loss(schedule.kl_weight(state.step), objective.free_bits, objective.trim_fraction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if objective.grad_clip_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), objective.grad_clip_norm)
            grad_norm_max = torch.maximum(grad_norm_max, grad_norm.detach())
        optimizer.step()
        state.step += 1
        rows = torch.tensor(float(len(x)), device=device)
        totals += torch.stack([rows, terms.reconstruction.detach().sum(), terms.kl.detach().sum()]).double()
    return totals, grad_norm_max


def targets(x: torch.Tensor, binarize: bool, generator: torch.Generator) -> torch.Tensor:
    """Dynamic binarization: a fresh binary sample of the [0, 1] intensities each time."""
    return torch.bernoulli(x, generator=generator) if binarize else x


@torch.no_grad()
def validation_sums(
    model: VAE, batches: Iterable[torch.Tensor], objective: Objective, generator: torch.Generator
) -> torch.Tensor:
    """Sums over validation rows (rows, reconstruction, KL, KL per dim, posterior-mean sums and
    squares), float64: all-reduce them across workers, then `validation_metrics`."""
    model.eval()
    latent_dim = model.config.latent_dim
    sums = torch.zeros(3 + 3 * latent_dim, dtype=torch.float64, device=generator.device)
    for x in batches:
        x = targets(x, objective.binarize, generator)
        with torch.autocast(**objective.autocast):
            terms = elbo_terms(model, x, generator=generator)
        mean = terms.posterior.mean.double()
        sums += torch.cat(
            [
                torch.tensor([len(x)], dtype=torch.float64, device=sums.device),
                terms.reconstruction.double().sum()[None],
                terms.kl.double().sum()[None],
                terms.posterior.kl_per_dim().double().sum(dim=0),
                mean.sum(dim=0),
                mean.pow(2).sum(dim=0),
            ]
        )
    return sums


def validation_metrics(sums: torch.Tensor, latent_dim: int) -> dict:
    """Validation ELBO terms per example, KL per dimension and active units from `validation_sums`."""
    values = sums.cpu().numpy()
    rows = max(values[0], 1.0)
    kl_per_dim = values[3 : 3 + latent_dim] / rows
    mean_sums, square_sums = values[3 + latent_dim : 3 + 2 * latent_dim], values[3 + 2 * latent_dim :]
    variance = posterior_mean_variance(rows, mean_sums, square_sums)
    return {
        "val_rows": int(values[0]),
        "val_reconstruction": values[1] / rows,
        "val_kl": values[2] / rows,
        "val_negative_elbo": (values[1] + values[2]) / rows,
        "val_kl_per_dim": [round(float(v), 5) for v in kl_per_dim],
        "val_posterior_mean_variance": [round(float(v), 5) for v in variance],
        "active_units": active_units(variance),
    }


@torch.no_grad()
def iw_nll_sums(
    model: VAE,
    batches: Iterable[torch.Tensor],
    samples: int,
    objective: Objective,
    generator: torch.Generator,
) -> torch.Tensor:
    """(rows, sum of the importance-weighted NLL), float64, over the batches: all-reducible."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=generator.device)
    for x in batches:
        x = targets(x, objective.binarize, generator)
        for chunk in x.split(256):
            nll = importance_weighted_nll(model, chunk, samples, generator)
            sums += torch.stack(
                [torch.tensor(float(len(chunk)), device=sums.device), nll.double().sum()]
            ).double()
    return sums


@dataclass
class KeyShard:
    """A worker's rows as normalized tensors, sorted by key hash (the same whatever the file layout),
    and the validation rows' labels (for the report's plot), if a label column was given."""

    train: torch.Tensor
    validation: torch.Tensor
    validation_labels: np.ndarray | None


def key_shard(
    batches: Iterable[pa.Table],
    features: FeatureSchema,
    normalizer: Normalizer,
    validation_fraction: float,
    device: torch.device,
    label_column: str | None = None,
) -> KeyShard:
    """The worker's own rows (the keys that hash to its rank, filtered before they get here), split by
    key hash into training and validation. The statistics pass validated the rows already."""
    parts: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {False: [], True: []}
    labels: list[np.ndarray] = []
    for batch in batches:
        hashes = key_hash(batch.column(features.key_column))
        matrix = features_to_numpy(batch, features, validated=True)
        validation = is_validation(hashes, validation_fraction)
        for held_out in (False, True):
            parts[held_out].append((hashes[validation == held_out], matrix[validation == held_out]))
        if label_column:
            labels.append(batch.column(label_column).to_numpy(zero_copy_only=False)[validation])
    train, _ = _sorted_tensor(parts[False], features, normalizer, device)
    validation, order = _sorted_tensor(parts[True], features, normalizer, device)
    return KeyShard(train, validation, _label_array(labels)[order] if label_column else None)


def _sorted_tensor(
    parts, features: FeatureSchema, normalizer: Normalizer, device: torch.device
) -> tuple[torch.Tensor, np.ndarray]:
    hashes = np.concatenate([h for h, _ in parts]) if parts else np.empty(0, np.uint64)
    matrix = np.concatenate([m for _, m in parts]) if parts else np.empty((0, features.dim), np.float32)
    order = np.argsort(hashes, kind="stable")
    return torch.from_numpy(normalizer(matrix[order])).to(device), order


def _label_array(parts: list[np.ndarray]) -> np.ndarray:
    labels = np.concatenate(parts) if parts else np.empty(0)
    # strings as a fixed-width unicode array: saved with the checkpoint without pickle
    return labels.astype(str) if labels.dtype == object else labels


def batches_of(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of a tensor's rows."""
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


def take_rows(batches: Iterable[torch.Tensor], max_rows: int | None) -> Iterator[torch.Tensor]:
    """The batches' first max_rows rows (all of them for None)."""
    seen = 0
    for x in batches:
        if max_rows is not None:
            if seen >= max_rows:
                return
            x = x[: max_rows - seen]
        seen += len(x)
        yield x


def derived_run_name(identity: dict) -> str:
    """A run name that is a hash of what the run computes: the same config and data resume the same run."""
    return f"vae-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}"


def claim_run(storage_path: str, run_name: str, identity: dict) -> bool:
    """Record what a run trains under <storage_path>/<run_name>/vae_run.json; refuse a run directory
    that trained something else. Returns whether the run existed (a re-run resumes it)."""
    # through JSON, so tuples compare equal to the lists read back
    identity = json.loads(json.dumps(identity))
    filesystem, root = pafs.FileSystem.from_uri(storage_path)
    path = f"{root}/{run_name}/vae_run.json"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        filesystem.create_dir(f"{root}/{run_name}", recursive=True)
        with filesystem.open_output_stream(path) as f:
            f.write(json.dumps(identity, sort_keys=True).encode())
        return False
    with filesystem.open_input_stream(path) as f:
        existing = json.loads(f.read())
    if existing != identity:
        differing = sorted(k for k in identity if identity[k] != existing.get(k))
        raise InputError(
            f"run '{run_name}' under {storage_path} was started with a different {', '.join(differing)}; "
            "choose another run_name or storage_path"
        )
    return True
