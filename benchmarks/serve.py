"""The online encoding service (`vaectl serve`, Ray Serve) against a plain FastAPI + torch process doing
the same encoding (benchmarks.plain_encoder, one uvicorn worker, no batching), same run, same version.

A 64-d vector version (hidden [256, 128], latent 16) is embedded and published into a feature repo of
its own; then for 1-row and 64-row requests at 1, 8 and 32 concurrent clients (each one HTTP/1.1
connection, back to back for --seconds): requests/s, rows/s, p50 and p99 latency of the service without
write-through, with write-through (Feast online SQLite + Iceberg micro-commits), of the plain process, of
Ray Serve's floor (a deployment answering a constant: what any Serve app pays here) and of `feast serve`
reading the same keys' already-written vectors. Medians of --repeats runs; the ratios: the service's
rows/s over the plain process's, its requests/s over Serve's floor.

    python -m benchmarks.serve [--seconds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import pyarrow.parquet as pq

from benchmarks.common import http_load, parse_args, save, untrained_version, write_vectors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the servers the tests start
from helpers.servers import free_port, wait_for_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DIM = 64


def published_repo(work: Path, rows: int) -> tuple[Path, Path, str, list[dict]]:
    """(feature repo, model root, version, request rows): a version embedded and published."""
    from ray_jobs.config import EmbedConfig, PublishConfig
    from ray_jobs.embed import embed
    from ray_jobs.publish import publish

    data = write_vectors(work / "data", rows, DIM, files=1)
    version = untrained_version(work / "models", DIM)
    repo = work / "feature_repo"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(REPO / "feature_repo" / name, repo / name)
    embed(
        EmbedConfig(
            data=str(data),
            model_root=str(work / "models"),
            model_version=version,
            feature_store_yaml=str(repo / "feature_store.yaml"),
            batch="bench",
        )
    )
    publish(
        PublishConfig(
            feature_repo=str(repo), model_root=str(work / "models"), model_version=version, show=0, force=True
        )
    )
    table = pq.read_table(next((work / "data").glob("*.parquet")))
    requests = [{"item_id": r["item_id"], "vec": r["vec"]} for r in table.slice(0, 64).to_pylist()]
    return repo, work / "models", version, requests


def load(url: str, requests: list[dict], args, payload=lambda rows: {"rows": rows}) -> list[dict]:
    figures = []
    for rows in (1, 64):
        for clients in (1, 8, 32):
            runs = [
                http_load(url, payload(requests[:rows]), clients, args.seconds) for _ in range(args.repeats)
            ]
            figures.append(
                {
                    "rows_per_request": rows,
                    "clients": clients,
                    "requests_per_s": median(r["requests_per_s"] for r in runs),
                    "rows_per_s": median(r["requests_per_s"] * rows for r in runs),
                    "p50_ms": median(r["p50_ms"] or 0 for r in runs),
                    "p99_ms": median(r["p99_ms"] or 0 for r in runs),
                    "errors": sum(r["errors"] for r in runs),
                }
            )
            print(f"{url} {rows:>2} rows x {clients:>2} clients: {figures[-1]}", flush=True)
    return figures


def served(repo: Path, models: Path, requests: list[dict], args, write: bool) -> list[dict]:
    from ray import serve

    from ray_jobs.config import ServeConfig
    from ray_jobs.serve import start

    url = start(ServeConfig(feature_repo=str(repo), model_root=str(models), port=free_port(), write=write))
    try:
        return load(url, requests, args)
    finally:
        serve.shutdown()


def serve_floor(requests: list[dict], args) -> list[dict]:
    """Ray Serve's own cost here: a deployment that reads the body and answers a constant."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(logging_config={"enable_access_log": False}, max_ongoing_requests=256)
    class Constant:
        async def __call__(self, request):
            await request.body()
            return JSONResponse({"rows": []})

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Constant.bind(), name="floor", route_prefix="/floor")
    try:
        return load(f"http://127.0.0.1:{port}/floor", requests, args)
    finally:
        serve.shutdown()


def feast_serve(repo: Path, requests: list[dict], args) -> list[dict]:
    """`feast serve` reading the already-written vectors of the same keys (the current service)."""
    port = free_port()
    feast = shutil.which("feast", path=str(Path(sys.executable).parent)) or "feast"
    command = [feast, "serve", "-h", "127.0.0.1", "-p", str(port), "--no-access-log", "--max-requests", "0"]
    server = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def payload(rows: list[dict]) -> dict:
        return {
            "feature_service": "item_embeddings_current",
            "entities": {"item_id": [r["item_id"] for r in rows]},
        }

    try:
        wait_for_port(port, server, "feast serve", seconds=120)
        return load(f"http://127.0.0.1:{port}/get-online-features", requests, args, payload)
    finally:
        server.terminate()
        server.wait(30)


def plain(models: Path, version: str, requests: list[dict], args) -> list[dict]:
    port = free_port()
    env = {**os.environ, "PLAIN_MODEL_ROOT": str(models), "PLAIN_MODEL_VERSION": version}
    command = [sys.executable, "-m", "uvicorn", "benchmarks.plain_encoder:app", "--port", str(port)]
    server = subprocess.Popen([*command, "--log-level", "warning"], cwd=REPO, env=env)
    try:
        wait_for_port(port, server, "the plain encoder", seconds=120)
        return load(f"http://127.0.0.1:{port}/embed", requests, args)
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the published version")
    args = parse_args(parser, seconds=1.0, repeats=1, rows=2_000)
    from ray_jobs.cluster import ray_session

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        with ray_session():
            repo, models, version, requests = published_repo(work, args.rows)
            results = {
                "seconds": args.seconds,
                "repeats": args.repeats,
                "serve": served(repo, models, requests, args, write=False),
                "serve_write_through": served(repo, models, requests, args, write=True),
                "plain_fastapi": plain(models, version, requests, args),
                "serve_floor": serve_floor(requests, args),
                "feast_serve": feast_serve(repo, requests, args),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["ratio_rows_per_s"] = {
        f"{s['rows_per_request']}x{s['clients']}": round(s["rows_per_s"] / max(p["rows_per_s"], 1e-9), 2)
        for s, p in zip(results["serve"], results["plain_fastapi"], strict=True)
    }
    results["floor_ratio_requests_per_s"] = {
        f"{s['rows_per_request']}x{s['clients']}": round(
            s["requests_per_s"] / max(f["requests_per_s"], 1e-9), 2
        )
        for s, f in zip(results["serve"], results["serve_floor"], strict=True)
    }
    print("service rows/s over the plain process:", results["ratio_rows_per_s"])
    print("service requests/s over Ray Serve's floor:", results["floor_ratio_requests_per_s"])
    save("serve", results, show=False)


if __name__ == "__main__":
    main()
