"""Drift tests, full size: false alarms on random halves and power against a planted input shift.

A model is trained with the train job on the shared MNIST split (10k images); its posterior means
of two random halves (5,000 rows each) are compared 40 times: the combined test must alarm on at
most 5% of them. Then 0.25 standard deviations are added to 10% of the input pixels (the most
variable ones) of one half before encoding: the share of repeats that detect it is the power.
Per-test rates are reported too. Last, the monitor job's read of a large embeddings set: in this
process vs Ray Data (streaming, for inputs larger than memory), same data, same run.

    python -m benchmarks.drift [--repeats 40] [--permutations 200] [--epochs 5] [--rows 2000000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import parse_args, save, synthetic_embeddings, timed
from benchmarks.mnist import write_mnist_parquet
from ray_jobs.cluster import ray_session
from ray_jobs.config import MonitorConfig, TrainConfig
from ray_jobs.monitor import read_embeddings
from ray_jobs.train import train
from vae import encode_matrix, features_to_numpy, load_model_version
from vae.monitoring.statistics import DRIFT_TESTS, drift_test


def rates(results: list[dict]) -> dict:
    return {
        "combined": sum(r["detected"] for r in results) / len(results),
        **{
            name: sum(r["tests"][name]["p_value"] < r["alpha"] for r in results) / len(results)
            for name in DRIFT_TESTS
        },
    }


def large_embeddings(work: Path, rows: int, dim: int = 16) -> tuple:
    """`rows` embeddings of one version as batches of 250,000 rows of its table in a catalog of their
    own, and the monitor job's options to read them (catalog, warehouse, entity)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import commit_rows

    from vae.embeddings import contract
    from vae.embeddings.catalog import EmbeddingsCatalog

    options = {"catalog": f"sqlite:///{work}/catalog.db", "warehouse": str(work / "warehouse")}
    catalog = EmbeddingsCatalog(options["catalog"], options["warehouse"])
    owner = catalog.register("item", "item_id", "int64")
    table = catalog.create_table(owner, "bench", contract.schema("item_id", pa.int64()), {})
    for start in range(0, rows, 250_000):
        count, batch = min(250_000, rows - start), f"part-{start // 250_000}"
        when = datetime(2026, 1, 1, tzinfo=UTC)
        commit_rows(catalog, table, synthetic_embeddings(start, count, dim, "bench", batch, when), batch)
    return catalog, catalog.table("item", "bench"), options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument(
        "--extra-null-repeats",
        type=int,
        default=0,
        help="more random-halves repeats, to pin the false-alarm rate down",
    )
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--rows", type=int, default=2_000_000, help="rows of the large embeddings set read both ways"
    )
    args = parse_args(parser, repeats=1, extra_null_repeats=0, permutations=19, epochs=1, rows=20_000)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as work_dir, ray_session():
        work = Path(work_dir)
        data = write_mnist_parquet(work / "mnist.parquet")
        version = train(
            TrainConfig(
                data=str(data),
                vector_column="pixels",
                image_shape=[1, 28, 28],
                latent_dim=16,
                hidden_dims=[256, 128],
                epochs=args.epochs,
                num_workers=2,
                iw_samples=0,
                report_rows=0,
                model_root=str(work / "models"),
                storage_path=str(work / "ray_results"),
            )
        )
        loaded = load_model_version(work / "models", version)
        matrix = features_to_numpy(pq.read_table(data), loaded.features)
        latents = encode_matrix(loaded.model, loaded.normalizer, matrix)[0]
        spread = matrix.std(axis=0)
        shifted_pixels = np.argsort(-spread)[: matrix.shape[1] // 10]

        null, planted = [], []
        for repeat in range(args.repeats):
            order = np.random.default_rng(repeat).permutation(len(matrix))
            first, second = order[: len(order) // 2], order[len(order) // 2 :]
            null.append(
                drift_test(
                    latents[first], latents[second], alpha=0.05, permutations=args.permutations, seed=repeat
                )
            )
            moved = matrix[second].copy()
            moved[:, shifted_pixels] += 0.25 * spread[shifted_pixels]
            moved_latents = encode_matrix(loaded.model, loaded.normalizer, moved)[0]
            planted.append(
                drift_test(
                    latents[first], moved_latents, alpha=0.05, permutations=args.permutations, seed=repeat
                )
            )
            print(
                f"repeat {repeat}: halves p = {null[-1]['p_value']:.3f}, planted shift p = "
                f"{planted[-1]['p_value']:.2e}",
                flush=True,
            )
        extra = []
        for repeat in range(args.repeats, args.repeats + args.extra_null_repeats):
            order = np.random.default_rng(repeat).permutation(len(matrix))
            half = len(order) // 2
            extra.append(
                drift_test(
                    latents[order[:half]],
                    latents[order[half:]],
                    alpha=0.05,
                    permutations=args.permutations,
                    seed=repeat,
                )
            )

        catalog, table, options = large_embeddings(work / "large", args.rows)

        def read(in_memory_rows: int):
            config = MonitorConfig(**options, sample_rows=5000, in_memory_rows=in_memory_rows)
            return read_embeddings(catalog, table, None, config)

        in_process, _ = timed(lambda: read(args.rows))
        with_ray, sample = timed(lambda: read(0))
        test_seconds, _ = timed(
            lambda: drift_test(sample.latents, sample.latents[::-1] + 0.0, permutations=args.permutations)
        )

    result = {
        "data": "MNIST test split, 10,000 images; two halves of 5,000",
        "model": {"latent_dim": 16, "epochs": args.epochs},
        "repeats": args.repeats,
        "permutations": args.permutations,
        "alpha": 0.05,
        "false_alarm_rate": rates(null),
        "bar_false_alarms_at_most": 0.05,
        "bar_met": rates(null)["combined"] <= 0.05,
        "false_alarm_rate_all_repeats": {"repeats": len(null) + len(extra), **rates(null + extra)}
        if extra
        else None,
        "planted_shift": {
            "size_sd": 0.25,
            "features": f"{len(shifted_pixels)} of {matrix.shape[1]} pixels (10%, most variable)",
            "power": rates(planted),
        },
        "large_read": {
            "rows": args.rows,
            "in_process_seconds": round(in_process, 2),
            "ray_data_seconds": round(with_ray, 2),
            "ray_over_in_process": round(with_ray / in_process, 2),
            "drift_test_seconds_5000_per_side": round(test_seconds, 2),
        },
    }
    save("drift", result)


if __name__ == "__main__":
    main()
