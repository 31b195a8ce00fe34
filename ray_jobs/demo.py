"""The whole pipeline on embedded defaults: digits -> Parquet -> train -> embed -> publish.

Uses scikit-learn's bundled digits (1797 8x8 images), so it needs no download. Runs on a local
Ray cluster that it starts and stops itself (or on the one RAY_ADDRESS points at).
"""

from __future__ import annotations

import logging
import time
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

log = logging.getLogger("ray_jobs.demo")


def write_digits_parquet(path: Path, rows: int | None = None) -> Path:
    """scikit-learn's digits as Parquet: item_id, pixels (fixed-size list of 64 float32), label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.data.astype(np.float32)[:rows]
    table = pa.table(
        {
            "item_id": pa.array(np.arange(len(pixels)), pa.int64()),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), 64),
            "label": pa.array(digits.target[:rows].astype(np.int64)),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def demo(config: DemoConfig) -> dict:
    """digits -> Parquet -> train -> embed -> publish, each stage timed; prints where everything went."""
    work_dir = Path(config.work_dir).absolute()
    model_root = work_dir / "models"
    embeddings = Path(config.feature_repo).absolute() / "data" / "embeddings"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with ray_session():
        timings["ray start"] = time.perf_counter() - started
        data = timed(timings, "write dataset", write_digits_parquet, work_dir / "data" / "digits.parquet")
        training = TrainConfig(
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
        version = timed(timings, "train", train, training)
        embedding = EmbedConfig(
            data=str(data), model_root=str(model_root), model_version=version, output=str(embeddings)
        )
        output = timed(timings, "embed", embed, embedding).output
    publishing = PublishConfig(
        embeddings=str(embeddings),
        model_version=version,
        feature_repo=config.feature_repo,
        model_root=str(model_root),
        monitoring=str(work_dir / "monitoring"),
    )
    published = timed(timings, "publish", publish, publishing)
    timings["total"] = time.perf_counter() - started
    summary = {
        "model_version": version,
        "embeddings": str(output),
        "timings": timings,
        "sample": published["sample"],
    }
    print_summary(config, data, model_root, published, summary)
    return summary


def timed(timings: dict[str, float], stage: str, step, *args):
    started = time.perf_counter()
    result = step(*args)
    timings[stage] = time.perf_counter() - started
    return result


def print_summary(config: DemoConfig, data: Path, model_root: Path, published: dict, summary: dict) -> None:
    gate = published["gate"]
    print("\nDemo finished.")
    print(f"  dataset        {data}")
    print(f"  model version  {model_root / summary['model_version']}")
    print(f"  embeddings     {summary['embeddings']}  ({published['rows']} rows)")
    repo = Path(config.feature_repo).absolute()
    print(f"  feature store  {repo}  (view {published['view']}, service item_embeddings_current)")
    print(f"  monitoring     {gate['report']}  (gate {'passed' if gate['passed'] else 'failed'})")
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in summary["timings"].items())
    print(f"  stage timings  {timings}")
    print("  online sample:")
    for entity in published["sample"]:
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
