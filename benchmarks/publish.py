"""Online writes and reads: the publish job's writers vs Feast's own `write_to_online_store` and
`materialize`, same data, same run, on SQLite and on Redis (a redis-server started here).

    writes   rows/s of: one `write_to_online_store` call on all rows (Feast's DataFrame path);
             `materialize` of a smaller version (it is far slower); the publish path (SQLite: one
             writer, the store takes one at a time; Redis: 1 writer in this process and 2 Ray
             writer actors), each into a fresh view and verified by counting the keys in the store
    reads    p50/p99 of `get_online_features` for 1 and 100 entities, in process and through
             `feast serve` (HTTP), and 16 concurrent HTTP clients for `--load-seconds`
    search   `--vector-rows` vectors indexed in Milvus Lite by publish; recall@10 and p50/p99 of
             `retrieve_online_documents_v2` vs exact NumPy brute force on the same vectors

    python -m benchmarks.publish [--rows 1000000] [--stores sqlite redis]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import http_load, parse_args, save, synthetic_embeddings, timed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the servers the tests start
from helpers.servers import free_port, redis_server, wait_for_port, with_redis_online_store  # noqa: E402

from vae.embeddings import contract

REPO = Path(__file__).resolve().parent.parent
VERSION, SMALL_VERSION, VECTOR_VERSION = (
    "20260101T000000Z-bench000",
    "20260101T000000Z-bench001",
    "20260101T000000Z-bench002",
)


def write_embeddings(directory: Path, rows: int, dim: int, files: int = 4) -> pa.Table:
    """Synthetic embeddings in the embed job's layout and the contract's schema."""
    directory.mkdir(parents=True)
    tables = []
    per_file = rows // files
    for i in range(files):
        when = datetime(2026, 1, 1, tzinfo=UTC)
        table = synthetic_embeddings(i * per_file, per_file, dim, directory.name, "bench", when)
        pq.write_table(table, directory / f"part-{i:06d}.parquet", row_group_size=65_536)
        tables.append(table)
    return pa.concat_tables(tables)


def add_version(repo, name: str, table: pa.Table) -> None:
    """The rows as one batch of a version's table in the repo's catalog (as the embed job lands them)."""
    from conftest import commit_rows

    owner = repo.catalog.register("item", "item_id", "int64")
    version_table = repo.catalog.create_table(owner, name, contract.schema("item_id", pa.int64()), {})
    index = table.schema.get_field_index("model_version")
    rows = table.set_column(index, "model_version", pa.array([name] * table.num_rows))
    commit_rows(repo.catalog, version_table, rows, "bench")


def make_repo(work: Path, store_kind: str) -> Path:
    """A copy of the project's Feast repo, switched to Redis the documented way if asked."""
    repo = work / f"repo-{store_kind}"
    repo.mkdir()
    shutil.copy(REPO / "feature_repo" / "features.py", repo)
    text = (REPO / "feature_repo" / "feature_store.yaml").read_text()
    if store_kind == "redis":
        text = with_redis_online_store(text)
    (repo / "feature_store.yaml").write_text(text)
    (repo / "vector_search").mkdir()
    shutil.copy(REPO / "feature_repo" / "vector_search" / "feature_store.yaml", repo / "vector_search")
    return repo


def percentiles(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(ordered[len(ordered) // 2], 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def read_latencies(call, repeats: int) -> dict:
    call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


def bench_store(
    work: Path,
    store_kind: str,
    table: pa.Table,
    small_rows: int,
    writer_counts: list[int],
    load_seconds: float,
) -> dict:
    from feast_embeddings import EmbeddingsRepo
    from feast_embeddings.verify import online_row_count
    from ray_jobs.config import PublishConfig
    from ray_jobs.publish import write_online

    repo_dir = make_repo(work, store_kind)
    repo = EmbeddingsRepo(repo_dir)
    store = repo.store
    # Each writer fills a fresh view (its own SQLite table / Redis fields) with the same rows:
    # re-writing a view would measure updates, or on Redis nothing (an older event time is skipped).
    counts = writer_counts if store_kind != "sqlite" else [1]  # SQLite takes one writer at a time
    small = pq.read_table(work / "embeddings" / SMALL_VERSION)
    names = (VERSION, SMALL_VERSION, *(f"{VERSION}-w{writers}" for writers in counts))
    for name in names:
        add_version(repo, name, small if name == SMALL_VERSION else table)
    views = {name: repo.version_view("item", name, online=True, published_at="") for name in names}
    store.apply([repo.entity("item"), *views.values()])
    view = views[VERSION].name
    rows = table.num_rows
    result: dict = {"store": store_kind, "rows": rows}

    frame = table.to_pandas()
    seconds, _ = timed(lambda: store.write_to_online_store(view, frame))
    result["feast_write_to_online_store_rows_per_s"] = round(rows / seconds)
    assert online_row_count(store, store.get_feature_view(view)) == rows

    window = (datetime(2025, 12, 31, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC))
    seconds, _ = timed(
        lambda: store.materialize(window[0], window[1], feature_views=[views[SMALL_VERSION].name])
    )
    result["feast_materialize_rows_per_s"] = round(small_rows / seconds)
    result["feast_materialize_rows"] = small_rows

    result["publish_writers"] = {}
    for writers in counts:
        config = PublishConfig(feature_repo=str(repo_dir), writers=writers, parallel_min_rows=0)
        target = store.get_feature_view(views[f"{VERSION}-w{writers}"].name)
        # the publish path's write: the writers, then every written key's event time read back
        seconds, (written, _) = timed(lambda: write_online(config, repo, target, table, "item_id"))  # noqa: B023
        result["publish_writers"][str(writers)] = round(written / seconds)
        print(
            f"  {store_kind}: {writers} writer(s) {written / seconds:,.0f} rows/s "
            f"({written / seconds / result['feast_write_to_online_store_rows_per_s']:.2f}x, counted in the "
            "store)",
            flush=True,
        )
    best = max(result["publish_writers"].values())
    result["ratio_best_publish_vs_write_to_online_store"] = round(
        best / result["feast_write_to_online_store_rows_per_s"], 2
    )

    features = [f"{view}:latent", f"{view}:anomaly_score", f"{view}:model_version"]
    result["in_process_read"] = {
        str(n): read_latencies(
            lambda n=n: store.get_online_features(
                features=features, entity_rows=[{"item_id": k} for k in range(n)]
            ),
            300,
        )
        for n in (1, 100)
    }
    result["http"] = bench_http(repo_dir, view, load_seconds)
    print(f"  {store_kind}: {json.dumps(result)}", flush=True)
    return result


def bench_vector_search(work: Path, rows: int, dim: int, queries: int) -> dict:
    """Index `rows` vectors of one version in Milvus Lite through publish, then search: recall@10 and
    latency of `retrieve_online_documents_v2` vs exact NumPy brute force on the same vectors."""
    from feast import FeatureStore

    from feast_embeddings import EmbeddingsRepo, search_similar
    from feast_embeddings.vectors import index_vectors

    repo_dir = make_repo(work, "vectors")
    yaml_path = repo_dir / "vector_search" / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("embedding_dim: 16", f"embedding_dim: {dim}"))
    table = write_embeddings(work / "embeddings" / VECTOR_VERSION, rows, dim, files=1)
    repo = EmbeddingsRepo(repo_dir)
    repo.catalog.register("item", "item_id", "int64")
    seconds, _ = timed(lambda: index_vectors(repo, "item", VECTOR_VERSION, table, 65_536, keep_online=2))
    store = FeatureStore(repo_path=str(repo_dir / "vector_search"))
    view = repo.definitions.vector_view_name("item", VECTOR_VERSION)

    keys = table.column("item_id").to_numpy()
    vectors = np.asarray(table.column("latent").combine_chunks().values.to_numpy()).reshape(rows, dim)
    query_vectors = np.random.default_rng(1).standard_normal((queries, dim)).astype(np.float32)
    recalls, search_ms, exact_ms = [], [], []
    search_similar(store, view, query_vectors[0], 10)  # warm-up: connects and loads the collection
    for query in query_vectors:
        started = time.perf_counter()
        hits = search_similar(store, view, query, 10)
        search_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        exact = keys[np.argpartition(((vectors - query) ** 2).sum(axis=1), 10)[:10]]
        exact_ms.append((time.perf_counter() - started) * 1000)
        recalls.append(len(set(exact.tolist()) & {h["item_id"] for h in hits}) / 10)
    result = {
        "rows": rows,
        "dim": dim,
        "queries": queries,
        "index_rows_per_s": round(rows / seconds),
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "search": percentiles(search_ms),
        "numpy_brute_force": percentiles(exact_ms),
    }
    print(f"  vector search: {json.dumps(result)}", flush=True)
    return result


def bench_http(repo_dir: Path, view: str, load_seconds: float) -> dict:
    port = free_port()
    feast = shutil.which("feast", path=str(Path(sys.executable).parent)) or "feast"
    server = subprocess.Popen(
        [feast, "serve", "-h", "127.0.0.1", "-p", str(port), "--no-access-log", "--max-requests", "0"],
        cwd=repo_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, server, "feast serve", seconds=120)
        url = f"http://127.0.0.1:{port}/get-online-features"
        features = [f"{view}:latent", f"{view}:anomaly_score", f"{view}:model_version"]

        def post(n: int) -> None:
            body = json.dumps({"features": features, "entities": {"item_id": list(range(n))}}).encode()
            with urllib.request.urlopen(
                urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=30
            ) as response:
                response.read()

        result = {str(n): read_latencies(lambda n=n: post(n), 200) for n in (1, 100)}
        result["load_16_clients"] = http_load(
            url, {"features": features, "entities": {"item_id": [7]}}, clients=16, seconds=load_seconds
        )
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--materialize-rows", type=int, default=100_000)
    parser.add_argument("--stores", nargs="*", default=["sqlite", "redis"])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--load-seconds", type=float, default=30)
    parser.add_argument(
        "--vector-rows", type=int, default=100_000, help="vectors indexed for the search figures (0: skip)"
    )
    parser.add_argument(
        "--vector-dim", type=int, default=16, help="latent size for the search figures (the train default)"
    )
    parser.add_argument("--vector-queries", type=int, default=200, help="queries of the search figures")
    args = parse_args(
        parser, rows=5_000, materialize_rows=1_000, load_seconds=1, vector_rows=2_000, vector_queries=5
    )

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    servers = contextlib.ExitStack()
    if "redis" in args.stores and shutil.which("redis-server"):
        # The password reaches Feast through the environment, set before Ray starts so that Ray's
        # writer actors inherit it.
        port, password = servers.enter_context(redis_server())
        os.environ["REDIS_CONNECTION_STRING"] = f"127.0.0.1:{port},password={password}"
    try:
        table = write_embeddings(work / "embeddings" / VERSION, args.rows, args.dim)
        write_embeddings(work / "embeddings" / SMALL_VERSION, args.materialize_rows, args.dim, files=1)
        ray_start, _ = timed(
            lambda: ray.init(
                address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False
            )
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        results = {
            "rows": args.rows,
            "dim": args.dim,
            "cpus": os.cpu_count(),
            "ray_init_seconds": round(ray_start, 2),
            "stores": [],
        }
        for store_kind in args.stores:
            if store_kind == "redis" and shutil.which("redis-server") is None:
                print("redis-server not installed; skipping Redis (make test installs it)")
                continue
            results["stores"].append(
                bench_store(work, store_kind, table, args.materialize_rows, args.writers, args.load_seconds)
            )
        if args.vector_rows:
            results["vector_search"] = bench_vector_search(
                work, args.vector_rows, args.vector_dim, queries=args.vector_queries
            )
        ray.shutdown()
        save("publish", results)
    finally:
        servers.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
