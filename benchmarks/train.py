"""Training: Ray Train (2 DDP workers) vs a plain single-process PyTorch loop on MNIST, same run.

Quality: the shared MNIST test split (10k images), key-based ~8k/2k split, dynamic binarization,
Bernoulli likelihood, MLP 784-512-256, z=32, Adam 1e-3, global batch 128 (2 workers x 64 for
Ray), the same schedule and epoch budget. Both report validation ELBO, IW-NLL (k=1000) and
active units. Bar: Ray's validation -ELBO within 1 nat of the plain loop's.

Speed: steady-state training samples/s (median epoch, first excluded) of the Ray job vs the
plain loop (best of 1 and 2 torch threads); the Ray job's fixed cost (start-up, dataset pass,
checkpoints, final diagnostics) separately; and per-epoch time with the dataset held in worker
memory (materialize) vs streamed from Ray Data every epoch. Bar: ratio >= 0.9. Ray runs both
as 2 DDP workers x 1 thread and as 1 worker x 2 threads: on one 2-core machine DDP between two
processes adds a gloo all-reduce of every gradient per step that a single process does not pay.

    python -m benchmarks.train [--epochs 20] [--repeats 3] [--iw-samples 1000]
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

from benchmarks.common import save, timed
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
from vae.diagnostics import active_units, importance_weighted_nll, posterior_mean_variance
from vae.keys import is_validation, key_hash
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
        for index in torch.randperm(len(x_train), generator=generator).split(GLOBAL_BATCH):
            x = torch.bernoulli(x_train[index], generator=generator)  # dynamic binarization
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(step)
            terms = elbo_terms(model, x, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            terms.loss(schedule.kl_weight(step)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
            optimizer.step()
            step += 1
        epoch_seconds.append(time.perf_counter() - started)
    result = {"epoch_seconds": epoch_seconds, "samples_per_s": len(x_train) / median(epoch_seconds[1:])}
    if iw_samples:
        result.update(evaluate(model, x_val, iw_samples))
    return result


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


def ray_run(
    data: Path,
    work: Path,
    epochs: int,
    iw_samples: int,
    materialize: bool = True,
    name: str = "",
    seed: int = 0,
    workers: int = 2,
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
        batch_size=GLOBAL_BATCH // workers,
        learning_rate=LEARNING_RATE,
        num_workers=workers,
        cpus_per_worker=(2.0 / workers) if materialize else 0.5,
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
        "fixed_cost_seconds": seconds - sum(train_seconds),
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
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="speed repeats (quality runs once)")
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--speed-epochs", type=int, default=5)
    parser.add_argument(
        "--seeds", type=int, default=2, help="quality runs per side (seeds 0..n-1): init and data order vary"
    )
    args = parser.parse_args()
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

        print(
            f"quality: {args.epochs} epochs, {len(x_train)} train / {len(x_val)} validation rows", flush=True
        )
        quality_keys = ("val_negative_elbo", "iw_nll", "active_units")
        plain_quality, ray_quality = [], []
        for seed in range(args.seeds):
            result = plain_loop(x_train, x_val, args.epochs, 2, kl_warmup_epochs, args.iw_samples, seed)
            plain_quality.append({k: result[k] for k in quality_keys})
            result = ray_run(data, work, args.epochs, args.iw_samples, name="quality", seed=seed)
            ray_quality.append({k: result[k] for k in (*quality_keys, "ddp_max_param_divergence")})
            print(f"  seed {seed}: plain {plain_quality[-1]}\n          ray   {ray_quality[-1]}", flush=True)

        plain: dict[int, list[float]] = {1: [], 2: []}
        ray_speed, ray_single, ray_fixed, streamed, materialized = [], [], [], [], []
        for repeat in range(args.repeats):
            for threads in (1, 2):
                plain[threads].append(
                    plain_loop(x_train, x_val, args.speed_epochs, threads, kl_warmup_epochs, 0)[
                        "samples_per_s"
                    ]
                )
            run = ray_run(data, work, args.speed_epochs, 0, name="speed")
            ray_speed.append(run["samples_per_s"])
            ray_fixed.append(run["fixed_cost_seconds"])
            materialized.append(run["epoch_seconds_median"])
            streamed.append(
                ray_run(data, work, args.speed_epochs, 0, materialize=False, name="stream")[
                    "epoch_seconds_median"
                ]
            )
            ray_single.append(
                ray_run(data, work, args.speed_epochs, 0, name="single", workers=1)["samples_per_s"]
            )
            print(
                f"repeat {repeat}: plain 1 thread {plain[1][-1]:,.0f}/s, 2 threads {plain[2][-1]:,.0f}/s; "
                f"ray 2x1 {ray_speed[-1]:,.0f}/s, "
                f"ray 1x2 {ray_single[-1]:,.0f}/s, "
                f"fixed {ray_fixed[-1]:.1f}s; epoch materialized {materialized[-1]:.2f}s, streamed "
                f"{streamed[-1]:.2f}s",
                flush=True,
            )
        ray.shutdown()
        best_plain = max(median(plain[1]), median(plain[2]))
        save(
            "train",
            {
                "data": "MNIST t10k, key-based split",
                "train_rows": len(x_train),
                "validation_rows": len(x_val),
                "model": f"MLP 784-{'-'.join(map(str, HIDDEN))}, z={LATENT_DIM}, Bernoulli, dynamic "
                "binarization",
                "global_batch": GLOBAL_BATCH,
                "cpus": os.cpu_count(),
                "ray_start_seconds": round(ray_start, 2),
                "quality": {
                    "epochs": args.epochs,
                    "iw_samples": args.iw_samples,
                    "seeds": args.seeds,
                    "plain_per_seed": plain_quality,
                    "ray_2_workers_per_seed": ray_quality,
                    "plain_median": {k: median(r[k] for r in plain_quality) for k in quality_keys},
                    "ray_median": {k: median(r[k] for r in ray_quality) for k in quality_keys},
                    "ray_minus_plain_val_negative_elbo_median": round(
                        median(r["val_negative_elbo"] for r in ray_quality)
                        - median(r["val_negative_elbo"] for r in plain_quality),
                        3,
                    ),
                },
                "speed": {
                    "epochs": args.speed_epochs,
                    "repeats": args.repeats,
                    "plain_samples_per_s_median": {
                        f"{k}_threads": round(median(v)) for k, v in plain.items()
                    },
                    "ray_2_workers_x_1_thread_samples_per_s_median": round(median(ray_speed)),
                    "ray_1_worker_x_2_threads_samples_per_s_median": round(median(ray_single)),
                    "ratio_2_workers_vs_best_plain": round(median(ray_speed) / best_plain, 3),
                    "ratio_1_worker_vs_best_plain": round(median(ray_single) / best_plain, 3),
                    "ray_fixed_cost_seconds_median": round(median(ray_fixed), 1),
                    "epoch_seconds_materialized_median": round(median(materialized), 3),
                    "epoch_seconds_streamed_median": round(median(streamed), 3),
                },
            },
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
