"""The daily pipeline on embedded defaults: digits -> two days of Parquet -> train on day 1 ->
embed + publish day 1 -> embed + publish day 2 with the same model version.

Uses scikit-learn's bundled digits (1797 8x8 images), so it needs no download. Runs on a local
Ray cluster that it starts and stops itself (or on the one RAY_ADDRESS points at). The embeddings go
to the feature repo's Iceberg catalog (feature_store.yaml, vae_embeddings: SQLite + local warehouse).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs.cli import run_cli
from ray_jobs.cluster import ray_session
from ray_jobs.config import DemoConfig, EmbedConfig, PublishConfig, TrainConfig, parse_config
from ray_jobs.embed import embed
from ray_jobs.publish import publish
from ray_jobs.train import train
from vae.catalog import table_name

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
    """Two days of digits: train on day 1, then embed and publish each day as a batch; each stage timed."""
    work_dir = Path(config.work_dir).absolute()
    model_root = work_dir / "models"
    repo_yaml = str(Path(config.feature_repo) / "feature_store.yaml")
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
        published = {}
        for day, (event_time, _, _) in days.items():
            embedding = EmbedConfig(
                data=str(data[day]),
                model_root=str(model_root),
                model_version=version,
                batch=day,
                event_time=event_time,
                feature_store_yaml=repo_yaml,
            )
            timed(timings, f"embed {day}", embed, embedding)
            publishing = PublishConfig(
                model_version=version,
                feature_repo=config.feature_repo,
                model_root=str(model_root),
                monitoring=str(work_dir / "monitoring"),
            )
            published[day] = timed(timings, f"publish {day}", publish, publishing)
    timings["total"] = time.perf_counter() - started
    last = published["day-2"]
    summary = {
        "model_version": version,
        "timings": timings,
        "sample": last["sample"],
        "rows": {day: p["rows"] for day, p in published.items()},
        "version_keys": last["version_keys"],
    }
    print_summary(config, data, model_root, published, summary)
    return summary


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


def print_summary(config: DemoConfig, data: dict, model_root: Path, published: dict, summary: dict) -> None:
    gate = published["day-1"]["gate"]
    print("\nDemo finished.")
    print(f"  datasets       {', '.join(str(path) for path in data.values())}")
    print(f"  model version  {model_root / summary['model_version']}")
    rows = ", ".join(f"{day} {count} rows" for day, count in summary["rows"].items())
    print(
        f"  embeddings     table vae.item.{table_name(summary['model_version'])}: {rows} written online, "
        f"{summary['version_keys']} keys in all"
    )
    repo = Path(config.feature_repo).absolute()
    view = published["day-2"]["view"]
    print(f"  feature store  {repo}  (view {view}, service item_embeddings_current)")
    print(f"  monitoring     {gate['report']}  (gate {'passed' if gate['passed'] else 'failed'})")
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings"].items())
    print(f"  stage timings  {timings}")
    print(f"  history        vaectl embeddings history item {summary['model_version']}")
    print("  online sample:")
    for entity in published["day-2"]["sample"]:
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
