"""Train a VAE on a Parquet dataset with Ray Train (DDP) and save an immutable model version.

    read Parquet (Ray Data) -> validate + statistics pass -> TorchTrainer, N DDP workers
    -> final checkpoint -> model version (safetensors + JSON) under model_root
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from pydantic import Field
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from safetensors.torch import load_file, save_file

from ray_jobs.common import JobConfig, parquet_schema, parse_config, ray_session, run_cli
from vae import VAE, FeatureSchema, FeatureStats, InputError, ModelConfig, Normalizer, elbo_terms, features_to_numpy
from vae.artifacts import save_model_version
from vae.preprocessing import infer_feature_schema

log = logging.getLogger("ray_jobs.train")


class TrainConfig(JobConfig):
    """Train a VAE with Ray Train on a Parquet dataset and save a model version."""

    data: str = Field(description="Parquet file or directory to train on")
    key_column: str = Field("item_id", description="entity key column (string or integer)")
    vector_column: str | None = Field(None, description="one list column holding the features")
    feature_columns: list[str] = Field([], description="numeric scalar feature columns, instead of vector_column")
    image_shape: list[int] | None = Field(None, description="declared shape of the vector, e.g. [1, 8, 8]")
    model_root: str = Field("models", description="directory that holds model versions")
    latent_dim: int = Field(16, gt=0, description="size of the latent vector")
    hidden_dims: list[int] = Field([256, 128], description="MLP hidden layer sizes")
    likelihood: Literal["bernoulli", "gaussian"] = Field("bernoulli", description="bernoulli for [0,1] data, gaussian for tabular")
    epochs: int = Field(20, gt=0, description="passes over the training data")
    batch_size: int = Field(128, gt=0, description="examples per step on each worker")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate")
    beta: float = Field(1.0, ge=0, description="weight of the KL term (1 = the true ELBO)")
    seed: int = Field(0, description="seed for initialization and sampling")
    num_workers: int = Field(2, gt=0, description="data-parallel training workers")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL instead of gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each training worker")
    shuffle_buffer: int = Field(2048, ge=0, description="rows in each worker's local shuffle buffer (0 = off)")
    materialize: bool = Field(True, description="cache the dataset in Ray's object store before training")
    storage_path: str = Field("ray_results", description="where Ray Train keeps checkpoints")
    run_name: str | None = Field(None, description="Ray Train run name (default: derived from the time)")


def train(config: TrainConfig) -> str:
    """Run the whole training job; returns the new model version's name.

    The dataset's schema is checked before Ray starts, so bad input fails in seconds.
    """
    started = time.perf_counter()
    features = infer_feature_schema(
        parquet_schema(config.data), config.data, config.key_column, config.vector_column,
        tuple(config.feature_columns), tuple(config.image_shape) if config.image_shape else None,
    )
    with ray_session():
        return _train_on_ray(config, features, started)


def _train_on_ray(config: TrainConfig, features: FeatureSchema, started: float) -> str:
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
        dataset = dataset.materialize()
    stats = dataset_stats(dataset, features)
    if stats.count == 0:
        raise InputError(f"{config.data}: the dataset has no rows")
    normalizer = Normalizer.fit(stats, config.likelihood)
    model_config = ModelConfig(features.dim, config.latent_dim, tuple(config.hidden_dims), config.likelihood)
    log.info("training on %d rows x %d features, %d workers", stats.count, features.dim, config.num_workers)

    run_name = config.run_name or f"vae-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": model_config.to_dict(),
            "features": features.to_dict(),
            "normalizer": normalizer.to_dict(),
            **config.model_dump(include={"epochs", "batch_size", "learning_rate", "beta", "seed", "shuffle_buffer", "cpus_per_worker"}),
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(config.storage_path).absolute()) if "://" not in config.storage_path else config.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as checkpoint_dir:
        weights = load_file(Path(checkpoint_dir) / "model.safetensors")
        history = json.loads((Path(checkpoint_dir) / "history.json").read_text())
    model = VAE(model_config)
    model.load_state_dict(weights)
    final = history[-1]
    version = save_model_version(
        config.model_root, model, normalizer, features,
        training={**config.model_dump(), "run_name": run_name},
        metrics={**final, "history": history, "train_seconds": round(time.perf_counter() - started, 2)},
        data={"source": config.data, "rows": stats.count, "fingerprint": f"{stats.fingerprint:016x}"},
    )
    log.info(
        "model version %s saved under %s: -ELBO %.2f nats/example (reconstruction %.2f, KL %.2f)",
        version, config.model_root, final["negative_elbo"], final["reconstruction"], final["kl"],
    )
    return version


def dataset_stats(dataset: ray.data.Dataset, features: FeatureSchema) -> FeatureStats:
    """One pass over the data in Ray tasks: validates every row and gathers normalizer statistics."""

    def batch_stats(batch: pa.Table) -> dict[str, np.ndarray]:
        stats = FeatureStats.of(features_to_numpy(batch, features))
        return {
            "count": np.array([stats.count]), "total": stats.total[None], "total_squares": stats.total_squares[None],
            "minimum": stats.minimum[None], "maximum": stats.maximum[None],
            "fingerprint": np.array([stats.fingerprint], dtype=np.uint64),
        }

    merged = FeatureStats.of(np.empty((0, features.dim), np.float32))
    for part in dataset.map_batches(batch_stats, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="numpy"):
        for i in range(len(part["count"])):
            merged = merged.merge(FeatureStats(
                int(part["count"][i]), part["total"][i], part["total_squares"][i], part["minimum"][i], part["maximum"][i],
                int(part["fingerprint"][i]),
            ))
    return merged


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every worker. Sums of per-example terms are all-reduced so metrics cover all ranks."""
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    torch.manual_seed(loop_config["seed"])  # identical initial weights on every rank
    features = FeatureSchema.from_dict(loop_config["features"])
    normalizer = Normalizer.from_dict(loop_config["normalizer"])
    model = ray.train.torch.prepare_model(VAE(ModelConfig.from_dict(loop_config["model"])))
    optimizer = torch.optim.Adam(model.parameters(), lr=loop_config["learning_rate"])
    device = ray.train.torch.get_device()
    generator = torch.Generator(device=device).manual_seed(loop_config["seed"] * 1000 + rank)
    shard = ray.train.get_dataset_shard("train")
    history: list[dict] = []

    for epoch in range(1, loop_config["epochs"] + 1):
        epoch_started = time.perf_counter()
        model.train()
        # rows, sum of reconstruction, sum of KL: all-reduced after the epoch
        totals = torch.zeros(3, dtype=torch.float64)
        for batch in shard.iter_batches(
            batch_size=loop_config["batch_size"], batch_format="pyarrow",
            local_shuffle_buffer_size=loop_config["shuffle_buffer"] or None,
            local_shuffle_seed=loop_config["seed"] + epoch if loop_config["shuffle_buffer"] else None,
        ):
            x = torch.from_numpy(normalizer(features_to_numpy(batch, features))).to(device)
            terms = elbo_terms(model, x, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            terms.loss(loop_config["beta"]).backward()
            optimizer.step()
            totals += torch.tensor([len(x), terms.reconstruction.sum().item(), terms.kl.sum().item()], dtype=torch.float64)
        dist.all_reduce(totals)
        rows, reconstruction, kl = totals.tolist()
        metrics = {
            "epoch": epoch, "rows": int(rows), "reconstruction": reconstruction / rows, "kl": kl / rows,
            "negative_elbo": (reconstruction + kl) / rows, "epoch_seconds": round(time.perf_counter() - epoch_started, 3),
        }
        if epoch == loop_config["epochs"]:
            metrics["ddp_max_param_divergence"] = _max_param_divergence(model)
        history.append(metrics)
        if rank == 0:
            logging.getLogger("ray_jobs.train").info(
                "epoch %d: -ELBO %.3f  reconstruction %.3f  KL %.3f  (%.1fs)",
                epoch, metrics["negative_elbo"], metrics["reconstruction"], metrics["kl"], metrics["epoch_seconds"],
            )
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            checkpoint = None
            if rank == 0:
                state = {name: t.detach().cpu().contiguous() for name, t in model.module.state_dict().items()}
                save_file(state, Path(checkpoint_dir) / "model.safetensors")
                (Path(checkpoint_dir) / "history.json").write_text(json.dumps(history))
                checkpoint = Checkpoint.from_directory(checkpoint_dir)
            ray.train.report(metrics, checkpoint=checkpoint)


def _max_param_divergence(model: torch.nn.Module) -> float:
    """Largest difference of any weight between ranks: 0.0 when DDP kept the replicas in sync."""
    flat = torch.cat([p.detach().flatten().double().cpu() for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())


def main(argv: list[str] | None = None) -> str:
    return train(parse_config(TrainConfig, argv, prog="vaectl train"))


if __name__ == "__main__":
    run_cli(main)
