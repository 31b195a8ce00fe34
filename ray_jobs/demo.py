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
from pydantic import Field

from ray_jobs.common import JobConfig, parse_config, ray_session, run_cli
from ray_jobs.embed import EmbedConfig, embed
from ray_jobs.publish import PublishConfig, publish
from ray_jobs.train import TrainConfig, train

log = logging.getLogger("ray_jobs.demo")


class DemoConfig(JobConfig):
    """Run train, embed and publish end to end on scikit-learn's digits."""

    work_dir: str = Field("demo_output", description="where the dataset, model versions and Ray results go")
    feature_repo: str = Field("feature_repo", description="Feast repo to publish into")
    epochs: int = Field(30, gt=0, description="training epochs")
    batch_size: int = Field(32, gt=0, description="examples per step on each worker (1797 rows: keep it small)")
    latent_dim: int = Field(16, gt=0, description="size of the latent vector")
    learning_rate: float = Field(1e-3, gt=0, description="Adam peak learning rate")
    kl_warmup_epochs: float = Field(5.0, ge=0, description="epochs over which the KL weight rises to 1 (few epochs: lower it)")
    num_workers: int = Field(2, gt=0, description="data-parallel training workers")


def write_digits_parquet(path: Path, rows: int | None = None) -> Path:
    """scikit-learn's digits as Parquet: item_id, pixels (fixed-size list of 64 float32), label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.data.astype(np.float32)[:rows]
    table = pa.table({
        "item_id": pa.array(np.arange(len(pixels)), pa.int64()),
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), 64),
        "label": pa.array(digits.target[:rows].astype(np.int64)),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def demo(config: DemoConfig) -> dict:
    work_dir = Path(config.work_dir).absolute()
    model_root = work_dir / "models"
    embeddings = Path(config.feature_repo).absolute() / "data" / "embeddings"
    timings: dict[str, float] = {}

    started = time.perf_counter()
    with ray_session():
        timings["ray start"] = time.perf_counter() - started

        stage = time.perf_counter()
        data = write_digits_parquet(work_dir / "data" / "digits.parquet")
        timings["write dataset"] = time.perf_counter() - stage

        stage = time.perf_counter()
        version = train(TrainConfig(
            data=str(data), vector_column="pixels", image_shape=[1, 8, 8], model_root=str(model_root),
            epochs=config.epochs, batch_size=config.batch_size, latent_dim=config.latent_dim,
            learning_rate=config.learning_rate, kl_warmup_epochs=config.kl_warmup_epochs,
            num_workers=config.num_workers, storage_path=str(work_dir / "ray_results"),
        ))
        timings["train"] = time.perf_counter() - stage

        stage = time.perf_counter()
        output = embed(EmbedConfig(data=str(data), model_root=str(model_root), model_version=version, output=str(embeddings))).output
        timings["embed"] = time.perf_counter() - stage

    stage = time.perf_counter()
    published = publish(PublishConfig(embeddings=str(embeddings), model_version=version, feature_repo=config.feature_repo,
                                      model_root=str(model_root), monitoring=str(work_dir / "monitoring")))
    timings["publish"] = time.perf_counter() - stage
    timings["total"] = time.perf_counter() - started

    print("\nDemo finished.")
    print(f"  dataset        {data}")
    print(f"  model version  {model_root / version}")
    print(f"  embeddings     {output}  ({published['rows']} rows)")
    print(f"  feature store  {Path(config.feature_repo).absolute()}  (view {published['view']}, service item_embeddings_current)")
    print(f"  monitoring     {published['gate']['report']}  (gate {'passed' if published['gate']['passed'] else 'failed'})")
    print("  stage timings  " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()))
    print("  online sample:")
    for entity in published["sample"]:
        print(f"    item_id={entity['item_id']} latent[:4]={np.round(entity['latent'][:4], 3).tolist()} "
              f"anomaly_score={entity['anomaly_score']:.2f} is_anomaly={entity['is_anomaly']} model_version={entity['model_version']}")
    return {"model_version": version, "embeddings": str(output), "timings": timings, "sample": published["sample"]}


def main(argv: list[str] | None = None) -> dict:
    return demo(parse_config(DemoConfig, argv, prog="vaectl demo"))


if __name__ == "__main__":
    run_cli(main)
