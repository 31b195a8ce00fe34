"""Helpers shared by the benchmarks: synthetic data, a quick model version, result files, smoke sizes."""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vae import VAE, FeatureSchema, FeatureStats, ModelConfig, Normalizer, save_model_version

# BENCH_RESULTS: somewhere else (the smoke runs write theirs to a temporary directory)
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).parent / "results")


def parse_args(parser: argparse.ArgumentParser, **smoke_sizes) -> argparse.Namespace:
    """The benchmark's arguments, with --smoke: the sizes given here instead, a run of seconds that only
    shows the benchmark still works end to end (python -m benchmarks.smoke runs every one of them)."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs, not how fast")
    args = parser.parse_args()
    if args.smoke:
        for name, value in smoke_sizes.items():
            setattr(args, name, value)
    return args


def write_vectors(directory: Path, rows: int, dim: int, files: int = 4, seed: int = 0) -> Path:
    """rows x dim float32 vectors from a mixture of Gaussians, split into `files` Parquet files."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, dim)).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    per_file = rows // files
    for i in range(files):
        values = centers[rng.integers(0, 10, per_file)] + 0.3 * rng.standard_normal(
            (per_file, dim), dtype=np.float32
        )
        table = pa.table(
            {
                "item_id": pa.array(np.arange(i * per_file, (i + 1) * per_file), pa.int64()),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim),
            }
        )
        pq.write_table(table, directory / f"part-{i:03d}.parquet", row_group_size=65536)
    return directory


def synthetic_embeddings(
    start: int, rows: int, dim: int, version: str, batch: str, when: datetime, seed: int = 0
) -> pa.Table:
    """Rows in the embeddings contract (vae.embeddings.contract), whatever columns it gains: keys
    start..start+rows, Gaussian latents, uniform scores (1% above the threshold)."""
    from vae.embeddings import contract

    rng = np.random.default_rng(seed + start)
    return contract.embedding_table(
        pa.array(np.arange(start, start + rows), pa.int64()),
        "item_id",
        pa.int64(),
        rng.standard_normal((rows, dim), dtype=np.float32),
        rng.random(rows, dtype=np.float32),
        0.99,
        version,
        batch,
        contract.constant_timestamps(when, rows),
    )


def untrained_version(model_root: Path, dim: int, latent_dim: int = 16, hidden=(256, 128)) -> str:
    """A model version with random weights: encoding cost does not depend on training."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(dim, latent_dim, hidden, "gaussian"))
    stats = FeatureStats.of(np.random.default_rng(0).standard_normal((1000, dim)).astype(np.float32))
    return save_model_version(
        model_root,
        model,
        Normalizer.fit(stats, "gaussian"),
        FeatureSchema("item_id", dim, vector_column="vec"),
        {},
        {},
        {"source": "synthetic"},
    )


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def save(name: str, result: dict, show: bool = True) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    if show:
        print(json.dumps(result, indent=2))
    print(f"saved {path}")
    return path


def http_load(url: str, payload: dict, clients: int, seconds: float) -> dict:
    """`clients` threads POSTing `payload` to `url` back to back for `seconds`: request count,
    errors and latency percentiles in ms. Each client keeps one HTTP/1.1 connection."""
    import http.client
    import threading
    from urllib.parse import urlparse

    target = urlparse(url)
    body = json.dumps(payload).encode()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        mine: list[float] = []
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                connection.request("POST", target.path, body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                mine.append((time.perf_counter() - started) * 1000)
            except Exception as error:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
                connection.close()
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies)
    percentile = (
        (lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2))
        if ordered
        else (lambda q: None)
    )
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(ordered),
        "errors": len(errors),
        "first_errors": errors[:3],
        "requests_per_s": round(len(ordered) / seconds, 1),
        "p50_ms": percentile(0.5),
        "p99_ms": percentile(0.99),
    }
