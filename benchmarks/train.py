"""Training: the Ray job vs native torch.distributed DDP and a plain single-process loop on MNIST.

Quality (medians of --seeds seeds): the shared MNIST test split (10k images), key-based ~8k/2k
split, dynamic binarization, Bernoulli likelihood, MLP 784-512-256, z=32, Adam 1e-3, global batch
128, the same schedule and epoch budget. Ray job (2 workers) and plain loop both report validation
-ELBO, IW-NLL (k=--iw-samples) and active units. Bar: Ray's validation -ELBO within 1 nat.

Speed (medians of --repeats): steady-state training samples/s (median epoch, first excluded) of the
Ray job (2 workers x 1 thread) vs native DDP with the same processes, threads, model, data and
global batch (torch.multiprocessing + gloo, nothing else); bar 0.97. Also vs the plain loop (1 and
2 threads), the Ray job as 1 worker x 2 threads, per-epoch time materialized vs streamed from Ray
Data (bar 1.3x), and the job's fixed cost (start to first step, last step to version written) for
1, 2 and 4 workers of 0.5 CPU each.

    python -m benchmarks.train [--epochs 20] [--seeds 3] [--repeats 3] [--iw-samples 1000]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import parse_args, save, timed
from benchmarks.mnist import write_mnist_parquet
from vae import (
    VAE,
    FeatureSchema,
    FeatureStats,
    ModelConfig,
    Normalizer,
    elbo_terms,
    features_to_numpy,
    load_model_version,
)
from vae.data.keys import is_validation, key_hash
from vae.diagnostics import active_units, importance_weighted_nll, posterior_mean_variance
from vae.training import Schedule

LATENT_DIM, HIDDEN, LEARNING_RATE, GLOBAL_BATCH, VALIDATION_FRACTION = 32, (512, 256), 1e-3, 128, 0.2


def load_split(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The same key-based split and [0, 1] scaling the job uses."""
    table = pq.read_table(data)
    features = FeatureSchema("item_id", 784, vector_column="pixels", image_shape=(1, 28, 28))
    matrix = features_to_numpy(table, features)
    x = torch.from_numpy(Normalizer.fit(FeatureStats.of(matrix), "bernoulli")(matrix))
    validation = torch.from_numpy(is_validation(key_hash(table.column("item_id")), VALIDATION_FRACTION))
    return x[~validation], x[validation]


def plain_loop(
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    epochs: int,
    threads: int,
    kl_warmup_epochs: float,
    iw_samples: int,
    seed: int = 0,
) -> dict:
    """The baseline: one process, the library's model, loss and schedule, nothing else."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = VAE(ModelConfig(784, LATENT_DIM, HIDDEN, "bernoulli"))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps = math.ceil(len(x_train) / GLOBAL_BATCH)
    schedule = Schedule(LEARNING_RATE, epochs * steps, kl_warmup_steps=round(kl_warmup_epochs * steps))
    generator = torch.Generator().manual_seed(seed)
    step, epoch_seconds = 0, []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)
        step = steps_through(model, optimizer, schedule, x_train, order.split(GLOBAL_BATCH), generator, step)
        epoch_seconds.append(time.perf_counter() - started)
    result = {"epoch_seconds": epoch_seconds, "samples_per_s": len(x_train) / median(epoch_seconds[1:])}
    if iw_samples:
        result.update(evaluate(model, x_val, iw_samples))
    return result


def steps_through(model, optimizer, schedule: Schedule, x_train, batches, generator, step: int) -> int:
    """One optimizer step per batch of row indices (the baselines' whole loop); returns the step count."""
    for index in batches:
        x = torch.bernoulli(x_train[index], generator=generator)  # dynamic binarization
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step)
        terms = elbo_terms(model, x, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        terms.loss(schedule.kl_weight(step)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
        step += 1
    return step


@torch.no_grad()
def evaluate(model: VAE, x_val: torch.Tensor, iw_samples: int) -> dict:
    model.eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.bernoulli(x_val, generator=generator)
    terms = elbo_terms(model, x, generator=generator)
    mean = terms.posterior.mean.double()
    variance = posterior_mean_variance(len(x), mean.sum(0).numpy(), mean.pow(2).sum(0).numpy())
    iw_nll = torch.cat(
        [importance_weighted_nll(model, chunk, iw_samples, generator) for chunk in x.split(256)]
    )
    return {
        "val_negative_elbo": float(terms.negative_elbo.mean()),
        "val_kl": float(terms.kl.mean()),
        "iw_nll": float(iw_nll.mean()),
        "active_units": active_units(variance),
    }


def ddp_loop(
    x_train: torch.Tensor, epochs: int, processes: int, threads: int, kl_warmup_epochs: float
) -> dict:
    """Native DDP: `processes` processes (torch.multiprocessing, gloo), the same model, loss,
    schedule and global batch, each rank stepping through its own rows; nothing else."""
    import torch.multiprocessing as mp

    port = 29_500 + os.getpid() % 1000
    results = mp.get_context("spawn").SimpleQueue()
    shards = [x_train[rank::processes].clone().share_memory_() for rank in range(processes)]
    args = (processes, threads, shards, epochs, kl_warmup_epochs, port, results)
    mp.spawn(_ddp_rank, args=args, nprocs=processes, join=True)
    epoch_seconds = results.get()
    rows = sum(len(shard) for shard in shards)
    return {"epoch_seconds": epoch_seconds, "samples_per_s": rows / median(epoch_seconds[1:])}


def _ddp_rank(rank, processes, threads, shards, epochs, kl_warmup_epochs, port, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=processes)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(VAE(ModelConfig(784, LATENT_DIM, HIDDEN, "bernoulli")))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    x_train, batch = shards[rank], GLOBAL_BATCH // processes
    steps = math.ceil(min(len(shard) for shard in shards) / batch)
    schedule = Schedule(LEARNING_RATE, epochs * steps, kl_warmup_steps=round(kl_warmup_epochs * steps))
    generator = torch.Generator().manual_seed(rank)
    step, epoch_seconds = 0, []
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)[: steps * batch]
        step = steps_through(model, optimizer, schedule, x_train, order.split(batch), generator, step)
        epoch_seconds.append(time.perf_counter() - started)
    if rank == 0:
        results.put(epoch_seconds)
    dist.destroy_process_group()


def ray_run(
    data: Path,
    work: Path,
    epochs: int,
    iw_samples: int,
    materialize: bool = True,
    name: str = "",
    seed: int = 0,
    workers: int = 2,
    cpus_per_worker: float | None = None,
) -> dict:
    from ray_jobs.config import TrainConfig
    from ray_jobs.train import train

    config = TrainConfig(
        data=str(data),
        vector_column="pixels",
        image_shape=[1, 28, 28],
        label_column="label",
        validation_fraction=VALIDATION_FRACTION,
        model_root=str(work / "models"),
        latent_dim=LATENT_DIM,
        hidden_dims=list(HIDDEN),
        binarize=True,
        epochs=epochs,
        batch_size=GLOBAL_BATCH,
        learning_rate=LEARNING_RATE,
        num_workers=workers,
        cpus_per_worker=cpus_per_worker or ((2.0 / workers) if materialize else 0.5),
        materialize=materialize,
        seed=seed,
        storage_path=str(work / "ray_results"),
        run_name=f"bench-{name}-{time.time_ns()}",
        iw_samples=iw_samples,
        report_rows=0,
    )
    seconds, version = timed(lambda: train(config))
    metrics = load_model_version(work / "models", version).metadata["metrics"]
    history = metrics["history"]
    train_seconds = [h["rows"] / h["samples_per_second"] for h in history]
    return {
        "seconds": seconds,
        "samples_per_s": median(h["samples_per_second"] for h in history[1:]),
        "epoch_seconds_median": median(h["epoch_seconds"] for h in history[1:]),
        "fixed_cost_seconds": seconds - sum(h["epoch_seconds"] for h in history),
        "train_seconds": sum(train_seconds),
        "val_negative_elbo": history[-1]["val_negative_elbo"],
        "best_val_negative_elbo": metrics["val_negative_elbo"],
        "iw_nll": metrics["iw_nll"],
        "active_units": history[-1]["active_units"],
        "train_rows": history[-1]["rows"],
        "val_rows": history[-1]["val_rows"],
        "ddp_max_param_divergence": metrics["ddp_max_param_divergence"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the quality runs")
    parser.add_argument("--seeds", type=int, default=3, help="quality runs per side (seeds 0..n-1)")
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="speed repeats")
    parser.add_argument("--speed-epochs", type=int, default=5)
    parser.add_argument("--start-up-workers", type=int, nargs="+", default=[1, 2, 4])
    args = parse_args(parser, epochs=2, seeds=1, iw_samples=5, repeats=1, speed_epochs=2, start_up_workers=[])
    from ray_jobs.config import TrainConfig

    kl_warmup_epochs = TrainConfig.model_fields["kl_warmup_epochs"].default

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        data = write_mnist_parquet(work / "mnist.parquet")
        x_train, x_val = load_split(data)
        ray_start, _ = timed(
            lambda: ray.init(
                address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False
            )
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        result = {
            "data": "MNIST t10k, key-based split",
            "train_rows": len(x_train),
            "validation_rows": len(x_val),
            "model": f"MLP 784-{'-'.join(map(str, HIDDEN))}, z={LATENT_DIM}, Bernoulli, dynamic binarization",
            "global_batch": GLOBAL_BATCH,
            "cpus": os.cpu_count(),
            "ray_start_seconds": round(ray_start, 2),
            "quality": quality(data, work, x_train, x_val, args, kl_warmup_epochs),
            "speed": speed(data, work, x_train, x_val, args, kl_warmup_epochs),
            "start_up": start_up(data, work, args),
        }
        ray.shutdown()
        save("train", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quality(data: Path, work: Path, x_train, x_val, args, kl_warmup_epochs: float) -> dict:
    print(f"quality: {args.epochs} epochs, {len(x_train)} train / {len(x_val)} validation rows", flush=True)
    keys = ("val_negative_elbo", "iw_nll", "active_units")
    plain, ray_job = [], []
    for seed in range(args.seeds):
        run = plain_loop(x_train, x_val, args.epochs, 2, kl_warmup_epochs, args.iw_samples, seed)
        plain.append({k: run[k] for k in keys})
        run = ray_run(data, work, args.epochs, args.iw_samples, name="quality", seed=seed)
        ray_job.append({k: run[k] for k in (*keys, "ddp_max_param_divergence")})
        print(f"  seed {seed}: plain {plain[-1]}\n          ray   {ray_job[-1]}", flush=True)
    medians = {
        side: {k: median(r[k] for r in runs) for k in keys}
        for side, runs in (("plain", plain), ("ray", ray_job))
    }
    return {
        "epochs": args.epochs,
        "iw_samples": args.iw_samples,
        "seeds": args.seeds,
        "plain_per_seed": plain,
        "ray_2_workers_per_seed": ray_job,
        "plain_median": medians["plain"],
        "ray_median": medians["ray"],
        "ray_minus_plain_val_negative_elbo_median": round(
            medians["ray"]["val_negative_elbo"] - medians["plain"]["val_negative_elbo"], 3
        ),
        "ray_minus_plain_iw_nll_median": round(medians["ray"]["iw_nll"] - medians["plain"]["iw_nll"], 3),
    }


def speed(data: Path, work: Path, x_train, x_val, args, kl_warmup_epochs: float) -> dict:
    epochs = args.speed_epochs
    runs: dict[str, list[float]] = {
        name: []
        for name in ("plain_1", "plain_2", "ddp_2x1", "ray_2x1", "ray_1x2", "materialized", "streamed")
    }
    for repeat in range(args.repeats):
        for threads in (1, 2):
            runs[f"plain_{threads}"].append(
                plain_loop(x_train, x_val, epochs, threads, kl_warmup_epochs, 0)["samples_per_s"]
            )
        runs["ddp_2x1"].append(ddp_loop(x_train, epochs, 2, 1, kl_warmup_epochs)["samples_per_s"])
        run = ray_run(data, work, epochs, 0, name="speed")
        runs["ray_2x1"].append(run["samples_per_s"])
        runs["materialized"].append(run["epoch_seconds_median"])
        if not args.smoke:  # the same job with other options: the smoke run has seen it work once
            runs["streamed"].append(
                ray_run(data, work, epochs, 0, materialize=False, name="stream")["epoch_seconds_median"]
            )
            runs["ray_1x2"].append(ray_run(data, work, epochs, 0, name="single", workers=1)["samples_per_s"])
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:,.2f}" for k, v in runs.items() if v), flush=True)
    medians = {name: median(values) if values else math.nan for name, values in runs.items()}
    best_plain = max(medians["plain_1"], medians["plain_2"])
    return {
        "epochs": epochs,
        "repeats": args.repeats,
        "per_repeat": runs,
        "plain_samples_per_s_median": {
            "1_thread": rounded(medians["plain_1"]),
            "2_threads": rounded(medians["plain_2"]),
        },
        "native_ddp_2x1_samples_per_s_median": rounded(medians["ddp_2x1"]),
        "ray_2_workers_x_1_thread_samples_per_s_median": rounded(medians["ray_2x1"]),
        "ray_1_worker_x_2_threads_samples_per_s_median": rounded(medians["ray_1x2"]),
        "ratio_ray_vs_native_ddp": rounded(medians["ray_2x1"] / medians["ddp_2x1"], 3),
        "ratio_2_workers_vs_best_plain": rounded(medians["ray_2x1"] / best_plain, 3),
        "ratio_1_worker_vs_best_plain": rounded(medians["ray_1x2"] / best_plain, 3),
        "epoch_seconds_materialized_median": rounded(medians["materialized"], 3),
        "epoch_seconds_streamed_median": rounded(medians["streamed"], 3),
        "ratio_streamed_vs_materialized": rounded(medians["streamed"] / medians["materialized"], 3),
    }


def rounded(value: float, digits: int | None = None) -> float | None:
    """round(), and None for a figure that was not measured (NaN: a smoke run skips some)."""
    return None if math.isnan(value) else round(value, digits)


def start_up(data: Path, work: Path, args) -> dict:
    """The job's fixed cost for 1, 2 and 4 workers of 0.5 CPU: it must not grow with the workers."""
    fixed: dict[int, list[float]] = {workers: [] for workers in args.start_up_workers}
    for _ in range(args.repeats):
        for workers in fixed:
            run = ray_run(data, work, 2, 0, name=f"start-{workers}", workers=workers, cpus_per_worker=0.5)
            fixed[workers].append(run["fixed_cost_seconds"])
        print("fixed cost: " + ", ".join(f"{w} workers {v[-1]:.1f}s" for w, v in fixed.items()), flush=True)
    return {
        "epochs": 2,
        "cpus_per_worker": 0.5,
        "fixed_cost_seconds_per_repeat": {f"{w}_workers": v for w, v in fixed.items()},
        "fixed_cost_seconds_median": {f"{w}_workers": round(median(v), 2) for w, v in fixed.items()},
    }


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
