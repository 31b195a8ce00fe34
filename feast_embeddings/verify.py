"""What publish asks the online store before writing, and checks after, read from the store itself
rather than trusted (Feast's own Ray engine has reported success after writing nothing). Every check
costs the delta's keys, not the version's: a quiet day's publish costs its own batch.

    event times     what each of the delta's keys holds now (absent: a new key, or one whose TTL ran
                    out): rows older than that are not written
    the written     every written key holds its row's event time (or a newer one) afterwards
    the key count   on a version's first publish only: keys in the store = the version's distinct keys
    the read-back   a seeded sample read through Feast equals the embeddings, bit for bit

With a Redis TTL (key_ttl_seconds), "complete" means: every key written within the last TTL is online;
keys no batch has refreshed for longer expire, as the TTL intends, and no publish waits for them.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feast_embeddings.writers import _nanos, entity_keys, redis_command, send_commands
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


def online_event_times(store, view, keys: pa.Array, join_key: str) -> np.ndarray | None:
    """The event time (ns since the epoch) each key holds in the view's online table, -1 where it holds
    none; None for stores not covered here. One lookup per key: O(keys asked)."""
    from feast.infra.online_stores.helpers import compute_table_id, compute_versioned_name

    config, online = store.config, store.config.online_store
    versioning = config.registry.enable_online_feature_view_versioning
    serialized = entity_keys(keys, join_key, config.entity_key_serialization_version) if len(keys) else []
    if online.type == "sqlite":
        connection = store._get_provider().online_store._get_conn(config)
        table = '"' + compute_table_id(config.project, view, versioning).replace('"', '""') + '"'
        found: dict[bytes, int] = {}
        for chunk in _chunks(serialized, 500):
            marks = ", ".join("?" * len(chunk))
            query = (
                f"SELECT entity_key, event_ts FROM {table} WHERE feature_name = 'latent' AND entity_key IN "
            )
            query += f"({marks})"
            try:
                found |= {key: _sqlite_nanos(moment) for key, moment in connection.execute(query, chunk)}
            except sqlite3.OperationalError as error:
                if "no such table" not in str(error):
                    raise
        return np.array([found.get(key, -1) for key in serialized], np.int64)
    if online.type == "redis":
        client = store._get_provider().online_store._get_client(online)
        field = f"_ts:{compute_versioned_name(view, versioning)}".encode()
        suffix = config.project.encode()
        replies = send_commands(client, [redis_command(b"HGET", key + suffix, field) for key in serialized])
        return np.array([_nanos(reply) if reply else -1 for reply in replies], np.int64)
    return None


def event_nanos(rows: pa.Table, store) -> np.ndarray:
    """The rows' event times, ns since the epoch, at the store's resolution (Feast's SQLite store keeps
    whole seconds), so that they compare with what online_event_times reads back."""
    column = pc.cast(rows.column("event_timestamp"), pa.timestamp("ns", "UTC"))
    nanos = column.cast(pa.int64()).to_numpy(zero_copy_only=False)
    if store.config.online_store.type == "sqlite":
        return nanos // 1_000_000_000 * 1_000_000_000
    return nanos


def check_written(store, view, rows: pa.Table, join_key: str) -> None:
    """Raise unless every key written holds its row's event time, or a newer one (another publisher's)."""
    held = online_event_times(store, view, rows.column(join_key), join_key)
    if held is None or rows.num_rows == 0:
        return
    short = np.flatnonzero(held < event_nanos(rows, store))
    if short.size:
        key = rows.column(join_key)[int(short[0])].as_py()
        raise RuntimeError(
            f"online write of {view.name} did not complete: {short.size} of {rows.num_rows} keys written do "
            f"not hold their rows (e.g. {join_key}={key!r}); nothing was recorded as written, publish again"
        )


def check_whole(view, stored: int | None, version_keys: int) -> None:
    """A version's first publish: the store (`stored` keys, counted by online_row_count) holds exactly one
    row per key of the version."""
    if stored is not None and stored != version_keys:
        raise RuntimeError(
            f"online write of {view.name} did not complete: {stored} keys in the online store for the "
            f"version's {version_keys} keys; nothing was recorded as written, publish again"
        )


def _sqlite_nanos(moment) -> int:
    """An event_ts as Feast's SQLite store keeps it (epoch seconds, or a datetime / ISO text through
    its converters), in ns."""
    if isinstance(moment, int | float):
        return int(moment) * 1_000_000_000
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return int(moment.replace(tzinfo=moment.tzinfo or UTC).timestamp()) * 1_000_000_000


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
