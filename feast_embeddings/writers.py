"""Feast's online-store rows, serialized column-wise from Arrow, and written with one batched upsert.

Feast's own writers build one `Value` proto per feature per row and upsert row by row (~15k rows/s
for 64-d vectors). The bytes they store are simple and fixed for a fixed vector length: a constant
proto header followed by the little-endian float32 values, and an entity key that is a constant
prefix plus the key's bytes. Here those bytes are built with NumPy for a whole batch, every batch
is checked against Feast's own serializers on its first row, and the store is written with the
same statements / commands Feast uses (SQLite: one `executemany` of Feast's upsert; Redis: Feast's
hash layout, pipelined). A store or a schema not covered falls back to Feast's `online_write_batch`.
"""

from __future__ import annotations

import sqlite3
import struct

import numpy as np
import pyarrow as pa

# vae.embeddings.SERVED in the order the Redis writer lays out each hash's fields
FEATURES = ("latent", "anomaly_score", "model_version", "is_anomaly", "top_columns", "top_shares")


def write_table(store, view, table: pa.Table, join_key: str, batch_rows: int) -> int:
    """Write a version's rows to its view's online table in this process; returns the rows written.

    SQLite gets them in primary-key order: B-tree appends, 1.8x faster than random order at 1M rows."""
    if store.config.online_store.type == "sqlite":
        order = sqlite_key_order(table.column(join_key))
        if order is not None:
            table = table.take(pa.array(order))
    for batch in table.to_batches(max_chunksize=batch_rows):
        write_batch(store, view, batch, join_key)
    return table.num_rows


def write_batch(store, view, batch: pa.RecordBatch | pa.Table, join_key: str) -> str:
    """Write embedding rows to a view's online table in Feast's format: the batched writers below
    for SQLite and Redis, Feast's own `online_write_batch` for any other store or schema. Returns
    the writer used: "sqlite", "redis" or "feast"."""
    from feast.infra.online_stores.helpers import compute_table_id, compute_versioned_name

    config, online = store.config, store.config.online_store
    provider = store._get_provider()
    versioning = config.registry.enable_online_feature_view_versioning
    key_version = config.entity_key_serialization_version
    written = None
    if online.type == "sqlite" and _plain_sqlite(online):
        # Feast's connection: its datetime adapters, its locking
        connection = provider.online_store._get_conn(config)
        table_name = compute_table_id(config.project, view, versioning)
        written = write_sqlite(connection, table_name, batch, join_key, key_version)
    elif online.type == "redis":
        client = provider.online_store._get_client(online)
        view_name = compute_versioned_name(view, versioning)
        written = write_redis(
            client, config.project, view_name, batch, join_key, key_version, online.key_ttl_seconds
        )
    if written is not None:
        return online.type
    rows = feast_rows(batch, join_key, {field.name for field in view.features})
    provider.online_write_batch(config, view, rows, progress=None)
    return "feast"


def _plain_sqlite(online) -> bool:
    """SQLite without vector search: the layout write_sqlite writes."""
    return not online.vector_enabled and not getattr(online, "enable_openai_compatible_store", False)


def feast_rows(
    batch: pa.RecordBatch | pa.Table, join_key: str, features: set[str] | None = None
) -> list[tuple]:
    """Embedding rows as Feast's `online_write_batch` takes them: (entity key, {feature: Value},
    event time, created time), the protos built column-wise; only the view's `features` when given
    (the vector-search view serves fewer). The path for stores not covered here."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import FloatList, StringList, Value

    keys = batch.column(join_key).to_pylist()
    key_field = "int64_val" if pa.types.is_integer(batch.column(join_key).type) else "string_val"
    latent = batch.column("latent")
    latent = latent.combine_chunks() if isinstance(latent, pa.ChunkedArray) else latent
    offsets = latent.offsets.to_numpy()
    values = latent.values.to_numpy(zero_copy_only=False)
    scores = batch.column("anomaly_score").to_pylist()
    versions = {name: Value(string_val=name) for name in set(batch.column("model_version").to_pylist())}
    version_of = batch.column("model_version").to_pylist()
    # None: a version without thresholds
    flags = {True: Value(bool_val=True), False: Value(bool_val=False), None: Value()}
    flag_of = batch.column("is_anomaly").to_pylist()
    times = batch.column("event_timestamp").to_pylist()
    top_columns, top_shares = batch.column("top_columns").to_pylist(), batch.column("top_shares").to_pylist()
    rows = []
    for i, key in enumerate(keys):
        entity = EntityKey(join_keys=[join_key], entity_values=[Value(**{key_field: key})])
        values_of = {
            "latent": Value(float_list_val=FloatList(val=values[offsets[i] : offsets[i + 1]].tolist())),
            "anomaly_score": Value(float_val=scores[i]),
            "model_version": versions[version_of[i]],
            "is_anomaly": flags[flag_of[i]],
            "top_columns": Value(string_list_val=StringList(val=top_columns[i] or [])),
            "top_shares": Value(float_list_val=FloatList(val=top_shares[i] or [])),
        }
        rows.append(
            (
                entity,
                {k: v for k, v in values_of.items() if features is None or k in features},
                times[i],
                None,
            )
        )
    return rows


def _rows_of(buffer: np.ndarray) -> list[bytes]:
    """One bytes object per row of a 2-D uint8 array (NumPy's bytes dtype would drop trailing zeros)."""
    data, width = buffer.tobytes(), buffer.shape[1]
    return [data[i : i + width] for i in range(0, len(data), width)]


def entity_keys(keys: pa.Array, join_key: str, serialization_version: int) -> list[bytes]:
    """Feast's `serialize_entity_key` for a single join key, for every row of `keys`."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    if pa.types.is_integer(keys.type):
        prefix = serialize_entity_key(
            EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=0)]), serialization_version
        )[:-8]
        values = keys.to_numpy(zero_copy_only=False).astype("<i8")
        buffer = np.empty((len(values), len(prefix) + 8), np.uint8)
        buffer[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
        buffer[:, len(prefix) :] = values.view(np.uint8).reshape(-1, 8)
        serialized = _rows_of(buffer)
        first = Value(int64_val=int(values[0])) if len(values) else None
    else:
        prefix = serialize_entity_key(
            EntityKey(join_keys=[join_key], entity_values=[Value(string_val="")]), serialization_version
        )[:-4]
        strings = keys.cast(pa.string()).to_pylist()
        encoded = [s.encode() for s in strings]
        serialized = [prefix + struct.pack("<I", len(s)) + s for s in encoded]
        first = Value(string_val=strings[0]) if strings else None
    if first is not None and serialized[0] != serialize_entity_key(
        EntityKey(join_keys=[join_key], entity_values=[first]), serialization_version
    ):
        raise RuntimeError(
            "entity key bytes differ from Feast's serialize_entity_key; this Feast version is not "
            "supported by the fast writer"
        )
    return serialized


def float_list_values(vectors: pa.Array) -> list[bytes] | None:
    """Serialized `Value(float_list_val=...)` per row; None when the vectors are not all one length."""
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    vectors = vectors.combine_chunks() if isinstance(vectors, pa.ChunkedArray) else vectors
    if vectors.null_count or len(vectors) == 0:
        return None
    offsets = vectors.offsets.to_numpy()
    lengths = np.diff(offsets)
    if lengths.min() != lengths.max() or lengths[0] == 0:
        return None
    dim = int(lengths[0])
    values = vectors.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].astype("<f4")
    header = Value(float_list_val=FloatList(val=[0.0] * dim)).SerializeToString()[: -4 * dim]
    buffer = np.empty((len(vectors), len(header) + 4 * dim), np.uint8)
    buffer[:, : len(header)] = np.frombuffer(header, np.uint8)
    buffer[:, len(header) :] = values.view(np.uint8).reshape(-1, 4 * dim)
    serialized = _rows_of(buffer)
    if serialized[0] != Value(float_list_val=FloatList(val=values[:dim].tolist())).SerializeToString():
        raise RuntimeError(
            "vector bytes differ from Feast's Value proto; this Feast version is not supported by the fast "
            "writer"
        )
    return serialized


def float_values(column: pa.Array) -> list[bytes]:
    """Serialized `Value(float_val=...)` per row (float32, as Feast stores Float32 features)."""
    from feast.protos.feast.types.Value_pb2 import Value

    values = column.to_numpy(zero_copy_only=False).astype("<f4")
    header = Value(float_val=0.0).SerializeToString()[:-4]
    buffer = np.empty((len(values), len(header) + 4), np.uint8)
    buffer[:, : len(header)] = np.frombuffer(header, np.uint8)
    buffer[:, len(header) :] = values.view(np.uint8).reshape(-1, 4)
    serialized = _rows_of(buffer)
    if len(values) and serialized[0] != Value(float_val=float(values[0])).SerializeToString():
        raise RuntimeError(
            "float bytes differ from Feast's Value proto; this Feast version is not supported by the fast "
            "writer"
        )
    return serialized


def string_list_values(column: pa.Array | pa.ChunkedArray) -> list[bytes]:
    """Serialized `Value(string_list_val=...)` per row, each distinct list built once (attributions
    repeat: a few columns explain most rows)."""
    from feast.protos.feast.types.Value_pb2 import StringList, Value

    made: dict[tuple, bytes] = {}
    rows = []
    for names in column.to_pylist():
        names = tuple(names or ())
        if names not in made:
            made[names] = Value(string_list_val=StringList(val=names)).SerializeToString()
        rows.append(made[names])
    return rows


def share_values(column: pa.Array | pa.ChunkedArray) -> list[bytes]:
    """Serialized `Value(float_list_val=...)` per row of the attribution shares (empty lists for models
    without columns to attribute to)."""
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    fixed = float_list_values(column)
    if fixed is not None:
        return fixed
    return [Value(float_list_val=FloatList(val=v or [])).SerializeToString() for v in column.to_pylist()]


def _per_row(column: pa.Array, make) -> list:
    """`make(value)` for each row, computed once per distinct value (model_version, event times)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    encoded = column.dictionary_encode()
    made = [make(value) for value in encoded.dictionary.to_pylist()]
    return [made[i] for i in encoded.indices.to_numpy(zero_copy_only=False)]


def _encode(
    batch: pa.RecordBatch | pa.Table, join_key: str, serialization_version: int
) -> tuple[list, ...] | None:
    """(entity keys, latent, anomaly_score, model_version, is_anomaly, top_columns, top_shares) as Feast's
    bytes per row; None
    when the batch is not one fixed layout (ragged or null vectors, any null value)."""
    from feast.protos.feast.types.Value_pb2 import Value

    latent = float_list_values(batch.column("latent"))
    if latent is None or any(
        batch.column(name).null_count for name in ("anomaly_score", "model_version", "is_anomaly")
    ):
        return None
    keys = entity_keys(batch.column(join_key), join_key, serialization_version)
    versions = _per_row(batch.column("model_version"), lambda v: Value(string_val=v).SerializeToString())
    flags = _per_row(batch.column("is_anomaly"), lambda v: Value(bool_val=v).SerializeToString())
    scores = float_values(batch.column("anomaly_score"))
    attribution = string_list_values(batch.column("top_columns")), share_values(batch.column("top_shares"))
    return keys, latent, scores, versions, flags, *attribution


def sqlite_key_order(keys: pa.Array) -> np.ndarray | None:
    """Row order by serialized entity key (the primary key's order), for integer keys."""
    if not pa.types.is_integer(keys.type):
        return None
    # The key's bytes are little-endian int64: compared bytewise they sort as the big-endian reading.
    return np.argsort(keys.to_numpy(zero_copy_only=False).astype("<i8").view(">u8"), kind="stable")


def write_sqlite(
    connection: sqlite3.Connection,
    table_name: str,
    batch: pa.RecordBatch | pa.Table,
    join_key: str,
    serialization_version: int,
) -> int | None:
    """Feast's SQLite rows for a batch (entity_key, feature_name, value, value_text, event_ts,
    created_ts), upserted with Feast's statement in one transaction. None = not covered. As the Redis
    writer (and unlike Feast's SQLite store), a row older than what a key holds is skipped: re-publishing
    an old batch never regresses a newer vector.

    Batches in key order (`sqlite_key_order`) make the B-tree inserts near-appends: 1.8x faster at 1M rows."""
    from feast.utils import to_naive_utc

    encoded = _encode(batch, join_key, serialization_version)
    if encoded is None:
        return None
    keys, latent, score_bytes, version_bytes, flag_bytes, column_bytes, share_bytes = encoded
    # value_text is str() of the float32 read back as a Python float, as Feast's extract_text_and_num.
    scores = (
        batch.column("anomaly_score").to_numpy(zero_copy_only=False).astype(np.float32).astype(np.float64)
    )
    score_text = [str(v) for v in scores.tolist()]
    version_text = _per_row(batch.column("model_version"), str)
    flag_text = _per_row(batch.column("is_anomaly"), str)  # "True" / "False", as Feast's extract_text_and_num
    event_ts = _per_row(batch.column("event_timestamp"), to_naive_utc)
    rows = (
        row
        for i in range(len(keys))
        for row in (
            (keys[i], "anomaly_score", score_bytes[i], score_text[i], event_ts[i], None),
            (keys[i], "is_anomaly", flag_bytes[i], flag_text[i], event_ts[i], None),
            (keys[i], "latent", latent[i], None, event_ts[i], None),
            (keys[i], "model_version", version_bytes[i], version_text[i], event_ts[i], None),
            (keys[i], "top_columns", column_bytes[i], None, event_ts[i], None),
            (keys[i], "top_shares", share_bytes[i], None, event_ts[i], None),
        )
    )
    quoted = '"' + table_name.replace('"', '""') + '"'
    with connection:
        connection.executemany(
            f"INSERT INTO {quoted} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = "
            "excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, created_ts = "
            "excluded.created_ts WHERE excluded.event_ts >= event_ts;",
            rows,
        )
    return len(keys)


def _timestamp_bytes(moment) -> bytes:
    from feast.utils import make_tzaware
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromDatetime(make_tzaware(moment))
    return stamp.SerializeToString()


def _nanos(serialized: bytes) -> int:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.ParseFromString(serialized)
    return stamp.seconds * 1_000_000_000 + stamp.nanos


def write_redis(
    client,
    project: str,
    view_name: str,
    batch: pa.RecordBatch | pa.Table,
    join_key: str,
    serialization_version: int,
    key_ttl_seconds: int | None,
) -> int | None:
    """Feast's Redis layout for a batch: one hash per entity (key = entity key bytes + project) with
    `_ts:<view>` and one field per feature (murmur3 of `<view>:<feature>`). A row is skipped when the
    key already holds this view at a newer event time (Feast skips at the same time too; a batch
    re-embedded at its own time must replace its vectors, as in SQLite). None = not covered."""
    from feast.infra.online_stores.helpers import _mmh3

    encoded = _encode(batch, join_key, serialization_version)
    if encoded is None:
        return None
    entity_key_bytes, latent, scores, versions, flags, top_columns, top_shares = encoded
    suffix = project.encode()
    keys = [key + suffix for key in entity_key_bytes]
    stamps = _per_row(batch.column("event_timestamp"), _timestamp_bytes)
    ts_field = f"_ts:{view_name}".encode()
    fields = [_mmh3(f"{view_name}:{name}") for name in FEATURES]

    stored = send_commands(client, [redis_command(b"HGET", key, ts_field) for key in keys])
    nanos = {stamp: _nanos(stamp) for stamp in set(stamps)}
    newest: dict[bytes, int] = {}  # a key twice in one batch: the later event time wins, as in Feast
    commands = []
    for i, key in enumerate(keys):
        new = nanos[stamps[i]]
        seen = max(_nanos(stored[i]) if stored[i] else 0, newest.get(key, 0))
        if seen and new < seen:
            continue
        newest[key] = new
        commands.append(
            redis_command(
                b"HSET",
                key,
                ts_field,
                stamps[i],
                fields[0],
                latent[i],
                fields[1],
                scores[i],
                fields[2],
                versions[i],
                fields[3],
                flags[i],
                fields[4],
                top_columns[i],
                fields[5],
                top_shares[i],
            )
        )
        if key_ttl_seconds:
            commands.append(redis_command(b"EXPIRE", key, str(key_ttl_seconds).encode()))
    send_commands(client, commands)
    return len(keys)


def redis_command(*parts: bytes) -> bytes:
    """One command in Redis's wire protocol (RESP); building it here skips the client's per-command
    bookkeeping."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def send_commands(client, commands: list[bytes], chunk: int = 10_000) -> list:
    """Send pipelined commands on one pooled connection; returns the replies (an error reply raises)."""
    connection = client.connection_pool.get_connection()
    replies = []
    try:
        for start in range(0, len(commands), chunk):
            part = commands[start : start + chunk]
            connection.send_packed_command([b"".join(part)])
            replies.extend(connection.read_response() for _ in part)
    except BaseException:
        connection.disconnect()  # replies may be left unread on it
        raise
    finally:
        client.connection_pool.release(connection)
    return replies
