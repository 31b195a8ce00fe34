"""The embeddings contract: what `vaectl embed` writes and every reader (publish, monitor, Feast) relies on.

    <root>/<model_version>/part-NNNNNN.parquet    one row per embedded input row:
        <key column>     int64 or string: the input's entity key, under the input's column name
        latent           list<float32>: the posterior mean
        anomaly_score    float32: negative ELBO at the posterior mean in nats, higher = more unusual
        is_anomaly       bool: score above the version's calibrated threshold (null: none calibrated)
        model_version    string: the version that made the vector
        event_timestamp  timestamp[us, UTC]
    <root>/<model_version>/_manifest.json          the commit mark: input listing, counts, run id, model path
    <root>/<model_version>/_quarantine/*.parquet   bad rows as read, plus quarantine_reason and source_file
    <root>/.staging/<run id>/                      a run in progress, hidden from readers

Parquet readers (pyarrow, Feast's sources over <root>/<version>/*.parquet) skip `_` and `.` names.
`latent` is a plain list<float32>: Feast rejects fixed-size lists and Ray's tensor type.
"""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from vae.errors import InputError, first_line
from vae.storage import filesystem, open_parquet_dataset, storage_errors, url_of

COLUMNS = ("latent", "anomaly_score", "is_anomaly", "model_version", "event_timestamp")
SERVED = COLUMNS[:4]  # what a feature view serves for each key (event_timestamp is the row's time)
MANIFEST = "_manifest.json"
QUARANTINE_DIR = "_quarantine"
STAGING_DIR = ".staging"
FORMAT = "vae-embeddings/1"


def schema(key_column: str, key_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            (key_column, key_type),
            ("latent", pa.list_(pa.float32())),
            ("anomaly_score", pa.float32()),
            ("is_anomaly", pa.bool_()),
            ("model_version", pa.string()),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
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
    event_timestamp: pa.Array | pa.ChunkedArray,
) -> pa.Table:
    """Embedding rows in the contract's schema."""
    rows = len(keys)
    if threshold is None:
        is_anomaly = pa.nulls(rows, pa.bool_())
    else:
        is_anomaly = pa.array(anomaly_score > threshold)
    # One dictionary entry for the whole batch: no per-row Python strings.
    versions = pa.DictionaryArray.from_arrays(np.zeros(rows, np.int32), [model_version])
    columns = {
        key_column: keys.cast(key_type),
        "latent": latent_column(posterior_mean),
        "anomaly_score": pa.array(anomaly_score.astype(np.float32, copy=False)),
        "is_anomaly": is_anomaly,
        "model_version": versions.cast(pa.string()),
        "event_timestamp": event_timestamp,
    }
    return pa.table(columns, schema=schema(key_column, key_type))


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


def key_column(table_schema: pa.Schema, source: str, required: tuple[str, ...] = COLUMNS) -> str:
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


def open_embeddings(url: str) -> tuple[pads.Dataset, str]:
    """An embeddings dataset (a version directory, local or s3://) and its key column."""
    dataset = open_parquet_dataset(url, "point at a version directory written by vaectl embed")
    return dataset, key_column(dataset.schema, url)


def list_versions(root: str) -> list[str]:
    """The committed model versions under an embeddings root, oldest first (names sort by time)."""
    fs, path = filesystem(root)
    with storage_errors(root):
        fs.invalidate_cache(path)  # s3fs caches listings: a version another process just wrote must be seen
        entries = fs.ls(path, detail=True) if fs.isdir(path) else []  # one listing, types included
    names = [
        entry["name"].rstrip("/").rpartition("/")[2] for entry in entries if entry["type"] == "directory"
    ]
    return sorted(name for name in names if not name.startswith((".", "_")))


def version_url(root: str, version: str = "latest") -> str:
    """<root>/<version> as a path or URL; 'latest' is the newest version there."""
    versions = list_versions(root)
    if version == "latest":
        if not versions:
            raise InputError(f"{root}: no embeddings found; run the embed job first (vaectl embed)")
        version = versions[-1]
    elif version not in versions:
        have = ", ".join(versions[-5:]) or "none"
        raise InputError(f"{root}: no embeddings for model version '{version}' (have: {have})")
    fs, path = filesystem(root)
    return url_of(fs, f"{path}/{version}")


def version_files(root: str, version: str) -> str:
    """The glob of one version's embedding files (Feast's per-version source)."""
    return f"{root}/{version}/*.parquet"


def all_version_files(root: str) -> str:
    """The glob of every committed version's embedding files (Feast's history source)."""
    return f"{root}/*/*.parquet"


def read_manifest(version_dir: str) -> dict | None:
    """A committed version's manifest; None where there is none or it is unreadable."""
    fs, path = filesystem(version_dir)
    try:
        with storage_errors(version_dir):
            return json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    except (OSError, InputError, json.JSONDecodeError):
        return None


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


def model_version_of(version_dir: str, model_root: str, version: str):
    """The model version that made a version directory's embeddings (metadata only, no weights): at
    the path its manifest records, else under model_root."""
    from vae.artifacts import read_model_version_info

    manifest = read_manifest(version_dir) or {}
    path = manifest.get("model_path")
    if path and manifest.get("model_version") == version:
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            return read_model_version_info(parent, name)
        except InputError:
            pass  # moved since: look under model_root
    return read_model_version_info(model_root, version)
