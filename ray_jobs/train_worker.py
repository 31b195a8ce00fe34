"""The training worker: the recipe every Ray Train worker runs (ray_jobs.train is the driver's).

    setup     model (same initial weights on every rank), Adam, the run state from the latest
              checkpoint if there is one, this worker's data (its key-hash shard in memory, or
              Ray Data's streamed split), schedules
    epoch     optimizer steps over the shard -> all-reduced training sums -> validation over every
              rank's validation rows -> one line of metrics (rank 0) -> a checkpoint when one is due
    finish    best weights -> importance-weighted NLL, collapse check, the validation reference ->
              the final checkpoint

Ray Train hears from the workers only at checkpoints: each report waits for its controller to take
the previous one (it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report per epoch would
cost seconds per epoch. The per-epoch metrics are logged by rank 0 and kept in the run state.

Everything the run needs to continue after a restart is in RunState, saved with each checkpoint.
"""

from __future__ import annotations

import logging
import math
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from ray_jobs.config import TrainConfig
from vae import VAE, FeatureSchema, ModelConfig, Normalizer
from vae.diagnostics import collapse_warning
from vae.encode import encode_normalized
from vae.training import (
    Objective,
    RunState,
    Schedule,
    batches_of,
    iw_nll_sums,
    key_shard,
    load_training_state,
    save_checkpoint_reference,
    save_training_state,
    take_rows,
    train_epoch,
    validation_metrics,
    validation_sums,
)
from vae.versions.mlflow_registry import Registry, TrackingUnavailable, epoch_metrics

log = logging.getLogger("ray_jobs.train")


@dataclass(frozen=True)
class WorkerSetup:
    """What the driver hands every worker."""

    config: TrainConfig
    model: ModelConfig
    features: FeatureSchema
    normalizer: Normalizer
    train_rows: int
    # per rank, the Arrow blocks of its own keys (materialize: all its rows; streaming: its
    # validation rows), split off by the driver; held in Ray's object store
    own_rows: list[list[ray.ObjectRef]]
    initial_weights: dict[str, torch.Tensor] | None = None  # init_from: a version's weights
    tracking: tuple[str, str] | None = None  # (MLflow tracking URI, run id): rank 0 logs each epoch


def train_loop_per_worker(loop_config: dict) -> None:
    TrainingWorker(loop_config["setup"]).run()


class TrainingWorker:
    """One DDP worker: setup (model, optimizer, resumed state, data) -> epochs (train, validate,
    report) -> finish (best weights, importance-weighted NLL)."""

    def __init__(self, setup: WorkerSetup):
        self.config, self.setup = setup.config, setup
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        _quiet_ray_logs()
        torch.set_num_threads(max(1, int(self.config.cpus_per_worker)))
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL's object collectives use the current device
        torch.manual_seed(self.config.seed)  # identical initial weights on every rank
        self.model = VAE(setup.model)
        if setup.initial_weights is not None:
            self.model.load_state_dict(setup.initial_weights)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate)
        self.best_weights = _copy(self.model)
        self.state = RunState()
        self.tracker = None
        if setup.tracking and self.rank == 0:
            self.tracker = EpochTracker(*setup.tracking, required=self.config.tracking_required)
        if checkpoint := ray.train.get_checkpoint():
            self._resume(checkpoint)
        # after restoring, so that every rank starts from the checkpoint
        self.ddp_model = ray.train.torch.prepare_model(self.model)
        self.data = WorkerData(setup, self.rank, self.world, self.device)
        self.objective = objective(self.config, self.data.steps_per_epoch, self.device)
        self.last_checkpoint = time.monotonic()

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
            if stop or epoch == self.config.epochs:
                break  # finish() writes the final checkpoint
            if self.checkpoint_due(epoch):
                self.report(metrics)
        if self.state.final is None:
            self.finish()

    def checkpoint_due(self, epoch: int) -> bool:
        """Every checkpoint_every epochs, or when checkpoint_seconds have passed since the last one.
        Rank 0's clock decides for every rank: all ranks must report together."""
        every, seconds = self.config.checkpoint_every, self.config.checkpoint_seconds
        elapsed = time.monotonic() - self.last_checkpoint
        due = (every > 0 and epoch % every == 0) or (seconds > 0 and elapsed >= seconds)
        decision = torch.tensor([int(due)], device=self.device)
        dist.broadcast(decision, src=0)
        return bool(decision.item())

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
        loss = self.objective.validation_loss(metrics)
        if loss < state.best_val:
            state.best_val, state.best_epoch = loss, metrics["epoch"]
            state.stale_epochs = 0
            self.best_weights = _copy(self.model)
        elif (
            state.step >= self.objective.schedule.kl_warmup_steps
        ):  # the loss at the final beta is expected to worsen while beta rises
            state.stale_epochs += 1
        patience = self.config.early_stopping_patience
        stop = patience > 0 and state.stale_epochs >= patience
        state.epoch = metrics["epoch"]
        if self.rank == 0:
            log.info(epoch_line(metrics) + ("  early stop" if stop else ""))
        if self.tracker:
            self.tracker.log(metrics)
        return stop

    def finish(self) -> None:
        """On the best weights: the importance-weighted NLL and the collapse check, then the final report."""
        if self.tracker:
            self.tracker.close()
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
        self.report(final_metrics, reference=self.validation_reference())

    def importance_weighted_nll(self) -> float | None:
        if self.config.iw_samples == 0:
            return None
        generator = torch.Generator(device=self.device).manual_seed(_seed(self.config.seed, 0, self.rank) + 2)
        max_rows = math.ceil(self.config.iw_max_rows / self.world)
        batches = take_rows(self.data.validation_batches(), max_rows)
        sums = iw_nll_sums(self.model, batches, self.config.iw_samples, self.objective, generator)
        dist.all_reduce(sums)
        return float(sums[1] / sums[0]) if sums[0] else None

    def validation_reference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """Posterior means and anomaly scores (as the embed job computes them) of up to
        max(report_rows, reference_rows) validation rows, an equal share from each rank, gathered on
        rank 0 (None elsewhere): the version's monitoring reference and the report's plot."""
        rows = math.ceil(max(self.config.report_rows, self.config.reference_rows) / self.world)
        self.model.eval()
        encoded = [encode_normalized(self.model, x) for x in batches_of(self.data.validation_x[:rows], 4096)]
        empty = (np.empty((0, self.setup.model.latent_dim), np.float32), np.empty(0, np.float32))
        latents, scores = (np.concatenate(part) for part in zip(*encoded, strict=True)) if encoded else empty
        labels = self.data.validation_labels
        mine = (latents, scores, None if labels is None else labels[:rows])
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        if self.rank != 0:
            return None
        parts = list(zip(*gathered, strict=True))
        labels = None if labels is None else np.concatenate(parts[2])
        return np.concatenate(parts[0]), np.concatenate(parts[1]), labels

    def report(self, metrics: dict, reference: tuple | None = None) -> None:
        """A checkpoint, reported from every rank; rank 0 attaches it (weights are identical on all
        ranks). Ray gets the scalar metrics; per-dimension lists live in the checkpoint's history."""
        metrics = {name: value for name, value in metrics.items() if not isinstance(value, list)}
        self.last_checkpoint = time.monotonic()
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            save_training_state(
                checkpoint_dir, self.model, self.best_weights, self.optimizer, self.state.to_dict()
            )
            if reference is not None:
                save_checkpoint_reference(checkpoint_dir, *reference)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir))


class EpochTracker:
    """Rank 0's per-epoch metrics into the training run's MLflow run (Ray Train V2 has no MLflow
    callback), sent by a thread so that MLflow's import and calls overlap the epochs. An outage is one
    warning and training goes on (the run state keeps every epoch), unless tracking_required."""

    def __init__(self, uri: str, run_id: str, required: bool):
        self.uri, self.run_id, self.required = uri, run_id, required
        self.epochs: queue.Queue[dict | None] = queue.Queue()
        self.error: TrackingUnavailable | None = None
        self.thread = threading.Thread(target=self._send, name="mlflow-epochs", daemon=True)
        self.thread.start()

    def log(self, metrics: dict) -> None:
        self._raise_if_required()
        self.epochs.put(metrics)

    def close(self) -> None:
        """Every epoch sent (or the outage reported)."""
        self.epochs.put(None)
        self.thread.join()
        self._raise_if_required()

    def _send(self) -> None:
        try:
            registry = Registry(self.uri)
            while (metrics := self.epochs.get()) is not None:
                registry.log_metrics(self.run_id, epoch_metrics(metrics), step=metrics["epoch"])
        except TrackingUnavailable as error:
            self.error = error
            log.warning("%s; epochs are no longer logged to MLflow (training continues)", error)

    def _raise_if_required(self) -> None:
        if self.error is not None and self.required:
            raise self.error


class WorkerData:
    """This worker's rows. Validation rows (the keys hashing to its rank) are held in memory as
    tensors, sorted by key hash, with their labels. Training rows, materialize: this rank's keys in
    memory, sorted by key hash, so the data order (and the run) is the same whatever the file layout.
    Streaming: Ray Data's equal split, converted to tensors in Ray Data tasks, local shuffle buffer.

    Each rank fetches only its own rows: the driver split them off by key hash."""

    def __init__(self, setup: WorkerSetup, rank: int, world: int, device: torch.device):
        self.config, self.rank, self.device = setup.config, rank, device
        self.batch_size = self.config.worker_batch_size()
        shard = key_shard(
            _fetched(setup.own_rows[rank]),
            setup.features,
            setup.normalizer,
            self.config.validation_fraction,
            device,
            self.config.label_column,
        )
        self.validation_x, self.validation_labels = shard.validation, shard.validation_labels
        self.train_x: torch.Tensor | None = None
        if self.config.materialize:
            self.train_x = shard.train
            # DDP ranks must take the same number of steps: every rank uses as many rows as the
            # smallest shard (a different subset each epoch).
            smallest = torch.tensor([len(self.train_x)], dtype=torch.int64, device=device)
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
            self.rows_per_epoch = int(smallest.item())
        else:
            self.rows_per_epoch = setup.train_rows // world
        self.steps_per_epoch = max(1, math.ceil(self.rows_per_epoch / self.batch_size))

    def train_batches(self, epoch: int):
        if self.train_x is not None:
            generator = torch.Generator().manual_seed(_seed(self.config.seed, epoch, self.rank))
            order = torch.randperm(len(self.train_x), generator=generator)[: self.rows_per_epoch]
            return (self.train_x[index] for index in order.to(self.device).split(self.batch_size))
        shuffle = self.config.shuffle_buffer
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=self.batch_size,
            device=self.device,
            local_shuffle_buffer_size=shuffle or None,
            local_shuffle_seed=self.config.seed + epoch if shuffle else None,
            prefetch_batches=4,
        )
        return (batch["x"] for batch in batches)

    def validation_batches(self):
        return batches_of(self.validation_x, self.batch_size * 4)


def _fetched(blocks: list[ray.ObjectRef]) -> Iterator[pa.Table]:
    for block in blocks:
        yield ray.get(block)


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


def _quiet_ray_logs() -> None:
    # Ray Train logs every report and checkpoint at INFO from every rank, and Ray Data every
    # execution of a dataset, each epoch when streaming; our per-epoch line says what matters once.
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _max_param_divergence(model: torch.nn.Module) -> float:
    """Largest difference of any weight between ranks: 0.0 when DDP kept the replicas in sync."""
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())


def _seed(seed: int, epoch: int, rank: int) -> int:
    return seed * 1_000_003 + epoch * 1_009 + rank
