"""What MLflow costs the jobs, against the same jobs without it, in one process run.

training   `vaectl train` on digits (30 epochs, 2 workers), tracked (SQLite store: a run, per-epoch
           metrics from rank 0, artifacts, the version registered) vs untracked, alternating
publish    a re-publish of the current version with the registry (the champion check and alias
           sync) vs without, alternating
pyfunc     `mlflow.pyfunc.load_model("models:/vae-item@champion").predict(frame)` vs the embed
           job's encode_matrix on the same 100,000 rows (rows/s)

python -m benchmarks.registry [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import parse_args, save, timed
from ray_jobs.cluster import ray_session
from ray_jobs.config import EmbedConfig, PublishConfig, TrainConfig
from ray_jobs.demo import write_digits_parquet
from ray_jobs.embed import embed
from ray_jobs.publish import publish
from ray_jobs.train import train
from vae import encode_matrix, features_to_numpy, load_model_version

REPO = Path(__file__).resolve().parent.parent


def training_config(work: Path, data: Path, name: str, tracking_uri: str | None) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        vector_column="pixels",
        image_shape=[1, 8, 8],
        model_root=str(work / "models"),
        storage_path=str(work / name),
        latent_dim=8,
        hidden_dims=[64, 32],
        epochs=30,
        batch_size=32,
        kl_warmup_epochs=0,
        learning_rate=3e-3,
        tracking_uri=tracking_uri,
    )


def with_tracking(uri: str | None):
    if uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = uri


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each training run")
    parser.add_argument("--predict-rows", type=int, default=100_000, help="rows scored by pyfunc vs encode")
    args = parse_args(parser, repeats=1, epochs=2, predict_rows=2_000)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    uri = f"sqlite:///{work}/mlflow.db"
    data = write_digits_parquet(work / "digits.parquet")
    result: dict = {"repeats": args.repeats}
    with ray_session():
        seconds: dict[str, list[float]] = {"tracked": [], "untracked": []}
        for repeat in range(args.repeats):
            for mode in ("untracked", "tracked"):
                config = training_config(work, data, f"{mode}-{repeat}", uri if mode == "tracked" else None)
                config = config.model_copy(update={"epochs": args.epochs})
                elapsed, version = timed(lambda config=config: train(config))
                seconds[mode].append(round(elapsed, 2))
        result["train_seconds"] = seconds
        result["train_ratio"] = round(
            statistics.median(seconds["tracked"]) / statistics.median(seconds["untracked"]), 3
        )

        repo = work / "feature_repo"
        repo.mkdir()
        for name in ("feature_store.yaml", "features.py"):
            shutil.copy(REPO / "feature_repo" / name, repo / name)
        with_tracking(uri)
        embed(
            EmbedConfig(
                data=str(data),
                model_root=str(work / "models"),
                model_version=version,
                feature_store_yaml=str(repo / "feature_store.yaml"),
                batch="day1",
                event_time=datetime(2026, 11, 1, tzinfo=UTC),
                in_process_rows=10**6,
            )
        )
        publish(PublishConfig(feature_repo=str(repo), model_version=version, force=True, show=0))
        publishes: dict[str, list[float]] = {"registry": [], "no_registry": []}
        for _ in range(args.repeats * 2):
            for mode in ("no_registry", "registry"):
                with_tracking(uri if mode == "registry" else None)
                config = PublishConfig(feature_repo=str(repo), model_version=version, show=0)
                publishes[mode].append(round(timed(lambda config=config: publish(config))[0], 3))
        result["publish_seconds"] = publishes
        result["publish_ratio"] = round(
            statistics.median(publishes["registry"]) / statistics.median(publishes["no_registry"]), 3
        )

    with_tracking(uri)
    import mlflow

    frame = pq.read_table(data).to_pandas()
    frame = frame.loc[np.arange(args.predict_rows) % len(frame)].reset_index(drop=True)
    frame["item_id"] = np.arange(len(frame))
    model = mlflow.pyfunc.load_model("models:/vae-item@champion")
    loaded = load_model_version(work / "models", version)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    rates: dict[str, list[float]] = {"pyfunc": [], "encode_matrix": []}
    for _ in range(args.repeats):
        elapsed, _ = timed(lambda: model.predict(frame))
        rates["pyfunc"].append(round(len(frame) / elapsed))
        elapsed, _ = timed(
            lambda: encode_matrix(loaded.model, loaded.normalizer, features_to_numpy(table, loaded.features))
        )
        rates["encode_matrix"].append(round(len(frame) / elapsed))
    result["predict_rows_per_second"] = rates
    result["pyfunc_ratio"] = round(
        statistics.median(rates["pyfunc"]) / statistics.median(rates["encode_matrix"]), 3
    )
    save("registry", result)
    print(
        f"tracked / untracked training: {result['train_ratio']}x; publish with / without the registry: "
        f"{result['publish_ratio']}x; pyfunc / encode_matrix rows/s: {result['pyfunc_ratio']}x"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
