"""Publish a model version's embeddings into the Feast feature store, and verify them.

    register the feature repo's definitions (feast apply) -> write the version's embeddings
    to the online store in batches -> read a sample back through Feast and compare
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from pydantic import Field

from ray_jobs.common import JobConfig, parquet_schema, parse_config, run_cli
from vae import InputError

log = logging.getLogger("ray_jobs.publish")

EMBEDDING_COLUMNS = ("latent", "anomaly_score", "model_version", "event_timestamp")


class PublishConfig(JobConfig):
    """Register the Feast definitions and write a model version's embeddings online."""

    embeddings: str = Field("feature_repo/data/embeddings", description="embeddings root written by the embed job")
    model_version: str = Field("latest", description="version directory under the embeddings root, or 'latest'")
    feature_repo: str = Field("feature_repo", description="Feast repo directory (feature_store.yaml + definitions)")
    feature_view: str = Field("item_embeddings", description="feature view to write")
    write_batch_rows: int = Field(10_000, gt=0, description="rows per online write call")
    verify_rows: int = Field(256, ge=0, description="rows read back through Feast and compared after writing")
    show: int = Field(3, ge=0, description="entities to fetch and print at the end")


def publish(config: PublishConfig) -> dict:
    """Run the whole publish job; returns a summary (version, rows, timings, sample)."""
    from feast import FeatureStore

    started = time.perf_counter()
    version_dir = _version_directory(Path(config.embeddings), config.model_version)
    # The definitions read the embeddings location from here, as `feast apply` would.
    os.environ["VAE_EMBEDDINGS_PATH"] = str(Path(config.embeddings).absolute())
    store = FeatureStore(repo_path=str(Path(config.feature_repo).absolute()))
    store.apply(load_definitions(Path(config.feature_repo)))
    view = store.get_feature_view(config.feature_view)
    join_key = view.entity_columns[0].name

    schema = parquet_schema(str(version_dir))
    missing = [c for c in (join_key, *EMBEDDING_COLUMNS) if c not in schema.names]
    if missing:
        raise InputError(
            f"{version_dir}: missing column(s) {', '.join(missing)}; feature view '{config.feature_view}' joins on "
            f"'{join_key}' (edit {config.feature_repo}/features.py if your key column is named differently)"
        )
    table = pads.dataset(version_dir, format="parquet").to_table(columns=[join_key, *EMBEDDING_COLUMNS])
    rows = 0
    for batch in table.to_batches(max_chunksize=config.write_batch_rows):
        store.write_to_online_store(config.feature_view, batch.to_pandas())
        rows += batch.num_rows
    write_seconds = time.perf_counter() - started
    log.info("wrote %d rows of %s to the online store in %.1fs (%.0f rows/s)", rows, version_dir.name, write_seconds, rows / write_seconds)

    verify_online(store, config.feature_view, table, join_key, config.verify_rows)
    sample = fetch_online(store, config.feature_view, table.column(join_key).to_pylist()[: config.show], join_key)
    for entity in sample:
        latent = ", ".join(f"{v:+.3f}" for v in entity["latent"][:4])
        log.info("online %s=%s: latent [%s, ...] anomaly_score %.2f model_version %s",
                 join_key, entity[join_key], latent, entity["anomaly_score"], entity["model_version"])
    return {"model_version": version_dir.name, "rows": rows, "write_seconds": write_seconds, "sample": sample}


def load_definitions(feature_repo: Path) -> list:
    """The Feast objects defined in the repo's Python files, as `feast apply` would collect them."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    objects: list = []
    for path in sorted(feature_repo.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"feature_repo_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        objects += [v for v in vars(module).values() if isinstance(v, (Entity, FeatureView, FeatureService, DataSource))]
    if not objects:
        raise InputError(f"{feature_repo}: no Feast definitions found")
    return objects


def fetch_online(store, feature_view: str, keys: list, join_key: str) -> list[dict]:
    """Online features for the keys, one dict per entity."""
    response = store.get_online_features(
        features=[f"{feature_view}:{name}" for name in ("latent", "anomaly_score", "model_version")],
        entity_rows=[{join_key: key} for key in keys],
    ).to_dict()
    return [dict(zip(response, values)) for values in zip(*response.values())]


def verify_online(store, feature_view: str, table: pa.Table, join_key: str, sample_rows: int) -> None:
    """Read a seeded random sample back through Feast; every vector must equal the Parquet one."""
    if sample_rows == 0 or table.num_rows == 0:
        return
    picks = np.random.default_rng(0).choice(table.num_rows, size=min(sample_rows, table.num_rows), replace=False)
    expected = table.take(pa.array(picks)).to_pylist()
    fetched = fetch_online(store, feature_view, [row[join_key] for row in expected], join_key)
    for want, got in zip(expected, fetched):
        if got["latent"] is None or got["model_version"] != want["model_version"] or not np.array_equal(
            np.asarray(got["latent"], np.float32), np.asarray(want["latent"], np.float32)
        ):
            raise RuntimeError(
                f"publish verification failed: {join_key}={want[join_key]!r} reads back "
                f"{got['model_version']!r} / {got['latent'] and got['latent'][:3]}, expected {want['model_version']!r}"
            )
    log.info("verified %d online rows against the embeddings Parquet", len(expected))


def _version_directory(root: Path, version: str) -> Path:
    versions = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if version == "latest":
        if not versions:
            raise InputError(f"{root}: no embeddings found; run the embed job first (vaectl embed)")
        version = versions[-1]
    elif version not in versions:
        raise InputError(f"{root}: no embeddings for model version '{version}' (have: {', '.join(versions[-5:]) or 'none'})")
    return root / version


def main(argv: list[str] | None = None) -> dict:
    return publish(parse_config(PublishConfig, argv, prog="vaectl publish"))


if __name__ == "__main__":
    run_cli(main)
