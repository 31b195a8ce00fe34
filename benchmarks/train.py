"""Training throughput: Ray Train (2 DDP workers) vs a plain single-process PyTorch loop.

Same synthetic data, model, per-process batch size and epochs. The baseline takes the best of 1
and 2 torch threads. Steady state excludes the first epoch; the Ray run's fixed cost (worker
start, dataset materialization and statistics pass, checkpointing) is reported separately.

    python -m benchmarks.train [--rows 100000] [--epochs 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import pyarrow.parquet as pq
import torch

from benchmarks.common import save, timed, write_vectors
from vae import VAE, FeatureSchema, FeatureStats, ModelConfig, Normalizer, elbo_terms, features_to_numpy, load_model_version


def plain_loop(data: Path, epochs: int, batch_size: int, threads: int, hidden: tuple[int, ...], latent_dim: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    features = FeatureSchema("item_id", 64, vector_column="vec")
    matrix = features_to_numpy(pq.read_table(data), features)
    x_all = torch.from_numpy(Normalizer.fit(FeatureStats.of(matrix), "gaussian")(matrix))
    model = VAE(ModelConfig(x_all.shape[1], latent_dim, hidden, "gaussian"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    epoch_seconds, negative_elbo = [], 0.0
    for _ in range(epochs):
        started, total = time.perf_counter(), 0.0
        for index in torch.randperm(len(x_all), generator=generator).split(batch_size):
            terms = elbo_terms(model, x_all[index], generator=generator)
            optimizer.zero_grad(set_to_none=True)
            terms.loss().backward()
            optimizer.step()
            total += terms.negative_elbo.sum().item()
        epoch_seconds.append(time.perf_counter() - started)
        negative_elbo = total / len(x_all)
    return {"epoch_seconds": epoch_seconds, "negative_elbo": negative_elbo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hidden, latent_dim = (256, 128), 16

    import ray

    from ray_jobs.train import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        data = write_vectors(work / "data", args.rows, 64)
        ray_start, _ = timed(lambda: ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False))
        ray.data.DataContext.get_current().enable_progress_bars = False
        plain: dict[int, list[float]] = {1: [], 2: []}
        plain_elbo: list[float] = []
        ray_steady, ray_end_to_end, ray_fixed, ray_elbo = [], [], [], []
        for repeat in range(args.repeats):
            for threads in (1, 2):
                result = plain_loop(data, args.epochs, args.batch_size, threads, hidden, latent_dim)
                plain[threads].append(args.rows / median(result["epoch_seconds"][1:]))
                plain_elbo.append(result["negative_elbo"])
            config = TrainConfig(
                data=str(data), vector_column="vec", likelihood="gaussian", model_root=str(work / "models"),
                hidden_dims=list(hidden), latent_dim=latent_dim, epochs=args.epochs, batch_size=args.batch_size,
                num_workers=2, storage_path=str(work / "ray_results"),
            )
            seconds, version = timed(lambda: train(config))  # noqa: B023
            history = load_model_version(work / "models", version).metadata["metrics"]["history"]
            epoch_seconds = [h["epoch_seconds"] for h in history]
            ray_steady.append(history[-1]["rows"] / median(epoch_seconds[1:]))
            ray_end_to_end.append(history[-1]["rows"] * args.epochs / seconds)
            ray_fixed.append(seconds - sum(epoch_seconds))
            ray_elbo.append(history[-1]["negative_elbo"])
            print(f"repeat {repeat}: plain 1 thread {plain[1][-1]:,.0f}/s, 2 threads {plain[2][-1]:,.0f}/s; "
                  f"ray steady {ray_steady[-1]:,.0f}/s, end to end {ray_end_to_end[-1]:,.0f}/s, fixed cost {ray_fixed[-1]:.1f}s", flush=True)
        ray.shutdown()
        best_plain = max(median(plain[1]), median(plain[2]))
        save("train", {
            "rows": args.rows, "epochs": args.epochs, "batch_size_per_process": args.batch_size, "repeats": args.repeats,
            "cpus": os.cpu_count(), "ray_start_seconds": round(ray_start, 2),
            "plain_samples_per_s_median": {str(k): round(median(v)) for k, v in plain.items()},
            "ray_steady_samples_per_s_median": round(median(ray_steady)),
            "ray_end_to_end_samples_per_s_median": round(median(ray_end_to_end)),
            "ray_fixed_cost_seconds_median": round(median(ray_fixed), 1),
            "ratio_steady_vs_best_plain": round(median(ray_steady) / best_plain, 3),
            "final_train_negative_elbo": {"plain_median": round(median(plain_elbo), 3), "ray_median": round(median(ray_elbo), 3)},
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
