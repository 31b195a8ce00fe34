"""The embeddings contract: the rows `vaectl embed` writes and every reader (publish, monitor, Feast)
relies on. Where they live (an Iceberg table per entity set and model version) is vae.embeddings.catalog.

    <key column>     int64 or string: the input's entity key, under the input's column name
    latent           list<float32>: the posterior mean (a plain list: Feast rejects fixed-size lists
                     and Ray's tensor type)
    anomaly_score    float32: negative ELBO at the posterior mean in nats, higher = more unusual;
                     always finite (a row whose score or mean is not is quarantined or refused)
    is_anomaly       bool: score above the version's calibrated threshold (null: none calibrated)
    model_version    string: the version that made the vector
    batch_id         string: the embed run (batch) that wrote the row
    event_timestamp  timestamp[us, UTC]: when the vector became true (the batch's time by default)
    top_columns      list<string>: the columns that make the row's score, most first (tables; empty
                     for vectors and images)
    top_shares       list<float32>: each top column's share of the row's reconstruction surprise
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vae.errors import InputError, first_line

COLUMNS = (
    "latent",
    "anomaly_score",
    "is_anomaly",
    "model_version",
    "batch_id",
    "event_timestamp",
    "top_columns",
    "top_shares",
)
SERVED = (*COLUMNS[:4], "top_columns", "top_shares")  # what a feature view serves for each key
ATTRIBUTION = COLUMNS[6:]  # not in embeddings written before attribution (issue 20)


def schema(key_column: str, key_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            (key_column, key_type),
            ("latent", pa.list_(pa.float32())),
            ("anomaly_score", pa.float32()),
            ("is_anomaly", pa.bool_()),
            ("model_version", pa.string()),
            ("batch_id", pa.string()),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
            ("top_columns", pa.list_(pa.string())),
            ("top_shares", pa.list_(pa.float32())),
        ]
    )


def latent_column(posterior_mean: np.ndarray) -> pa.ListArray:
    """Rows of a (n, z) float32 matrix as a plain list<float32> column, without copying the values."""
    rows, latent_dim = posterior_mean.shape
    offsets = pa.array(np.arange(0, (rows + 1) * latent_dim, latent_dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(posterior_mean.ravel()))


def embedding_table(
    keys: pa.Array | pa.ChunkedArray,
    key_column: str,
    key_type: pa.DataType,
    posterior_mean: np.ndarray,
    anomaly_score: np.ndarray,
    threshold: float | None,
    model_version: str,
    batch_id: str,
    event_timestamp: pa.Array | pa.ChunkedArray,
    attribution: tuple[pa.Array, pa.Array] | None = None,
) -> pa.Table:
    """Embedding rows in the contract's schema; attribution: (top_columns, top_shares), else empty lists."""
    rows = len(keys)
    if threshold is None:
        is_anomaly = pa.nulls(rows, pa.bool_())
    else:
        is_anomaly = pa.array(anomaly_score > threshold)

    def constant(value: str) -> pa.Array:  # one dictionary entry for the whole batch: no per-row strings
        return pa.DictionaryArray.from_arrays(np.zeros(rows, np.int32), [value]).cast(pa.string())

    columns = {
        key_column: keys.cast(key_type),
        "latent": latent_column(posterior_mean),
        "anomaly_score": pa.array(anomaly_score.astype(np.float32, copy=False)),
        "is_anomaly": is_anomaly,
        "model_version": constant(model_version),
        "batch_id": constant(batch_id),
        "event_timestamp": event_timestamp,
        **dict(zip(("top_columns", "top_shares"), attribution or _no_attribution(rows), strict=True)),
    }
    return pa.table(columns, schema=schema(key_column, key_type))


def with_attribution(rows: pa.Table) -> pa.Table:
    """Embedding rows from before attribution, with its columns empty."""
    for name, column in zip(ATTRIBUTION, _no_attribution(rows.num_rows), strict=True):
        if name not in rows.column_names:
            rows = rows.append_column(name, column)
    return rows


def _no_attribution(rows: int) -> tuple[pa.Array, pa.Array]:
    offsets = pa.array(np.zeros(rows + 1, np.int32))
    return (
        pa.ListArray.from_arrays(offsets, pa.array([], pa.string())),
        pa.ListArray.from_arrays(offsets, pa.array([], pa.float32())),
    )


def attribution_columns(
    surprise: np.ndarray, names: tuple[str, ...], top: int = 3, missing: np.ndarray | None = None
) -> tuple[pa.Array, pa.Array]:
    """(top_columns, top_shares) from per-column surprise (rows, columns, nats >= 0): the `top`
    columns with the most, and each one's share of the row's total (shares of a row sum to <= 1).
    `missing` (rows, columns): where the row has no value, the column is named "<column> (missing)"."""
    surprise = np.maximum(surprise, 0.0)  # >= 0 up to float rounding
    rows, width = surprise.shape
    top = min(top, width)
    order = np.argsort(-surprise, axis=1, kind="stable")[:, :top]
    total = surprise.sum(axis=1, keepdims=True)
    shares = np.take_along_axis(surprise, order, axis=1) / np.where(total > 0, total, 1.0)
    offsets = pa.array(np.arange(0, (rows + 1) * top, top, dtype=np.int32))
    if missing is not None:  # a missing column's label is the second copy of the names
        order = order + width * np.take_along_axis(missing, order, axis=1)
    vocabulary = [*names, *(f"{name} (missing)" for name in names)]
    labels = pa.DictionaryArray.from_arrays(pa.array(order.ravel().astype(np.int32)), vocabulary)
    return (
        pa.ListArray.from_arrays(offsets, labels.cast(pa.string())),
        pa.ListArray.from_arrays(offsets, pa.array(shares.astype(np.float32).ravel())),
    )


def constant_timestamps(moment: datetime, rows: int) -> pa.Array:
    """`rows` copies of one UTC moment as the contract's event_timestamp."""
    naive = np.datetime64(moment.replace(tzinfo=None), "us")
    return pa.array(np.full(rows, naive), pa.timestamp("us", tz="UTC"))


def to_utc_timestamps(column: pa.Array | pa.ChunkedArray, name: str) -> pa.Array | pa.ChunkedArray:
    """Timestamps, dates or ISO strings as UTC timestamps; values without a zone are taken as UTC."""
    utc = pa.timestamp("us", tz="UTC")
    if pa.types.is_timestamp(column.type) and column.type.tz is not None:
        return column.cast(utc)
    try:
        return column.cast(pa.timestamp("us")).cast(utc)
    except pa.ArrowInvalid:
        pass
    try:
        return column.cast(utc)  # strings with a zone offset
    except pa.ArrowInvalid as error:
        raise InputError(
            f"timestamp column '{name}' has values that are not timestamps ({first_line(error)})"
        ) from None


def key_column(table_schema: pa.Schema, source: str, required: tuple[str, ...] = COLUMNS[:6]) -> str:
    """The entity key of an embeddings dataset: its one column outside the contract's. The `required`
    contract columns must be there too."""
    missing = [name for name in required if name not in table_schema.names]
    if missing:
        raise InputError(
            f"{source}: missing column(s) {', '.join(missing)}; this is not an embeddings dataset "
            "(vaectl embed writes them)"
        )
    keys = [name for name in table_schema.names if name not in COLUMNS]
    if len(keys) != 1:
        raise InputError(
            f"{source}: expected one entity key column besides {', '.join(COLUMNS)}, found {keys}"
        )
    return keys[0]


def latent_matrix(column: pa.ChunkedArray | pa.Array, source: str) -> np.ndarray:
    """The latent column as a (rows, z) float32 matrix, refusing ragged, null or non-finite vectors."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.empty((0, 0), np.float32)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or lengths.min() != lengths.max():
        raise InputError(
            f"{source}: 'latent' has null or different-length vectors; re-embed the data with vaectl embed"
        )
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), int(lengths[0]))
    if not np.isfinite(values).all():
        raise InputError(f"{source}: 'latent' holds NaN or infinite values")
    return values
