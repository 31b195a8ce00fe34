"""Embed a Parquet dataset with a model version: a Ray Data batch job.

    read Parquet -> map_batches(Encoder actors) -> write Parquet to staging -> rename into place

Output rows (the embeddings contract): the entity key, `latent` (float32 list, posterior mean),
`anomaly_score` (float32, negative ELBO at the posterior mean), `model_version`,
`event_timestamp` (UTC). The output of one model version lands in <output>/<version>/ only when
the whole job has succeeded.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from pydantic import Field

from ray_jobs.common import JobConfig, parquet_schema, parse_config, ray_session, run_cli
from vae import InputError, encode_matrix, features_to_numpy, load_model_version
from vae.artifacts import resolve_model_version
from vae.encode import latent_column
from vae.preprocessing import check_arrow_schema

log = logging.getLogger("ray_jobs.embed")


class EmbedConfig(JobConfig):
    """Encode a Parquet dataset with a model version and write the embeddings as Parquet."""

    data: str = Field(description="Parquet file or directory to embed")
    model_root: str = Field("models", description="directory that holds model versions")
    model_version: str = Field("latest", description="version name, or 'latest'")
    output: str = Field("feature_repo/data/embeddings", description="embeddings root; the job writes <output>/<version>/")
    timestamp_column: str | None = Field(None, description="input column used as event_timestamp (default: job start time)")
    batch_size: int = Field(4096, gt=0, description="rows per encoder call")
    num_encoders: int | None = Field(None, gt=0, description="encoder actors (default: fill the cluster, one CPU left for I/O)")
    cpus_per_encoder: float = Field(1.0, gt=0, description="CPUs reserved by each encoder actor")


class Encoder:
    """A Ray Data actor: loads the model version once, then turns Arrow batches into embeddings."""

    def __init__(self, model_root: str, version: str, event_timestamp: datetime, timestamp_column: str | None):
        # One torch thread per reserved CPU, so actors sharing a node do not oversubscribe it.
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.model_version = load_model_version(model_root, version)
        self.event_timestamp = event_timestamp
        self.timestamp_column = timestamp_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        features = self.model_version.features
        posterior_mean, anomaly_score = encode_matrix(
            self.model_version.model, self.model_version.normalizer, features_to_numpy(batch, features)
        )
        rows = len(posterior_mean)
        if self.timestamp_column:
            event_timestamp = batch.column(self.timestamp_column).cast(pa.timestamp("us", tz="UTC"))
        else:
            event_timestamp = pa.array([self.event_timestamp] * rows, pa.timestamp("us", tz="UTC"))
        return pa.table({
            features.key_column: batch.column(features.key_column),
            "latent": latent_column(posterior_mean),
            "anomaly_score": pa.array(anomaly_score.astype(np.float32)),
            "model_version": pa.array([self.model_version.version] * rows, pa.string()),
            "event_timestamp": event_timestamp,
        })


def embed(config: EmbedConfig) -> Path:
    """Run the whole embedding job; returns the committed output directory.

    The model version and the dataset's schema are checked before Ray starts.
    """
    started = time.perf_counter()
    version = resolve_model_version(config.model_root, config.model_version)
    features = load_model_version(config.model_root, version).features  # verifies the version up front
    schema = parquet_schema(config.data)
    check_arrow_schema(schema, features, config.data)
    columns = features.columns
    if config.timestamp_column:
        if config.timestamp_column not in schema.names:
            raise InputError(f"{config.data}: missing timestamp column '{config.timestamp_column}'")
        columns.append(config.timestamp_column)

    with ray_session():
        return _embed_on_ray(config, version, columns, started)


def _embed_on_ray(config: EmbedConfig, version: str, columns: list[str], started: float) -> Path:
    output_root = Path(config.output)
    output_root.mkdir(parents=True, exist_ok=True)
    # Staging sits beside the output root, not inside it, so readers globbing the root
    # (Feast's offline source) never see a partial run.
    staging = output_root.parent / f".{output_root.name}.staging-{uuid.uuid4().hex}"
    num_encoders = encoder_pool_size(config.num_encoders, config.cpus_per_encoder)
    try:
        embeddings = ray.data.read_parquet(config.data).select_columns(columns).map_batches(
            Encoder,
            fn_constructor_kwargs={
                "model_root": str(Path(config.model_root).absolute()), "version": version,
                "event_timestamp": datetime.now(UTC), "timestamp_column": config.timestamp_column,
            },
            batch_format="pyarrow", batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_encoders), num_cpus=config.cpus_per_encoder,
        )
        embeddings.write_parquet(str(staging.absolute()))
        rows = embeddings_row_count(staging)
        if rows == 0:
            raise InputError(f"{config.data}: the dataset has no rows")
        destination = _commit(staging, output_root / version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("embedded %d rows with model %s in %.1fs (%.0f rows/s) -> %s", rows, version, seconds, rows / seconds, destination)
    return destination


def encoder_pool_size(requested: int | None, cpus_per_encoder: float) -> int:
    """Encoder actors to start. Actors that reserve every CPU leave Ray Data's read and write
    tasks unschedulable and the job hangs without a word, so that is refused up front."""
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    if requested is None:
        return max(1, int((cluster_cpus - 1) // cpus_per_encoder))
    if requested * cpus_per_encoder > cluster_cpus - 1:
        raise InputError(
            f"{requested} encoders x {cpus_per_encoder} CPU would reserve {requested * cpus_per_encoder:g} of the "
            f"cluster's {cluster_cpus:g} CPUs and leave none for reading and writing; lower num_encoders or "
            "cpus_per_encoder (e.g. 0.5), or leave num_encoders unset"
        )
    return requested


def embeddings_row_count(directory: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in directory.glob("*.parquet")) if directory.is_dir() else 0


def _commit(staging: Path, destination: Path) -> Path:
    """Move a finished run into place, replacing an earlier run of the same version."""
    if destination.exists():
        retired = destination.parent.parent / f".{destination.parent.name}.retired-{uuid.uuid4().hex}"
        os.rename(destination, retired)
        os.rename(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, destination)
    return destination


def main(argv: list[str] | None = None) -> Path:
    return embed(parse_config(EmbedConfig, argv, prog="vaectl embed"))


if __name__ == "__main__":
    run_cli(main)
