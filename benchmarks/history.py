"""Point-in-time training sets from the embeddings' Iceberg table: Feast's `get_historical_features`
on a version view backed by IcebergSource (the project's path: DuckDB offline store, the table read
through pyiceberg) vs the same view backed by a FileSource over the very same Parquet files (Feast's
plain path), same entity rows, same run.

    rows      a version of `--rows` embeddings (64-d latents) in `--batches` daily batches
    query     `--entities` entity rows at a time after every batch, medians of `--repeats`
    memory    the process's peak RSS growth during the Iceberg query (the source is read whole)

    python -m benchmarks.history [--rows 1000000] [--entities 10000]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import median

import numpy as np
import pandas as pd
import pyarrow as pa

from benchmarks.common import parse_args, save, synthetic_embeddings, timed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import commit_rows  # noqa: E402  the tests' way of landing a batch without Ray

from vae.embeddings import contract  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VERSION = "20260101T000000Z-history0"
DAY = datetime(2026, 1, 1, tzinfo=UTC)


def build(work: Path, rows: int, batches: int, dim: int):
    """A repo whose catalog holds one version of `rows` rows in `batches` batches, published (views only)."""
    from feast_embeddings import EmbeddingsRepo

    repo_dir = work / "feature_repo"
    shutil.copytree(REPO / "feature_repo", repo_dir, ignore=shutil.ignore_patterns("data", "__pycache__"))
    repo = EmbeddingsRepo(repo_dir)
    owner = repo.catalog.register("item", "item_id", "int64")
    table = repo.catalog.create_table(owner, VERSION, contract.schema("item_id", pa.int64()), {})
    per_batch = rows // batches
    for day in range(batches):
        when = DAY + timedelta(days=day)
        batch = synthetic_embeddings(day * per_batch, per_batch, dim, VERSION, f"day-{day}", when)
        commit_rows(repo.catalog, table, batch, f"day-{day}")
    repo.update_publication("item", **{f"published.{VERSION}": DAY.isoformat()})
    repo.apply()
    return repo, repo.catalog.table("item", VERSION)


def file_view(repo, table):
    """The same view over the table's data files as a plain Feast FileSource (the baseline)."""
    from feast import FileSource

    files = repo.catalog.data_files(table)
    root = str(Path(files[0]).parents[2])  # <table>/data: every batch's files below it
    source = FileSource(
        name="history_file_source", path=f"{root}/*/*/*.parquet", timestamp_field="event_timestamp"
    )
    view = repo.definitions.version_view(repo.entity("item"), "file-baseline", source, False, "")
    repo.store.apply([repo.entity("item"), view])
    return view.name


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, rows=20_000, batches=2, entities=500, repeats=1)
    work = Path(tempfile.mkdtemp(prefix="bench-history-"))
    try:
        seconds, (repo, table) = timed(lambda: build(work, args.rows, args.batches, args.dim))
        print(f"built {args.rows:,} rows in {args.batches} batches in {seconds:.1f}s", flush=True)
        iceberg_view = repo.version_view_name("item", VERSION)
        baseline_view = file_view(repo, table)
        rng = np.random.default_rng(1)
        entity_df = pd.DataFrame(
            {
                "item_id": rng.choice(args.rows, args.entities, replace=False),
                "event_timestamp": [DAY + timedelta(days=args.batches)] * args.entities,
            }
        )
        runs: dict[str, list[float]] = {"iceberg": [], "file": []}
        rss_before = peak_rss_mb()
        for repeat in range(args.repeats):
            for path, view in (("iceberg", iceberg_view), ("file", baseline_view)):
                features = [f"{view}:latent", f"{view}:model_version"]
                seconds, frame = timed(
                    lambda f=features: repo.store.get_historical_features(
                        entity_df=entity_df, features=f
                    ).to_df()
                )
                assert frame["latent"].notna().all() and len(frame) == args.entities
                runs[path].append(seconds)
            print(
                f"  repeat {repeat}: IcebergSource {runs['iceberg'][-1]:.2f}s, FileSource "
                f"{runs['file'][-1]:.2f}s for {args.entities:,} entity rows",
                flush=True,
            )
        result = {
            "rows": args.rows,
            "batches": args.batches,
            "entities": args.entities,
            "iceberg_seconds_median": round(median(runs["iceberg"]), 3),
            "file_seconds_median": round(median(runs["file"]), 3),
            "ratio_iceberg_vs_file": round(median(runs["iceberg"]) / median(runs["file"]), 3),
            "peak_rss_growth_mb": round(peak_rss_mb() - rss_before, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        print(result)
        save("history", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
