"""Train a VAE on a Parquet dataset with Ray Train (DDP) and save an immutable model version.

    read Parquet (Ray Data) -> validate + statistics pass -> TorchTrainer, N DDP workers:
        per epoch: train -> validate (all-reduced ELBO, KL per dim, active units) -> checkpoint
        end: best weights -> importance-weighted NLL on the validation split
    -> model version (safetensors + JSON + report PNGs) under model_root

Fault tolerance: every checkpoint holds weights, optimizer moments and counters, so a run that
lost a worker or a node (FailureConfig) or its driver (re-run the same command: the run name is
derived from the config and the data) continues from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from pydantic import Field
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

from ray_jobs.common import (
    JobConfig,
    alive_node_resources,
    describe,
    node_capacity,
    parquet_schema,
    parse_config,
    ray_session,
    run_cli,
)
from vae import (
    VAE,
    FeatureSchema,
    FeatureStats,
    InputError,
    ModelConfig,
    Normalizer,
    elbo_terms,
    encode_matrix,
    features_to_numpy,
)
from vae.artifacts import save_model_version
from vae.diagnostics import active_units, collapse_warning, importance_weighted_nll, posterior_mean_variance
from vae.monitoring import ANOMALY_QUANTILES, anomaly_thresholds
from vae.preprocessing import infer_feature_schema, is_validation, key_hash, worker_of
from vae.report import write_training_report
from vae.training import STATE_FILE, Schedule, load_best_weights, load_training_state, save_training_state

log = logging.getLogger("ray_jobs.train")


class TrainConfig(JobConfig):
    """Train a VAE with Ray Train on a Parquet dataset and save a model version."""

    # data
    data: str = Field(description="Parquet file or directory to train on")
    key_column: str = Field("item_id", description="entity key column (string or integer); decides the validation split")
    vector_column: str | None = Field(None, description="one list column holding the features")
    feature_columns: list[str] = Field([], description="numeric scalar feature columns, instead of vector_column")
    image_shape: list[int] | None = Field(None, description="declared shape of the vector, e.g. [1, 28, 28]")
    label_column: str | None = Field(None, description="optional column that colours the report's latent PCA plot")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="share of keys held out for validation")
    model_root: str = Field("models", description="directory that holds model versions")
    # model
    architecture: Literal["mlp", "conv"] = Field("mlp", description="mlp for vectors and tabular rows, conv for images")
    latent_dim: int = Field(16, gt=0, description="size of the latent vector")
    hidden_dims: list[int] = Field([256, 128], description="MLP hidden layer sizes (after the convolutions for conv)")
    conv_channels: list[int] = Field([32, 64], description="channels of the stride-2 convolutions (conv only)")
    likelihood: Literal["bernoulli", "gaussian"] = Field("bernoulli", description="bernoulli for [0,1] data, gaussian for tabular")
    binarize: bool = Field(False, description="dynamic binarization: sample binary targets from [0,1] data each step")
    # objective
    beta: float = Field(1.0, ge=0, description="weight of the KL term after warm-up (1 = the true ELBO)")
    kl_warmup_epochs: float = Field(5.0, ge=0, description="epochs over which the KL weight rises linearly from 0 to beta")
    free_bits: float = Field(0.0, ge=0, description="minimum batch-mean KL per latent dimension in the loss (nats)")
    trim_fraction: float = Field(0.0, ge=0, lt=1, description="leave this share of each batch's highest-loss rows out of the "
                                 "loss: robust to outliers in unlabeled data (anomaly detection)")
    # optimization
    epochs: int = Field(20, gt=0, description="maximum passes over the training data")
    batch_size: int = Field(128, gt=0, description="examples per step on each worker")
    learning_rate: float = Field(1e-3, gt=0, description="Adam peak learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="learning-rate decay after warm-up")
    lr_warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warm-up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate of the cosine schedule, relative")
    grad_clip_norm: float | None = Field(100.0, gt=0, description="clip the global gradient norm (null = off)")
    early_stopping_patience: int = Field(10, ge=0, description="stop after this many epochs without a better validation ELBO (0 = off)")
    seed: int = Field(0, description="seed for initialization, shuffling and sampling")
    # scale
    num_workers: int = Field(2, gt=0, description="data-parallel training workers")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each training worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; > 0 trains on GPU with NCCL, else CPU with gloo")
    accelerator_type: str | None = Field(None, description="train only on nodes with this accelerator (Ray's "
                                         "accelerator_type:<name> resource, e.g. A10G, H100)")
    worker_resources: dict[str, float] = Field({}, description="extra Ray resources each worker needs (pins it to node types)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 runs the model under autocast (GPU)")
    materialize: bool = Field(True, description="true: each worker holds its shard in memory; false: stream from Ray Data each epoch")
    shuffle_buffer: int = Field(2048, ge=0, description="rows in the local shuffle buffer when streaming (0 = off)")
    # fault tolerance
    storage_path: str = Field("ray_results", description="where Ray Train keeps checkpoints (local path or s3://)")
    run_name: str | None = Field(None, description="Ray Train run name; the default derives from config + data, so a re-run resumes")
    checkpoint_every: int = Field(1, gt=0, description="checkpoint every N epochs (and always at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept, best by validation ELBO (the latest is kept too)")
    max_failures: int = Field(3, ge=0, description="restarts from the last checkpoint after a worker or node failure")
    # diagnostics
    iw_samples: int = Field(1000, ge=0, description="importance samples for the final validation NLL (0 = skip)")
    iw_max_rows: int = Field(2048, gt=0, description="validation rows the importance-weighted NLL uses at most")
    min_active_share: float = Field(0.1, ge=0, le=1, description="warn of posterior collapse below this share of active units")
    report_rows: int = Field(2000, ge=0, description="validation rows in the report's PCA plot")
    # monitoring
    reference_rows: int = Field(10_000, ge=0, description="validation rows kept with the version: drift reference, anomaly thresholds")
    anomaly_quantile: float = Field(0.99, gt=0, lt=1, description="is_anomaly: score above this quantile of the validation scores")


def worker_request(config: TrainConfig) -> dict[str, float]:
    """The Ray resources of one training worker, all from config. An accelerator type is asked for
    as Ray does (0.001 of the node's accelerator_type:<name>): it pins, it doesn't count."""
    request = {"CPU": config.cpus_per_worker, "GPU": config.gpus_per_worker, **config.worker_resources}
    if config.accelerator_type:
        request[f"accelerator_type:{config.accelerator_type}"] = 0.001
    return {name: amount for name, amount in request.items() if amount > 0}


# Settings that do not change what a run computes: left out of the derived run name.
_OPERATIONAL = {"run_name", "storage_path", "max_failures", "keep_checkpoints", "checkpoint_every", "model_root", "report_rows",
                "reference_rows", "anomaly_quantile", "cpus_per_worker", "accelerator_type", "worker_resources"}  # placement too


def train(config: TrainConfig) -> str:
    """Run the whole training job; returns the new model version's name.

    The dataset's schema and the architecture are checked before Ray starts, so bad input fails in seconds.
    """
    started = time.perf_counter()
    schema = parquet_schema(config.data)
    features = infer_feature_schema(
        schema, config.data, config.key_column, config.vector_column,
        tuple(config.feature_columns), tuple(config.image_shape) if config.image_shape else None,
    )
    model_config = _model_config(config, features)
    if config.label_column and config.label_column not in schema.names:
        raise InputError(f"{config.data}: label column '{config.label_column}' not found; the dataset has {', '.join(schema.names)}")
    with ray_session():
        return _train_on_ray(config, features, model_config, started)


def _model_config(config: TrainConfig, features: FeatureSchema) -> ModelConfig:
    if config.binarize and config.likelihood != "bernoulli":
        raise InputError("binarize: true needs likelihood: bernoulli")
    if config.architecture == "conv" and features.image_shape is None:
        raise InputError("architecture: conv needs image_shape, e.g. --image-shape [1,28,28]")
    try:
        return ModelConfig(
            features.dim, config.latent_dim, tuple(config.hidden_dims), config.likelihood, config.architecture,
            features.image_shape if config.architecture == "conv" else None, tuple(config.conv_channels),
        )
    except ValueError as error:
        raise InputError(f"invalid architecture: {error}") from None


def _train_on_ray(config: TrainConfig, features: FeatureSchema, model_config: ModelConfig, started: float) -> str:
    reserved = config.num_workers * config.cpus_per_worker
    if not config.materialize and reserved > ray.cluster_resources().get("CPU", 0.0) - 1:
        # Streaming reads run as Ray tasks during training; with every CPU held by a worker
        # they never get scheduled and the run hangs silently.
        raise InputError(
            f"{config.num_workers} workers x {config.cpus_per_worker} CPU leave no CPU for streaming the dataset; "
            "set materialize: true, or lower cpus_per_worker (e.g. 0.5)"
        )
    dataset = ray.data.read_parquet(config.data).select_columns(features.columns)
    if config.materialize:
        dataset = dataset.materialize()  # read once; every worker then loads its shard from the object store
    stats, validation_rows = dataset_stats(dataset, features, config.validation_fraction)
    if stats.count == 0:
        raise InputError(f"{config.data}: the dataset has no rows")
    if validation_rows == 0 or validation_rows == stats.count:
        raise InputError(
            f"{config.data}: validation_fraction {config.validation_fraction} puts {validation_rows} of {stats.count} rows "
            "in the validation split; both splits need rows"
        )
    normalizer = Normalizer.fit(stats, config.likelihood)
    run_name = config.run_name or _derived_run_name(config, stats)
    storage_path = str(Path(config.storage_path).absolute()) if "://" not in config.storage_path else config.storage_path
    _claim_run(storage_path, run_name, model_config, features, normalizer)
    log.info(
        "run %s: %d rows (%d validation) x %d features, %d workers, storage %s",
        run_name, stats.count, validation_rows, features.dim, config.num_workers, storage_path,
    )

    if config.materialize:
        # Not split by Ray: each worker keeps the rows whose key hashes to its rank.
        datasets, dataset_config = {"train": dataset}, DataConfig(datasets_to_split=[])
    else:
        datasets = {"train": _split(dataset, features, config.validation_fraction, validation=False),
                    "validation": _split(dataset, features, config.validation_fraction, validation=True)}
        # Validation is not split by Ray (its equal split would drop rows): each worker keeps its keys.
        dataset_config = DataConfig(datasets_to_split=["train"])
    resources = worker_request(config)
    if (capacity := node_capacity(resources, alive_node_resources())) < config.num_workers:
        log.warning("the cluster now holds %d of the %d training workers (each needs %s); Ray Train waits for nodes "
                    "(an autoscaling cluster starts them)", capacity, config.num_workers, describe(resources))
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": model_config.to_dict(), "features": features.to_dict(), "normalizer": normalizer.to_dict(),
            "train_rows": stats.count - validation_rows, **config.model_dump(),
        },
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.gpus_per_worker > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute="val_negative_elbo", checkpoint_score_order="min",
            ),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as checkpoint_dir:
        best_weights = load_best_weights(checkpoint_dir)
        state = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
    model = VAE(model_config)
    model.load_state_dict(best_weights)
    model.eval()
    final = state["final"]
    best = state["history"][final["best_epoch"] - 1]
    if final["collapse_warning"]:
        log.warning(final["collapse_warning"])

    latents, scores, labels = _validation_reference(config, features, normalizer, model)
    reference, anomaly = None, None
    if config.reference_rows and len(scores):
        reference = {"posterior_mean": latents[: config.reference_rows], "anomaly_score": scores[: config.reference_rows]}
        thresholds = anomaly_thresholds(reference["anomaly_score"], tuple(sorted({*ANOMALY_QUANTILES, config.anomaly_quantile})))
        anomaly = {"quantile": config.anomaly_quantile, "threshold": thresholds[str(config.anomaly_quantile)],
                   "thresholds": thresholds, "validation_rows": len(reference["anomaly_score"])}
    with tempfile.TemporaryDirectory() as report_dir:
        write_training_report(
            report_dir, state["history"], best["val_kl_per_dim"], best["val_posterior_mean_variance"],
            latents[: config.report_rows] if config.report_rows else None, labels if labels is None else labels[: config.report_rows],
            config.label_column,
        )
        version = save_model_version(
            config.model_root, model, normalizer, features,
            training={**config.model_dump(), "run_name": run_name, "storage_path": storage_path},
            metrics={**best, **final, "history": state["history"], "train_seconds": round(time.perf_counter() - started, 2)},
            data={"source": config.data, "rows": stats.count, "validation_rows": validation_rows,
                  "fingerprint": f"{stats.fingerprint:016x}"},
            report_dir=report_dir, reference=reference, anomaly=anomaly,
        )
    log.info(
        "model version %s saved under %s: best epoch %d, validation -ELBO %.2f nats/example (reconstruction %.2f, KL %.2f), "
        "IW-NLL(k=%d) %s, %d/%d active units",
        version, config.model_root, final["best_epoch"], best["val_negative_elbo"], best["val_reconstruction"], best["val_kl"],
        config.iw_samples, f"{final['iw_nll']:.2f}" if final["iw_nll"] is not None else "skipped",
        best["active_units"], config.latent_dim,
    )
    return version


def dataset_stats(dataset: ray.data.Dataset, features: FeatureSchema, validation_fraction: float) -> tuple[FeatureStats, int]:
    """One pass over the data in Ray tasks: validates every row, gathers normalizer statistics, counts validation keys."""

    def batch_stats(batch: pa.Table) -> dict[str, np.ndarray]:
        stats = FeatureStats.of(features_to_numpy(batch, features))
        validation = int(is_validation(key_hash(batch.column(features.key_column)), validation_fraction).sum())
        return {
            "count": np.array([stats.count]), "total": stats.total[None], "total_squares": stats.total_squares[None],
            "minimum": stats.minimum[None], "maximum": stats.maximum[None],
            "fingerprint": np.array([stats.fingerprint], dtype=np.uint64), "validation": np.array([validation]),
        }

    merged, validation_rows = FeatureStats.of(np.empty((0, features.dim), np.float32)), 0
    for part in dataset.map_batches(batch_stats, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="numpy"):
        for i in range(len(part["count"])):
            merged = merged.merge(FeatureStats(
                int(part["count"][i]), part["total"][i], part["total_squares"][i], part["minimum"][i], part["maximum"][i],
                int(part["fingerprint"][i]),
            ))
            validation_rows += int(part["validation"][i])
    return merged, validation_rows


def _split(dataset: ray.data.Dataset, features: FeatureSchema, fraction: float, validation: bool) -> ray.data.Dataset:
    def keep(batch: pa.Table) -> pa.Table:
        mask = is_validation(key_hash(batch.column(features.key_column)), fraction)
        return batch.filter(pa.array(mask if validation else ~mask))

    return dataset.map_batches(keep, batch_format="pyarrow", batch_size=None)


def _derived_run_name(config: TrainConfig, stats: FeatureStats) -> str:
    identity = json.dumps({**config.model_dump(exclude=_OPERATIONAL), "data": f"{stats.fingerprint:016x}"}, sort_keys=True)
    return f"vae-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _claim_run(storage_path: str, run_name: str, model: ModelConfig, features: FeatureSchema, normalizer: Normalizer) -> None:
    """Record what a run trains; refuse to resume a run directory that trained something else."""
    # through JSON, so tuples compare equal to the lists read back
    identity = json.loads(json.dumps({"model": model.to_dict(), "features": features.to_dict(), "normalizer": normalizer.to_dict()}))
    filesystem, root = pafs.FileSystem.from_uri(storage_path)
    path = f"{root}/{run_name}/vae_run.json"
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        with filesystem.open_input_stream(path) as f:
            existing = json.loads(f.read())
        if existing != identity:
            differing = sorted(k for k in identity if identity[k] != existing.get(k))
            raise InputError(
                f"run '{run_name}' under {storage_path} was started with a different {', '.join(differing)}; "
                "choose another run_name or storage_path"
            )
        log.info("run %s exists under %s: resuming from its latest checkpoint", run_name, storage_path)
        return
    filesystem.create_dir(f"{root}/{run_name}", recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps(identity, sort_keys=True).encode())


def _validation_reference(
    config: TrainConfig, features: FeatureSchema, normalizer: Normalizer, model: VAE
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Posterior means, anomaly scores (and labels) of up to max(report_rows, reference_rows) validation
    rows: the report's PCA plot, and the reference kept with the version for monitoring."""
    rows = max(config.report_rows, config.reference_rows)
    empty = np.empty((0, model.config.latent_dim), np.float32), np.empty(0, np.float32), None
    if rows == 0:
        return empty
    columns = features.columns + ([config.label_column] if config.label_column else [])
    validation = _split(ray.data.read_parquet(config.data).select_columns(columns), features, config.validation_fraction, True)
    table = pa.concat_tables(ray.get(validation.limit(rows).to_arrow_refs()))
    if table.num_rows == 0:
        return empty
    latents, scores = encode_matrix(model, normalizer, features_to_numpy(table, features))
    labels = table.column(config.label_column).to_numpy(zero_copy_only=False) if config.label_column else None
    return latents, scores, labels


# ---------------------------------------------------------------------------------------------
# Runs on every worker.


class WorkerData:
    """This worker's training and validation rows as tensors on its device.

    materialize: rows are kept in memory; each worker owns the keys hashing to its rank, sorted by
    key hash, so the data order (and the run) is the same whatever the file layout. Streaming: Ray
    Data's equal split, with a local shuffle buffer.
    """

    def __init__(self, loop_config: dict, features: FeatureSchema, normalizer: Normalizer, device: torch.device):
        self.config, self.features, self.normalizer, self.device = loop_config, features, normalizer, device
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.train_x: torch.Tensor | None = None
        if loop_config["materialize"]:
            self.train_x, self.validation_x = self._load_shard()
            # DDP ranks must take the same number of steps: every rank uses as many rows as the smallest shard.
            smallest = torch.tensor([len(self.train_x)], dtype=torch.int64)
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
            self.rows_per_epoch = int(smallest)
        else:
            self.rows_per_epoch = loop_config["train_rows"] // self.world
        self.steps_per_epoch = max(1, math.ceil(self.rows_per_epoch / loop_config["batch_size"]))

    def _load_shard(self) -> tuple[torch.Tensor, torch.Tensor]:
        fraction = self.config["validation_fraction"]
        parts: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {False: [], True: []}
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=None, batch_format="pyarrow"):
            hashes = key_hash(batch.column(self.features.key_column))
            mine = worker_of(hashes, self.world) == self.rank
            validation = is_validation(hashes, fraction)
            matrix = features_to_numpy(batch, self.features)
            for held_out in (False, True):
                rows = mine & (validation == held_out)
                parts[held_out].append((hashes[rows], matrix[rows]))
        return self._sorted_tensor(parts[False]), self._sorted_tensor(parts[True])

    def _sorted_tensor(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        hashes = np.concatenate([h for h, _ in parts]) if parts else np.empty(0, np.uint64)
        matrix = np.concatenate([m for _, m in parts]) if parts else np.empty((0, self.features.dim), np.float32)
        order = np.argsort(hashes, kind="stable")
        return torch.from_numpy(self.normalizer(matrix[order])).to(self.device)

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        batch_size = self.config["batch_size"]
        if self.train_x is not None:
            order_generator = torch.Generator().manual_seed(_seed(self.config["seed"], epoch, self.rank))
            order = torch.randperm(len(self.train_x), generator=order_generator)[: self.rows_per_epoch].to(self.device)
            for start in range(0, len(order), batch_size):
                yield self._targets(self.train_x[order[start : start + batch_size]], generator)
            return
        shuffle = self.config["shuffle_buffer"]
        for batch in ray.train.get_dataset_shard("train").iter_batches(
            batch_size=batch_size, batch_format="pyarrow",
            local_shuffle_buffer_size=shuffle or None, local_shuffle_seed=self.config["seed"] + epoch if shuffle else None,
        ):
            yield self._targets(self._tensor(batch), generator)

    def validation_batches(self, generator: torch.Generator, max_rows: int | None = None) -> Iterator[torch.Tensor]:
        batch_size, seen = self.config["batch_size"] * 4, 0
        if self.train_x is not None:
            batches = (self.validation_x[start : start + batch_size] for start in range(0, len(self.validation_x), batch_size))
        else:
            batches = (self._tensor(self._own_rows(b)) for b in ray.train.get_dataset_shard("validation").iter_batches(
                batch_size=batch_size, batch_format="pyarrow"))
        for x in batches:
            if max_rows is not None and seen >= max_rows:
                return
            x = x if max_rows is None else x[: max_rows - seen]
            seen += len(x)
            yield self._targets(x, generator)

    def _own_rows(self, batch: pa.Table) -> pa.Table:
        return batch.filter(pa.array(worker_of(key_hash(batch.column(self.features.key_column)), self.world) == self.rank))

    def _tensor(self, batch: pa.Table) -> torch.Tensor:
        return torch.from_numpy(self.normalizer(features_to_numpy(batch, self.features))).to(self.device)

    def _targets(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # Dynamic binarization: a fresh binary sample of the [0,1] intensities each time.
        return torch.bernoulli(x, generator=generator) if self.config["binarize"] else x


def train_loop_per_worker(loop_config: dict) -> None:
    """One DDP worker: resume if a checkpoint exists, train epochs, validate, checkpoint, finish with IW-NLL."""
    context = ray.train.get_context()
    rank, seed = context.get_world_rank(), loop_config["seed"]
    log = logging.getLogger("ray_jobs.train")
    _quiet_ray_train_reports()
    torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    features = FeatureSchema.from_dict(loop_config["features"])
    normalizer = Normalizer.from_dict(loop_config["normalizer"])
    model_config = ModelConfig.from_dict(loop_config["model"])

    torch.manual_seed(seed)  # identical initial weights on every rank
    model = VAE(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=loop_config["learning_rate"])
    best_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    state: dict = {"epoch": 0, "step": 0, "history": [], "best_epoch": 0, "best_val": math.inf, "stale_epochs": 0, "final": None,
                   "resumed_from": []}
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as checkpoint_dir:
            best_weights, state = load_training_state(checkpoint_dir, model, optimizer)
        best_weights = {name: t.to(device) for name, t in best_weights.items()}
        if rank == 0:
            log.info("resumed from the checkpoint of epoch %d (step %d)", state["epoch"], state["step"])
        state["resumed_from"].append(state["epoch"])
    ddp_model = ray.train.torch.prepare_model(model)  # after restoring, so every rank starts from the checkpoint

    data = WorkerData(loop_config, features, normalizer, device)
    steps = data.steps_per_epoch
    schedule = Schedule(
        loop_config["learning_rate"], loop_config["epochs"] * steps, loop_config["lr_schedule"], loop_config["lr_warmup_steps"],
        loop_config["min_lr_ratio"], loop_config["beta"], round(loop_config["kl_warmup_epochs"] * steps),
    )
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": loop_config["precision"] == "bf16"}
    patience = loop_config["early_stopping_patience"]

    for epoch in range(state["epoch"] + 1, loop_config["epochs"] + 1):
        if state["final"] is not None:
            break  # a finished run re-submitted: nothing left to do
        epoch_started = time.perf_counter()
        ddp_model.train()
        generator = torch.Generator(device=device).manual_seed(_seed(seed, epoch, rank))
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # rows, sum of reconstruction, sum of KL
        grad_norm_max = torch.zeros((), device=device)
        for x in data.train_batches(epoch, generator):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(state["step"])
            with torch.autocast(**autocast):
                terms = elbo_terms(ddp_model, x, generator=generator)
            loss = terms.loss(schedule.kl_weight(state["step"]), loop_config["free_bits"], loop_config["trim_fraction"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if loop_config["grad_clip_norm"]:
                grad_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), loop_config["grad_clip_norm"])
                grad_norm_max = torch.maximum(grad_norm_max, grad_norm.detach())
            optimizer.step()
            state["step"] += 1
            totals += torch.stack([torch.tensor(float(len(x)), device=device), terms.reconstruction.detach().sum(),
                                   terms.kl.detach().sum()]).double()
        train_seconds = time.perf_counter() - epoch_started
        dist.all_reduce(totals)
        validation = _validate(model, data, seed, rank, autocast)
        rows, reconstruction, kl = totals.tolist()
        metrics = {
            "epoch": epoch, "step": state["step"], "rows": int(rows),
            "reconstruction": reconstruction / rows, "kl": kl / rows, "negative_elbo": (reconstruction + kl) / rows,
            **validation,
            "beta": schedule.kl_weight(state["step"] - 1), "lr": schedule.lr(state["step"] - 1),
            "grad_norm_max": float(grad_norm_max), "samples_per_second": round(rows / train_seconds, 1),
            "epoch_seconds": round(time.perf_counter() - epoch_started, 3),
        }
        state["history"].append(metrics)
        if metrics["val_negative_elbo"] < state["best_val"]:
            state.update(best_val=metrics["val_negative_elbo"], best_epoch=epoch, stale_epochs=0)
            best_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        elif state["step"] >= schedule.kl_warmup_steps:  # the ELBO is expected to worsen while beta rises
            state["stale_epochs"] += 1
        stop = patience > 0 and state["stale_epochs"] >= patience
        state["epoch"] = epoch
        if rank == 0:
            log.info(
                "epoch %d: -ELBO train %.3f  validation %.3f (reconstruction %.3f, KL %.3f)  active units %d  "
                "beta %.2f  lr %.2e  %.0f samples/s  (%.1fs)%s",
                epoch, metrics["negative_elbo"], metrics["val_negative_elbo"], metrics["val_reconstruction"], metrics["val_kl"],
                metrics["active_units"], metrics["beta"], metrics["lr"], metrics["samples_per_second"], metrics["epoch_seconds"],
                "  early stop" if stop else "",
            )
        last = epoch == loop_config["epochs"] or stop
        _report(metrics, rank, model, best_weights, optimizer, state, save=last or epoch % loop_config["checkpoint_every"] == 0)
        if stop:
            break

    if state["final"] is None:
        # Finish on the best weights: importance-weighted NLL and the collapse check.
        divergence = _max_param_divergence(model)
        model.load_state_dict(best_weights)
        best = state["history"][state["best_epoch"] - 1]
        iw_nll = _importance_weighted_nll(model, data, loop_config, rank)
        state["final"] = {
            "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "stopped_early": state["epoch"] < loop_config["epochs"],
            "iw_nll": iw_nll, "iw_samples": loop_config["iw_samples"],
            "collapse_warning": collapse_warning(best["active_units"], model_config.latent_dim, loop_config["min_active_share"]),
            "resumed_from": state["resumed_from"], "ddp_max_param_divergence": divergence,
        }
        final_metrics = {**best, **{k: v for k, v in state["final"].items() if k != "resumed_from"}, "final": True}
        _report(final_metrics, rank, model, best_weights, optimizer, state, save=True)


@torch.no_grad()
def _validate(model: VAE, data: WorkerData, seed: int, rank: int, autocast: dict) -> dict:
    """Validation ELBO terms, KL per dimension and active units over all ranks' validation rows.

    Same sampling noise every epoch (a fixed seed), so epochs compare without sampling jitter.
    """
    model.eval()
    latent_dim = model.config.latent_dim
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(_seed(seed, 0, rank) + 1)
    sums = torch.zeros(3 + 3 * latent_dim, dtype=torch.float64, device=generator.device)
    for x in data.validation_batches(generator):
        with torch.autocast(**autocast):
            terms = elbo_terms(model, x, generator=generator)
        mean = terms.posterior.mean.double()
        sums += torch.cat([
            torch.tensor([len(x)], dtype=torch.float64, device=sums.device),
            terms.reconstruction.double().sum()[None], terms.kl.double().sum()[None],
            terms.posterior.kl_per_dim().double().sum(dim=0), mean.sum(dim=0), mean.pow(2).sum(dim=0),
        ])
    dist.all_reduce(sums)
    sums = sums.cpu().numpy()
    rows = max(sums[0], 1.0)
    kl_per_dim = sums[3 : 3 + latent_dim] / rows
    variance = posterior_mean_variance(rows, sums[3 + latent_dim : 3 + 2 * latent_dim], sums[3 + 2 * latent_dim :])
    return {
        "val_rows": int(sums[0]), "val_reconstruction": sums[1] / rows, "val_kl": sums[2] / rows,
        "val_negative_elbo": (sums[1] + sums[2]) / rows, "val_kl_per_dim": [round(float(v), 5) for v in kl_per_dim],
        "val_posterior_mean_variance": [round(float(v), 5) for v in variance], "active_units": active_units(variance),
    }


def _importance_weighted_nll(model: VAE, data: WorkerData, loop_config: dict, rank: int) -> float | None:
    if loop_config["iw_samples"] == 0:
        return None
    model.eval()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(_seed(loop_config["seed"], 0, rank) + 2)
    max_rows = math.ceil(loop_config["iw_max_rows"] / ray.train.get_context().get_world_size())
    sums = torch.zeros(2, dtype=torch.float64, device=generator.device)
    for x in data.validation_batches(generator, max_rows=max_rows):
        for chunk in x.split(256):
            nll = importance_weighted_nll(model, chunk, loop_config["iw_samples"], generator)
            sums += torch.stack([torch.tensor(float(len(chunk)), device=sums.device), nll.double().sum()]).double()
    dist.all_reduce(sums)
    return float(sums[1] / sums[0]) if sums[0] else None


def _report(metrics: dict, rank: int, model: VAE, best_weights: dict, optimizer: torch.optim.Optimizer, state: dict,
            save: bool) -> None:
    """Report from every rank; rank 0 attaches the checkpoint (weights are identical on all ranks).

    Ray gets the scalar metrics; per-dimension lists live in the checkpoint's history.
    """
    metrics = {name: value for name, value in metrics.items() if not isinstance(value, list)}
    if not (save and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        save_training_state(checkpoint_dir, model, best_weights, optimizer, state)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir))


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


def main(argv: list[str] | None = None) -> str:
    return train(parse_config(TrainConfig, argv, prog="vaectl train"))


if __name__ == "__main__":
    run_cli(main)
