"""`vaectl embeddings migrate`: versions written before the tables (<root>/<version>/*.parquet) become
tables with one batch, `migrated`, their rows as they were; a second run changes nothing; a
directory that is not one version's embeddings is refused."""

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs import cli
from vae.embeddings.catalog import EmbeddingsCatalog
from vae.embeddings.contract import latent_column
from vae.errors import InputError

VERSIONS = ("20260101T000000Z-aaaaaaaa", "20260201T000000Z-bbbbbbbb")


def old_version(root, version: str, rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    table = pa.table(
        {
            "item_id": pa.array(np.arange(rows), pa.int64()),
            "latent": latent_column(rng.standard_normal((rows, 4), dtype=np.float32)),
            "anomaly_score": pa.array(rng.random(rows, dtype=np.float32)),
            "is_anomaly": pa.array(rng.random(rows) < 0.1),
            "model_version": pa.array([version] * rows, pa.string()),
            "event_timestamp": pa.array(
                [datetime(2026, 1, 5, tzinfo=UTC)] * rows, pa.timestamp("us", tz="UTC")
            ),
        }
    )
    (root / version).mkdir(parents=True)
    pq.write_table(table.slice(0, rows // 2), root / version / "part-000000.parquet")
    pq.write_table(table.slice(rows // 2), root / version / "part-000001.parquet")
    (root / version / "_manifest.json").write_text("{}")  # the old commit mark: skipped
    return table


def migrate(tmp_path, source) -> dict:
    options = ["--catalog", f"sqlite:///{tmp_path}/catalog.db", "--warehouse", str(tmp_path / "warehouse")]
    return cli.run_job("embeddings", ["migrate", "--source", str(source), *options])


def test_old_versions_become_tables_with_one_batch_and_a_rerun_changes_nothing(tmp_path):
    written = {v: old_version(tmp_path / "embeddings", v, 100 + 10 * i, i) for i, v in enumerate(VERSIONS)}
    assert migrate(tmp_path, tmp_path / "embeddings") == {"migrated": list(VERSIONS), "skipped": []}
    catalog = EmbeddingsCatalog(f"sqlite:///{tmp_path}/catalog.db", str(tmp_path / "warehouse"))
    assert catalog.versions("item") == list(VERSIONS) and catalog.entity_set("item").key_type == "int64"
    for version, table in written.items():
        stored = catalog.table("item", version)
        [batch] = catalog.batches(stored)
        assert (batch.batch_id, batch.rows) == ("migrated", table.num_rows)
        rows = catalog.read(stored).sort_by("item_id")
        assert rows.column("latent").to_pylist() == table.column("latent").to_pylist()
        assert rows.column("event_timestamp").to_pylist() == table.column("event_timestamp").to_pylist()
    snapshots = {v: catalog.table("item", v).current_snapshot().snapshot_id for v in VERSIONS}
    assert migrate(tmp_path, tmp_path / "embeddings") == {"migrated": [], "skipped": list(VERSIONS)}
    assert {v: catalog.table("item", v).current_snapshot().snapshot_id for v in VERSIONS} == snapshots


def test_what_is_not_old_embeddings_is_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="no version directories to migrate"):
        migrate(tmp_path, tmp_path / "nothing")
    table = old_version(tmp_path / "embeddings", VERSIONS[0], 10, 0)
    pq.write_table(
        table.set_column(4, "model_version", pa.array(["other"] * 10)),
        tmp_path / "embeddings" / VERSIONS[0] / "part-000000.parquet",
    )
    with pytest.raises(InputError, match=r"holds vectors of model versions \[.*'other'\], not only"):
        migrate(tmp_path, tmp_path / "embeddings")
