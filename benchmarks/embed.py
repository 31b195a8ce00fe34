"""Embedding throughput: the Ray Data job vs a plain single-process pyarrow + torch loop.

Both read the same Parquet files, run the same encoder (posterior mean + anomaly score) and
write Parquet. The baseline takes the best of 1 and 2 torch threads. Ray's start-up is
reported separately; the job's time includes its fixed per-run cost (actor start, planning).

    python -m benchmarks.embed [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from statistics import median

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import save, timed, untrained_version, write_vectors
from vae import encode_matrix, features_to_numpy, load_model_version
from vae.encode import latent_column


def plain_loop(data: Path, model_root: Path, version: str, output: Path, threads: int, batch_size: int) -> int:
    """The hand-written baseline: one process, no Ray."""
    torch.set_num_threads(threads)
    loaded = load_model_version(model_root, version)
    output.mkdir(parents=True)
    rows = 0
    for i, path in enumerate(sorted(data.glob("*.parquet"))):
        with pq.ParquetWriter(output / f"part-{i}.parquet", schema=_schema()) as writer:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["item_id", "vec"]):
                mean, score = encode_matrix(loaded.model, loaded.normalizer, features_to_numpy(batch, loaded.features))
                columns = {"item_id": batch.column("item_id"), "latent": latent_column(mean), "anomaly_score": score}
                writer.write_table(pa.table(columns, schema=_schema()))
                rows += len(mean)
    return rows


def _schema() -> pa.Schema:
    return pa.schema([("item_id", pa.int64()), ("latent", pa.list_(pa.float32())), ("anomaly_score", pa.float32())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()

    import ray

    from ray_jobs.common import ray_session
    from ray_jobs.embed import EmbedConfig, embed

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        data = write_vectors(work / "data", args.rows, args.dim)
        version = untrained_version(work / "models", args.dim)
        ray_start, _ = timed(lambda: ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False))
        ray.data.DataContext.get_current().enable_progress_bars = False
        plain: dict[int, list[float]] = {1: [], 2: []}
        ray_job: list[float] = []
        with ray_session():
            for repeat in range(args.repeats):
                for threads in (1, 2):
                    output = work / f"plain-{repeat}-{threads}"
                    seconds, rows = timed(lambda: plain_loop(data, work / "models", version, output, threads, args.batch_size))  # noqa: B023
                    assert rows == args.rows
                    plain[threads].append(args.rows / seconds)
                seconds, _ = timed(lambda: embed(EmbedConfig(data=str(data), model_root=str(work / "models"), output=str(work / "ray"),
                                                             batch_size=args.batch_size)))
                ray_job.append(args.rows / seconds)
                print(f"repeat {repeat}: plain 1 thread {plain[1][-1]:,.0f} rows/s, 2 threads {plain[2][-1]:,.0f} rows/s, "
                      f"ray job {ray_job[-1]:,.0f} rows/s", flush=True)
        ray.shutdown()
        best_plain = max(median(plain[1]), median(plain[2]))
        save("embed", {
            "rows": args.rows, "dim": args.dim, "repeats": args.repeats, "cpus": os.cpu_count(),
            "ray_start_seconds": round(ray_start, 2),
            "plain_rows_per_s_median": {str(k): round(median(v)) for k, v in plain.items()},
            "ray_job_rows_per_s_median": round(median(ray_job)),
            "ratio_end_to_end_vs_best_plain": round(median(ray_job) / best_plain, 3),
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
