"""The daily pipeline on embedded defaults: digits -> two days of Parquet -> train on day 1 (tracked
in MLflow, registered as vae-item) -> the daily step (`vaectl pipeline`: embed, monitor, publish) for
day 1, which makes the version current and vae-item@champion, and for day 2 with the same version.

Uses scikit-learn's bundled digits (1797 8x8 images), so it needs no download. Runs on a local
Ray cluster that it starts and stops itself (or on the one RAY_ADDRESS points at). The embeddings go
to the feature repo's Iceberg catalog (feature_store.yaml, vae_embeddings: SQLite + local warehouse).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.verify import fetch_online
from ray_jobs.cli import run_cli
from ray_jobs.cluster import ray_session
from ray_jobs.config import DemoConfig, PipelineConfig, TrainConfig, parse_config
from ray_jobs.pipeline import step
from ray_jobs.train import train
from vae.embeddings.catalog import table_name
from vae.versions.mlflow_registry import CHAMPION, TRACKING_ENV, registered_model_name

log = logging.getLogger("ray_jobs.demo")


DAY_1_ROWS = 1200  # the rest of the 1797 digits arrive on day 2


def write_digits_parquet(path: Path, rows: int | None = None, start: int = 0) -> Path:
    """scikit-learn's digits as Parquet: item_id, pixels (fixed-size list of 64 float32), label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    stop = None if rows is None else start + rows
    pixels = digits.data.astype(np.float32)[start:stop]
    table = pa.table(
        {
            "item_id": pa.array(np.arange(start, start + len(pixels)), pa.int64()),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), 64),
            "label": pa.array(digits.target[start:stop].astype(np.int64)),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def demo(config: DemoConfig) -> dict:
    """Two days of digits: train on day 1, then the daily pipeline step for each day (embed, monitor,
    publish; day 1 makes the version current); each stage timed."""
    work_dir = Path(config.work_dir).absolute()
    with tracking_to(
        config.tracking_uri or os.environ.get(TRACKING_ENV) or f"sqlite:///{work_dir}/mlflow.db"
    ):
        return _demo(config, work_dir)


@contextlib.contextmanager
def tracking_to(uri: str) -> Iterator[None]:
    """MLFLOW_TRACKING_URI for the demo's jobs: training reads it, and so does the feature repo's mlflow
    block (publish moves vae-item@champion)."""
    saved = os.environ.get(TRACKING_ENV)
    os.environ[TRACKING_ENV] = uri
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(TRACKING_ENV)
        else:
            os.environ[TRACKING_ENV] = saved


def _demo(config: DemoConfig, work_dir: Path) -> dict:
    model_root = work_dir / "models"
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days = {"day-1": (today - timedelta(days=1), 0, DAY_1_ROWS), "day-2": (today, DAY_1_ROWS, None)}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with ray_session():
        timings["ray start"] = time.perf_counter() - started
        data = {
            day: timed(
                timings,
                f"write {day}",
                write_digits_parquet,
                work_dir / "data" / day / "digits.parquet",
                rows,
                first,
            )
            for day, (_, first, rows) in days.items()
        }
        version = timed(timings, "train", train, training_config(config, data["day-1"], model_root, work_dir))
        steps = {}
        for day, (event_time, _, _) in days.items():
            daily = PipelineConfig(
                data=str(data[day].parent),
                batch=day,
                event_time=event_time,
                feature_repo=config.feature_repo,
                model_root=str(model_root),
                initial_version=version,
                monitoring=str(work_dir / "monitoring"),
                exit_codes=False,
            )
            steps[day] = timed(timings, f"pipeline {day}", step, daily)
    timings["total"] = time.perf_counter() - started
    repo = EmbeddingsRepo(config.feature_repo)
    view = repo.version_view_name("item", version)
    day_2 = pq.read_table(data["day-2"], columns=["item_id"]).column("item_id").to_pylist()
    sample = fetch_online(repo.store, view, day_2[:3], "item_id")
    table = repo.catalog.table("item", version)
    summary = {
        "model_version": version,
        "timings": timings,
        "sample": sample,
        "rows": {b.batch_id: b.rows for b in repo.catalog.batches(table)},
        "decisions": {day: [d.line() for d in result.decisions] for day, result in steps.items()},
        "current": steps["day-2"].current,
        "registry": registry_summary(repo, version),
    }
    print_summary(config, data, model_root, view, summary)
    return summary


def registry_summary(repo: EmbeddingsRepo, version: str) -> dict:
    """Where the version is in MLflow: its registered number, training run and the champion alias."""
    registry = repo.model_registry
    registered = registry.find(registered_model_name("item"), version)
    return {
        "uri": registry.uri,
        "registered_version": registered.version if registered else None,
        "run_id": registered.run_id if registered else None,
        "champion": registry.alias(registered_model_name("item"), CHAMPION),
    }


def training_config(config: DemoConfig, data: Path, model_root: Path, work_dir: Path) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        vector_column="pixels",
        image_shape=[1, 8, 8],
        model_root=str(model_root),
        epochs=config.epochs,
        batch_size=config.batch_size,
        latent_dim=config.latent_dim,
        learning_rate=config.learning_rate,
        kl_warmup_epochs=config.kl_warmup_epochs,
        num_workers=config.num_workers,
        storage_path=str(work_dir / "ray_results"),
    )


def timed(timings: dict[str, float], stage: str, step, *args):
    started = time.perf_counter()
    result = step(*args)
    timings[stage] = time.perf_counter() - started
    return result


def print_summary(config: DemoConfig, data: dict, model_root: Path, view: str, summary: dict) -> None:
    print("\nDemo finished.")
    print(f"  datasets       {', '.join(str(path) for path in data.values())}")
    print(f"  model version  {model_root / summary['model_version']}")
    rows = ", ".join(f"{day} {count} rows" for day, count in summary["rows"].items())
    print(f"  embeddings     table vae.item.{table_name(summary['model_version'])}: {rows}")
    repo = Path(config.feature_repo).absolute()
    print(f"  feature store  {repo}  (view {view}, service item_embeddings_current -> {summary['current']})")
    print(f"  monitoring     {Path(config.work_dir).absolute() / 'monitoring'}")
    registry = summary["registry"]
    print(
        f"  MLflow         {registry['uri']}: vae-item version {registry['registered_version']} "
        f"(run {registry['run_id']}), vae-item@champion -> {registry['champion']}"
    )
    print(f"                 UI: .mlflow-venv/bin/mlflow ui --backend-store-uri {registry['uri']}")
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings"].items())
    print(f"  stage timings  {timings}")
    print(f"  history        vaectl embeddings history item {summary['model_version']}")
    print("  decisions      (vaectl embeddings decisions item)")
    for lines in summary["decisions"].values():
        for line in lines:
            print(f"    {line}")
    print("  online sample:")
    for entity in summary["sample"]:
        latent = np.round(entity["latent"][:4], 3).tolist()
        print(
            f"    item_id={entity['item_id']} latent[:4]={latent} "
            f"anomaly_score={entity['anomaly_score']:.2f} is_anomaly={entity['is_anomaly']} "
            f"model_version={entity['model_version']}"
        )


def run(config: DemoConfig) -> dict:
    return demo(config)


def main(argv: list[str] | None = None) -> dict:
    return demo(parse_config(DemoConfig, argv, prog="vaectl demo"))


if __name__ == "__main__":
    run_cli(main)
