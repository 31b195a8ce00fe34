"""Embedding throughput: the Ray Data job vs a plain single-process pyarrow + torch loop.

Both read the same Parquet files (only the needed columns), run the same encoder (posterior mean
+ anomaly score) and write Parquet with the same columns. The baseline takes the best of 1 and 2
torch threads. For each size, in the same process run:

    steady state   rows / encoding time: for the job, from the first unit starting to the last
                   one finishing (actor start, planning and commit excluded); for the loop, its
                   whole time (it has no start-up)
    end to end     rows / wall time of the whole job call (planning, actor start, encoding,
                   the Iceberg commit) vs the whole loop; the commit is also reported apart, and
                   Ray's own start (ray.init) as the fixed cost a long-lived cluster pays once

A 784-d image case (uint8 28x28, MLP 784-512-256, z=32) is reported against the compute limit:
the best matmul FLOP/s measured in this run times the model's FLOPs per row.

The data checks' cost: the job on a 1M-row mixed table (8 numeric, 2 categorical columns) with its
checks (the default: the inputs profiled in the encode pass, checked at the commit) against every
check off, with and without attribution.

    python -m benchmarks.embed [--rows 1000000 4000000] [--repeats 3] [--table-rows 1000000]
    python -m benchmarks.embed --only-checks --repeats 3      # writes results/embed_checks.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import parse_args, save, timed, untrained_version, write_vectors
from vae import (
    VAE,
    FeatureSchema,
    FeatureStats,
    ModelConfig,
    Normalizer,
    encode_matrix,
    features_to_numpy,
    load_model_version,
    save_model_version,
)
from vae.embeddings.contract import latent_column


def plain_loop(
    data: Path, model_root: Path, version: str, output: Path, threads: int, batch_size: int
) -> int:
    """The hand-written baseline: one process, no Ray, pyarrow batches in, torch, Parquet out."""
    torch.set_num_threads(threads)
    loaded = load_model_version(model_root, version)
    columns = loaded.features.columns
    output.mkdir(parents=True)
    rows = 0
    for i, path in enumerate(sorted(data.glob("*.parquet"))):
        with pq.ParquetWriter(output / f"part-{i}.parquet", schema=_schema()) as writer:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
                mean, score = encode_matrix(
                    loaded.model, loaded.normalizer, features_to_numpy(batch, loaded.features)
                )
                columns_out = {
                    "item_id": batch.column("item_id"),
                    "latent": latent_column(mean),
                    "anomaly_score": score,
                }
                writer.write_table(pa.table(columns_out, schema=_schema()))
                rows += len(mean)
    return rows


def _schema() -> pa.Schema:
    return pa.schema(
        [("item_id", pa.int64()), ("latent", pa.list_(pa.float32())), ("anomaly_score", pa.float32())]
    )


def matmul_flops_per_second(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """Dense float32 matmul throughput of this machine with `threads` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def model_flops_per_row(model: VAE) -> int:
    """Multiply-adds x 2 of every Linear layer: encoder, posterior heads and decoder (the anomaly score
    decodes)."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def write_images(directory: Path, rows: int, files: int = 4) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    per_file = rows // files
    for i in range(files):
        images = rng.integers(0, 256, size=(per_file, 784), dtype=np.uint8)
        table = pa.table(
            {
                "item_id": np.arange(i * per_file, (i + 1) * per_file),
                "image": pa.FixedSizeListArray.from_arrays(pa.array(images.ravel()), 784),
            }
        )
        pq.write_table(table, directory / f"part-{i:03d}.parquet", row_group_size=65536)
    return directory


def image_version(model_root: Path) -> str:
    torch.manual_seed(0)
    model = VAE(ModelConfig(784, 32, (512, 256), "bernoulli"))
    stats = FeatureStats.of(np.random.default_rng(0).integers(0, 256, (1000, 784)).astype(np.float32))
    features = FeatureSchema("item_id", 784, vector_column="image", image_shape=(1, 28, 28))
    return save_model_version(
        model_root, model, Normalizer.fit(stats, "bernoulli"), features, {}, {}, {"source": "synthetic"}
    )


def embed_once(work: Path, data: Path, version: str, rows: int, **options):
    """One embed job run into a scratch catalog under `work`, removed afterwards: (seconds, result)."""
    from ray_jobs.config import EmbedConfig
    from ray_jobs.embed import embed

    config = EmbedConfig(
        data=str(data),
        model_root=str(work / "models"),
        model_version=version,
        catalog=f"sqlite:///{work}/scratch/catalog.db",
        warehouse=str(work / "scratch" / "warehouse"),
        **options,
    )
    seconds, result = timed(lambda: embed(config))
    assert result.embedded_rows == rows
    shutil.rmtree(work / "scratch")
    return seconds, result


def compare(work: Path, data: Path, version: str, rows: int, repeats: int, batch_size: int) -> dict:
    """Plain loop (1 and 2 threads) and the Ray job, alternating, `repeats` times."""
    plain: dict[int, list[float]] = {1: [], 2: []}
    job_end_to_end: list[float] = []
    job_steady: list[float] = []
    job_startup: list[float] = []
    job_commit: list[float] = []
    for repeat in range(repeats):
        for threads in (1, 2):
            output = work / f"plain-{threads}"
            seconds, written = timed(
                lambda: plain_loop(data, work / "models", version, output, threads, batch_size)  # noqa: B023
            )
            assert written == rows
            plain[threads].append(rows / seconds)
            shutil.rmtree(output)
        seconds, result = embed_once(work, data, version, rows, batch_size=batch_size)
        job_end_to_end.append(rows / seconds)
        job_steady.append(rows / result.encode_seconds)
        job_startup.append(result.startup_seconds)
        job_commit.append(result.commit_seconds)
        print(
            f"  {rows:,} rows, repeat {repeat}: plain 1 thread {plain[1][-1]:,.0f} rows/s, 2 threads "
            f"{plain[2][-1]:,.0f}; "
            f"ray job end to end {job_end_to_end[-1]:,.0f}, steady {job_steady[-1]:,.0f}, start-up "
            f"{job_startup[-1]:.1f}s, commit {job_commit[-1]:.2f}s",
            flush=True,
        )
    best_plain = max(median(plain[1]), median(plain[2]))
    return {
        "rows": rows,
        "plain_rows_per_s_median": {f"{k}_thread": round(median(v)) for k, v in plain.items()},
        "job_end_to_end_rows_per_s_median": round(median(job_end_to_end)),
        "job_steady_rows_per_s_median": round(median(job_steady)),
        "job_startup_seconds_median": round(median(job_startup), 2),
        "job_commit_seconds_median": round(median(job_commit), 3),
        "ratio_steady_vs_best_plain": round(median(job_steady) / best_plain, 3),
        "ratio_end_to_end_vs_best_plain": round(median(job_end_to_end) / best_plain, 3),
    }


def write_table_days(directory: Path, rows: int, files: int = 4, seed: int = 0) -> Path:
    """A mixed table: 8 numeric columns (2% missing) and 2 categorical ones, in `files` Parquet files."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    per_file = rows // files
    for i in range(files):
        columns = {"item_id": np.arange(i * per_file, (i + 1) * per_file)}
        for j in range(8):
            values = rng.normal(j, 1 + j, per_file)
            columns[f"x{j}"] = pa.array(values, mask=rng.random(per_file) < 0.02)
        columns["country"] = pa.array(rng.choice([f"c{k}" for k in range(20)], per_file))
        columns["channel"] = pa.array(rng.choice(["web", "app", "store"], per_file))
        pq.write_table(pa.table(columns), directory / f"part-{i:03d}.parquet", row_group_size=65536)
    return directory


def table_version(model_root: Path, data: Path, missingness: bool = True) -> str:
    """An untrained mixed-table version with the data's own input profile (what training would store);
    missingness: with the decoder's presence head (the default), else scored as before it."""
    from vae.data.keys import key_hash
    from vae.data.tabular import TableStats, fit_table
    from vae.monitoring.profile import InputProfile

    sample = pq.read_table(sorted(data.iterdir())[0]).slice(0, 50_000)
    kinds = tuple((name, "numeric") for name in sample.column_names[1:9]) + (
        ("country", "categorical"),
        ("channel", "categorical"),
    )
    hashes = key_hash(sample.column("item_id"))
    table = fit_table(TableStats.of(sample, kinds, hashes), kinds, {})
    features = FeatureSchema("item_id", len(kinds), feature_columns=tuple(n for n, _ in kinds), table=table)
    torch.manual_seed(0)
    model = VAE(
        ModelConfig(len(kinds), 16, (256, 128), "mixed", column_layout=table.layout, missingness=missingness)
    )
    stats = FeatureStats.of(features_to_numpy(sample, features))
    profile = InputProfile.of(sample, features, hashes)
    return save_model_version(
        model_root, model, Normalizer.fit(stats, "mixed"), features, {}, {}, {}, profile=profile.to_json()
    )


def data_check_cost(work: Path, data: Path, rows: int, repeats: int, attribution: bool) -> dict:
    """The embed job on a mixed table with its data checks (the default) and with every check off (no
    input profile gathered), alternating: what profiling the batch in the encode pass and checking it
    at the commit cost."""
    version = table_version(work / "models", data)
    off = {name: "off" for name in ("null_rate", "scale", "range", "new_categories", "vanished_categories")}
    off |= {"duplicate_keys": "off", "row_count": "off"}
    seconds: dict[str, list[float]] = {"checks": [], "no_checks": []}
    for repeat in range(repeats):
        for kind, checks in (("no_checks", off), ("checks", {})):
            elapsed, result = embed_once(
                work, data, version, rows, attribution=attribution, data_checks=checks
            )
            assert bool(result.data_checks) == (kind == "checks")
            seconds[kind].append(elapsed)
            print(f"  data checks, {rows:,} rows, repeat {repeat}: {kind} {elapsed:.1f}s", flush=True)
    return {
        "rows": rows,
        "attribution": attribution,
        "seconds_median": {kind: round(median(v), 2) for kind, v in seconds.items()},
        "ratio_checks_vs_no_checks": round(median(seconds["checks"]) / median(seconds["no_checks"]), 3),
    }


def missingness_cost(work: Path, data: Path, rows: int, repeats: int) -> dict:
    """The embed job (attribution on, the default) on the same mixed table with a version that has the
    missingness head and one from before it (missing values skipped), alternating."""
    versions = {kind: table_version(work / "models", data, kind == "head") for kind in ("skip", "head")}
    seconds: dict[str, list[float]] = {kind: [] for kind in versions}
    for repeat in range(repeats):
        for kind, version in versions.items():
            elapsed, _ = embed_once(work, data, version, rows)
            seconds[kind].append(elapsed)
            print(f"  missingness head, {rows:,} rows, repeat {repeat}: {kind} {elapsed:.1f}s", flush=True)
    head, skip = median(seconds["head"]), median(seconds["skip"])
    return {
        "rows": rows,
        "seconds_median": {"head": round(head, 2), "skip": round(skip, 2)},
        "rows_per_second_ratio_head_vs_skip": round(skip / head, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--image-rows", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--table-rows", type=int, default=1_000_000, help="the data checks' cost case")
    parser.add_argument("--only-checks", action="store_true", help="only the data checks' cost")
    parser.add_argument("--only-scores", action="store_true", help="only the missingness head's cost")
    args = parse_args(parser, rows=[20_000], image_rows=4_000, repeats=1, table_rows=20_000)

    import ray

    from ray_jobs.cluster import ray_session

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        ray_start, _ = timed(
            lambda: ray.init(
                address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False
            )
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        results: dict = {
            "dim": args.dim,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "batch_size": args.batch_size,
            "ray_init_seconds": round(ray_start, 2),
            "sizes": [],
        }
        with ray_session():
            table = write_table_days(work / "table", args.table_rows)  # one mixed table for both costs
            results["missingness_head"] = missingness_cost(work, table, args.table_rows, args.repeats)
            if args.only_scores:
                save("embed_scores", results)
                return
            results["data_checks"] = [
                data_check_cost(work, table, args.table_rows, args.repeats, attribution)
                for attribution in (True, False)
            ]
            shutil.rmtree(table)
            if args.only_checks:
                save("embed_checks", results)
                return
            version = untrained_version(work / "models", args.dim)
            for rows in args.rows:
                data = write_vectors(work / f"data-{rows}", rows, args.dim)
                results["sizes"].append(compare(work, data, version, rows, args.repeats, args.batch_size))
                shutil.rmtree(data)

            flops = {threads: matmul_flops_per_second(threads) for threads in (1, 2)}
            images = write_images(work / "images", args.image_rows)
            image_model = image_version(work / "models")
            per_row = model_flops_per_row(load_model_version(work / "models", image_model).model)
            image = compare(work, images, image_model, args.image_rows, args.repeats, args.batch_size)
            limit = max(flops.values()) / per_row
            image.update(
                {
                    "model": "MLP 784-512-256, z=32, Bernoulli",
                    "flops_per_row": per_row,
                    "matmul_gflops": {f"{k}_thread": round(v / 1e9, 1) for k, v in flops.items()},
                    "compute_limit_rows_per_s": round(limit),
                    "job_steady_share_of_compute_limit": round(
                        image["job_steady_rows_per_s_median"] / limit, 3
                    ),
                    "best_plain_share_of_compute_limit": round(
                        max(image["plain_rows_per_s_median"].values()) / limit, 3
                    ),
                }
            )
            results["image_784"] = image
        ray.shutdown()
        save("embed", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
