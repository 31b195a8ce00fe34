"""What publish checks after writing, read from the store itself rather than trusted: Feast's own
Ray engine has reported success after writing nothing.

    the key count   keys the online store holds for the view = the version's distinct keys
    the read-back   a seeded sample read through Feast equals the embeddings, bit for bit
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from feast_embeddings.writers import redis_command, send_commands
from vae.embeddings.contract import SERVED

log = logging.getLogger("feast_embeddings")


def online_row_count(store, view) -> int | None:
    """Keys the online store holds for a view (None for stores not covered here)."""
    online = store.config.online_store
    if online.type == "sqlite":
        from feast.infra.online_stores.helpers import compute_table_id

        path = Path(online.path) if Path(online.path).is_absolute() else Path(store.repo_path) / online.path
        versioning = store.config.registry.enable_online_feature_view_versioning
        table = compute_table_id(store.project, view, versioning)
        with contextlib.closing(sqlite3.connect(path)) as connection:
            return connection.execute(f'SELECT COUNT(DISTINCT entity_key) FROM "{table}"').fetchone()[0]
    if online.type == "redis":
        client = store._get_provider().online_store._get_client(online)
        field = f"_ts:{view.name}".encode()
        count = 0
        for keys in _chunks(client.scan_iter(count=10_000), 100_000):
            count += sum(send_commands(client, [redis_command(b"HEXISTS", key, field) for key in keys]))
        return count
    return None


def check_complete(store, view, to_write: int, written: int, version_keys: int) -> None:
    """Raise unless every row was written and the store holds exactly one row per key of the version
    (the batches written before included)."""
    stored = online_row_count(store, view)
    if written != to_write or (stored is not None and stored != version_keys):
        raise RuntimeError(
            f"online write of {view.name} did not complete: {to_write} rows to write, {written} written, "
            f"{stored} keys in the online store for the version's {version_keys} keys"
        )


def fetch_online(store, feature_view: str, keys: list, join_key: str) -> list[dict]:
    """Online features of one view for the keys, one dict per entity."""
    response = store.get_online_features(
        features=[f"{feature_view}:{name}" for name in SERVED],
        entity_rows=[{join_key: key} for key in keys],
    ).to_dict()
    return [dict(zip(response, values, strict=True)) for values in zip(*response.values(), strict=True)]


def verify_online(store, feature_view: str, table: pa.Table, join_key: str, sample_rows: int) -> None:
    """Read a seeded random sample back through Feast; every vector must equal the embeddings' one."""
    if sample_rows == 0 or table.num_rows == 0:
        return
    picks = np.random.default_rng(0).choice(
        table.num_rows, size=min(sample_rows, table.num_rows), replace=False
    )
    expected = table.take(pa.array(picks)).to_pylist()
    fetched = fetch_online(store, feature_view, [row[join_key] for row in expected], join_key)
    for want, got in zip(expected, fetched, strict=True):
        if not _same(got, want):
            raise RuntimeError(
                f"publish verification failed: {join_key}={want[join_key]!r} reads back "
                f"{got['model_version']!r} / {got['latent'] and got['latent'][:3]}, expected "
                f"{want['model_version']!r}"
            )
    log.info("verified %d online rows against the embeddings", len(expected))


def _same(got: dict, want: dict) -> bool:
    if got["latent"] is None or got["model_version"] != want["model_version"]:
        return False
    return np.array_equal(np.asarray(got["latent"], np.float32), np.asarray(want["latent"], np.float32))


def _chunks(iterable: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
