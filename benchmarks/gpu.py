"""The GPU run: train MNIST with one NCCL worker per GPU in bf16, embed 4M images on the GPUs, and
compare both against the GPU's measured bf16 matmul limit. Run by benchmarks/gpu.sh.

    training   samples/s per GPU (median epoch, first excluded) and model FLOP utilization:
               3 x forward FLOPs per sample (forward + backward) x samples/s / measured peak
    embedding  rows/s of the embed job (steady state and end to end) against the limit
               measured peak / forward FLOPs per row

    python -m benchmarks.gpu [--epochs 10] [--embed-rows 4000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from benchmarks.common import parse_args, save, timed
from benchmarks.embed import image_version, model_flops_per_row, write_images
from benchmarks.mnist import write_mnist_parquet
from vae import VAE, ModelConfig, load_model_version


def bf16_matmul_flops_per_second(size: int = 8192, repeats: int = 10, device: str = "cuda") -> float:
    """The GPU's dense bf16 matmul throughput: the limit both figures are read against."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def train_on_gpus(work: Path, epochs: int, gpus: int, batch_size: int) -> dict:
    from ray_jobs.config import TrainConfig
    from ray_jobs.train import train

    data = write_mnist_parquet(work / "mnist.parquet")
    config = TrainConfig(
        data=str(data),
        vector_column="pixels",
        image_shape=[1, 28, 28],
        validation_fraction=0.2,
        latent_dim=32,
        hidden_dims=[512, 256],
        binarize=True,
        epochs=epochs,
        batch_size=batch_size,
        num_workers=max(gpus, 1),
        gpus_per_worker=1 if gpus else 0,  # no GPU: the smoke run, on one CPU worker
        cpus_per_worker=2 if gpus else 1,
        precision="bf16" if gpus else "fp32",
        model_root=str(work / "models"),
        storage_path=str(work / "ray_results"),
        iw_samples=100 if gpus else 5,
    )
    seconds, version = timed(lambda: train(config))
    metrics = load_model_version(work / "models", version).metadata["metrics"]
    history = metrics["history"]
    samples_per_s = median(h["samples_per_second"] for h in history[1:])
    model = VAE(ModelConfig(784, 32, (512, 256), "bernoulli"))
    return {
        "gpus": gpus,
        "epochs": epochs,
        "global_batch": batch_size,
        "seconds": round(seconds, 1),
        "samples_per_s_per_gpu": round(samples_per_s / max(gpus, 1)),
        "train_flops_per_sample": 3 * model_flops_per_row(model),
        "val_negative_elbo": round(metrics["val_negative_elbo"], 3),
        "iw_nll": metrics["iw_nll"],
    }


def embed_on_gpus(work: Path, rows: int) -> dict:
    from ray_jobs.config import EmbedConfig
    from ray_jobs.embed import embed

    data = write_images(work / "images", rows, files=16)
    version = image_version(work / "image_models")
    config = EmbedConfig(
        data=str(data),
        model_root=str(work / "image_models"),
        model_version=version,
        catalog=f"sqlite:///{work}/catalog.db",
        warehouse=str(work / "warehouse"),
        batch_size=65536,
    )
    seconds, result = timed(lambda: embed(config))
    model = load_model_version(work / "image_models", version).model
    return {
        "rows": rows,
        "rows_per_s_end_to_end": round(rows / seconds),
        "rows_per_s_steady": round(rows / result.encode_seconds),
        "forward_flops_per_row": model_flops_per_row(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch of the training run")
    parser.add_argument("--embed-rows", type=int, default=4_000_000)
    args = parse_args(parser, epochs=2, batch_size=128, embed_rows=4_000)
    import ray

    gpus = torch.cuda.device_count()
    if gpus == 0 and not args.smoke:
        raise SystemExit("benchmarks.gpu needs a CUDA GPU; this machine has none (--smoke runs on the CPU)")
    peak = bf16_matmul_flops_per_second() if gpus else bf16_matmul_flops_per_second(256, 2, "cpu")
    device = torch.cuda.get_device_name(0) if gpus else "CPU (smoke)"
    print(f"{gpus} x {device}: bf16 matmul {peak / 1e12:.3f} TFLOP/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    training = train_on_gpus(work, args.epochs, gpus, args.batch_size)
    training["mfu"] = round(training["samples_per_s_per_gpu"] * training["train_flops_per_sample"] / peak, 4)
    print(f"training: {training}", flush=True)
    embedding = embed_on_gpus(work, args.embed_rows)
    limit = max(gpus, 1) * peak / embedding["forward_flops_per_row"]
    embedding["rows_per_s_limit"] = round(limit)
    embedding["share_of_limit_steady"] = round(embedding["rows_per_s_steady"] / limit, 4)
    print(f"embedding: {embedding}", flush=True)
    ray.shutdown()
    save(
        "gpu",
        {
            "device": device,
            "gpus": gpus,
            "bf16_matmul_tflops": round(peak / 1e12, 1),
            "train": training,
            "embed": embedding,
        },
    )


if __name__ == "__main__":
    main()
