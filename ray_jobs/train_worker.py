"""The training worker: the recipe every Ray Train worker runs (ray_jobs.train is the driver's).

    setup     model (same initial weights on every rank), Adam, the run state from the latest
              checkpoint if there is one, this worker's data (its key-hash shard in memory, or
              Ray Data's streamed split), schedules
    epoch     optimizer steps over the shard -> all-reduced training sums -> validation over every
              rank's validation rows -> one line of metrics (rank 0) -> report (+ checkpoint)
    finish    best weights -> importance-weighted NLL, collapse check -> the final report

Everything the run needs to continue after a restart is in RunState, saved with each checkpoint.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from ray_jobs.config import TrainConfig
from vae import VAE, FeatureSchema, ModelConfig, Normalizer, features_to_numpy
from vae.diagnostics import collapse_warning
from vae.keys import key_hash, worker_of
from vae.training import (
    Objective,
    RunState,
    Schedule,
    batches_of,
    iw_nll_sums,
    key_shard,
    load_training_state,
    save_training_state,
    take_rows,
    train_epoch,
    validation_metrics,
    validation_sums,
)

log = logging.getLogger("ray_jobs.train")


@dataclass(frozen=True)
class WorkerSetup:
    """What the driver hands every worker."""

    config: TrainConfig
    model: ModelConfig
    features: FeatureSchema
    normalizer: Normalizer
    train_rows: int


def train_loop_per_worker(loop_config: dict) -> None:
    TrainingWorker(loop_config["setup"]).run()


class TrainingWorker:
    """One DDP worker: setup (model, optimizer, resumed state, data) -> epochs (train, validate,
    report) -> finish (best weights, importance-weighted NLL)."""

    def __init__(self, setup: WorkerSetup):
        self.config, self.setup = setup.config, setup
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        _quiet_ray_train_reports()
        torch.set_num_threads(max(1, int(self.config.cpus_per_worker)))
        self.device = ray.train.torch.get_device()
        torch.manual_seed(self.config.seed)  # identical initial weights on every rank
        self.model = VAE(setup.model).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate)
        self.best_weights = _copy(self.model)
        self.state = RunState()
        if checkpoint := ray.train.get_checkpoint():
            self._resume(checkpoint)
        # after restoring, so that every rank starts from the checkpoint
        self.ddp_model = ray.train.torch.prepare_model(self.model)
        self.data = WorkerData(setup, self.rank, self.world, self.device)
        self.objective = objective(self.config, self.data.steps_per_epoch, self.device)

    def _resume(self, checkpoint: Checkpoint) -> None:
        with checkpoint.as_directory() as checkpoint_dir:
            best_weights, state = load_training_state(checkpoint_dir, self.model, self.optimizer)
        self.best_weights = {name: t.to(self.device) for name, t in best_weights.items()}
        self.state = RunState.from_dict(state)
        if self.rank == 0:
            log.info("resumed from the checkpoint of epoch %d (step %d)", self.state.epoch, self.state.step)
        self.state.resumed_from.append(self.state.epoch)

    def run(self) -> None:
        for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
            if self.state.final is not None:
                break  # a finished run re-submitted: nothing left to do
            metrics = self.epoch(epoch)
            stop = self.record(metrics)
            last = stop or epoch == self.config.epochs
            self.report(metrics, save=last or epoch % self.config.checkpoint_every == 0)
            if stop:
                break
        if self.state.final is None:
            self.finish()

    def epoch(self, epoch: int) -> dict:
        """Train one epoch and validate; returns the epoch's metrics (all ranks agree on them)."""
        started = time.perf_counter()
        self.ddp_model.train()
        generator = torch.Generator(device=self.device).manual_seed(_seed(self.config.seed, epoch, self.rank))
        batches = self.data.train_batches(epoch)
        totals, grad_norm_max = train_epoch(
            self.ddp_model, self.optimizer, batches, self.objective, self.state, generator
        )
        train_seconds = time.perf_counter() - started
        dist.all_reduce(totals)
        rows, reconstruction, kl = totals.tolist()
        step, schedule = self.state.step - 1, self.objective.schedule
        return {
            "epoch": epoch,
            "step": self.state.step,
            "rows": int(rows),
            "reconstruction": reconstruction / rows,
            "kl": kl / rows,
            "negative_elbo": (reconstruction + kl) / rows,
            **self.validate(),
            "beta": schedule.kl_weight(step),
            "lr": schedule.lr(step),
            "grad_norm_max": float(grad_norm_max),
            "samples_per_second": round(rows / train_seconds, 1),
            "epoch_seconds": round(time.perf_counter() - started, 3),
        }

    def validate(self) -> dict:
        """Validation ELBO terms, KL per dimension and active units over all ranks' validation rows.
        The same sampling noise every epoch (a fixed seed), so epochs compare without jitter."""
        generator = torch.Generator(device=self.device).manual_seed(_seed(self.config.seed, 0, self.rank) + 1)
        sums = validation_sums(self.model, self.data.validation_batches(), self.objective, generator)
        dist.all_reduce(sums)
        return validation_metrics(sums, self.setup.model.latent_dim)

    def record(self, metrics: dict) -> bool:
        """Add an epoch to the run's history, keep the best weights; returns whether to stop early."""
        state = self.state
        state.history.append(metrics)
        if metrics["val_negative_elbo"] < state.best_val:
            state.best_val, state.best_epoch = metrics["val_negative_elbo"], metrics["epoch"]
            state.stale_epochs = 0
            self.best_weights = _copy(self.model)
        elif (
            state.step >= self.objective.schedule.kl_warmup_steps
        ):  # the ELBO is expected to worsen while beta rises
            state.stale_epochs += 1
        patience = self.config.early_stopping_patience
        stop = patience > 0 and state.stale_epochs >= patience
        state.epoch = metrics["epoch"]
        if self.rank == 0:
            log.info(epoch_line(metrics) + ("  early stop" if stop else ""))
        return stop

    def finish(self) -> None:
        """On the best weights: the importance-weighted NLL and the collapse check, then the final report."""
        divergence = _max_param_divergence(self.model)
        self.model.load_state_dict(self.best_weights)
        state = self.state
        best = state.history[state.best_epoch - 1]
        warning = collapse_warning(
            best["active_units"], self.setup.model.latent_dim, self.config.min_active_share
        )
        state.final = {
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "stopped_early": state.epoch < self.config.epochs,
            "iw_nll": self.importance_weighted_nll(),
            "iw_samples": self.config.iw_samples,
            "collapse_warning": warning,
            "resumed_from": state.resumed_from,
            "ddp_max_param_divergence": divergence,
        }
        final_metrics = {
            **best,
            **{k: v for k, v in state.final.items() if k != "resumed_from"},
            "final": True,
        }
        self.report(final_metrics, save=True)

    def importance_weighted_nll(self) -> float | None:
        if self.config.iw_samples == 0:
            return None
        generator = torch.Generator(device=self.device).manual_seed(_seed(self.config.seed, 0, self.rank) + 2)
        max_rows = math.ceil(self.config.iw_max_rows / self.world)
        batches = take_rows(self.data.validation_batches(), max_rows)
        sums = iw_nll_sums(self.model, batches, self.config.iw_samples, self.objective, generator)
        dist.all_reduce(sums)
        return float(sums[1] / sums[0]) if sums[0] else None

    def report(self, metrics: dict, save: bool) -> None:
        """Report from every rank; rank 0 attaches the checkpoint (weights are identical on all ranks).
        Ray gets the scalar metrics; per-dimension lists live in the checkpoint's history."""
        metrics = {name: value for name, value in metrics.items() if not isinstance(value, list)}
        if not (save and self.rank == 0):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            save_training_state(
                checkpoint_dir, self.model, self.best_weights, self.optimizer, self.state.to_dict()
            )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir))


class WorkerData:
    """This worker's training and validation rows as tensors on its device.

    materialize: rows are kept in memory; each worker owns the keys hashing to its rank, sorted by
    key hash, so the data order (and the run) is the same whatever the file layout. Streaming: Ray
    Data's equal split, with a local shuffle buffer."""

    def __init__(self, setup: WorkerSetup, rank: int, world: int, device: torch.device):
        self.config, self.features, self.normalizer = setup.config, setup.features, setup.normalizer
        self.rank, self.world, self.device = rank, world, device
        self.train_x: torch.Tensor | None = None
        if self.config.materialize:
            shard = ray.train.get_dataset_shard("train").iter_batches(batch_size=None, batch_format="pyarrow")
            fraction = self.config.validation_fraction
            self.train_x, self.validation_x = key_shard(
                shard, self.features, self.normalizer, rank, world, fraction, device
            )
            # DDP ranks must take the same number of steps: every rank uses as many rows as the smallest
            # shard.
            smallest = torch.tensor([len(self.train_x)], dtype=torch.int64)
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
            self.rows_per_epoch = int(smallest)
        else:
            self.rows_per_epoch = setup.train_rows // world
        self.steps_per_epoch = max(1, math.ceil(self.rows_per_epoch / self.config.batch_size))

    def train_batches(self, epoch: int):
        batch_size = self.config.batch_size
        if self.train_x is not None:
            generator = torch.Generator().manual_seed(_seed(self.config.seed, epoch, self.rank))
            order = torch.randperm(len(self.train_x), generator=generator)[: self.rows_per_epoch].to(
                self.device
            )
            return (self.train_x[index] for index in order.split(batch_size))
        shuffle = self.config.shuffle_buffer
        batches = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            local_shuffle_buffer_size=shuffle or None,
            local_shuffle_seed=self.config.seed + epoch if shuffle else None,
        )
        return (self._tensor(batch) for batch in batches)

    def validation_batches(self):
        batch_size = self.config.batch_size * 4
        if self.train_x is not None:
            return batches_of(self.validation_x, batch_size)
        batches = ray.train.get_dataset_shard("validation").iter_batches(
            batch_size=batch_size, batch_format="pyarrow"
        )
        return (self._tensor(self._own_rows(batch)) for batch in batches)

    def _own_rows(self, batch: pa.Table) -> pa.Table:
        hashes = key_hash(batch.column(self.features.key_column))
        return batch.filter(pa.array(worker_of(hashes, self.world) == self.rank))

    def _tensor(self, batch: pa.Table) -> torch.Tensor:
        # the statistics pass checked every row
        matrix = features_to_numpy(batch, self.features, validated=True)
        return torch.from_numpy(self.normalizer(matrix)).to(self.device)


def objective(config: TrainConfig, steps_per_epoch: int, device: torch.device) -> Objective:
    """The run's schedule and loss settings, in optimizer steps."""
    lr = (config.learning_rate, config.epochs * steps_per_epoch, config.lr_schedule, config.lr_warmup_steps)
    schedule = Schedule(
        *lr, config.min_lr_ratio, config.beta, round(config.kl_warmup_epochs * steps_per_epoch)
    )
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": config.precision == "bf16"}
    loss = (config.free_bits, config.trim_fraction, config.grad_clip_norm, config.binarize)
    return Objective(schedule, *loss, autocast)


def epoch_line(metrics: dict) -> str:
    """The one line a person reads per epoch."""
    validation = f"{metrics['val_negative_elbo']:.3f} (reconstruction {metrics['val_reconstruction']:.3f}, "
    validation += f"KL {metrics['val_kl']:.3f})"
    return (
        f"epoch {metrics['epoch']}: -ELBO train {metrics['negative_elbo']:.3f}  validation {validation}  "
        f"active units {metrics['active_units']}  beta {metrics['beta']:.2f}  lr {metrics['lr']:.2e}  "
        f"{metrics['samples_per_second']:.0f} samples/s  ({metrics['epoch_seconds']:.1f}s)"
    )


def _copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _quiet_ray_train_reports() -> None:
    # Ray Train logs every report (metrics and checkpoint) at INFO from every rank, under a logger
    # named after its source file; our per-epoch line says the same once.
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _max_param_divergence(model: torch.nn.Module) -> float:
    """Largest difference of any weight between ranks: 0.0 when DDP kept the replicas in sync."""
    flat = torch.cat([p.detach().flatten().double().cpu() for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())


def _seed(seed: int, epoch: int, rank: int) -> int:
    return seed * 1_000_003 + epoch * 1_009 + rank
