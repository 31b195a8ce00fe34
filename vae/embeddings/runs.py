"""An embedding run that lands exactly once as one batch of a version's Iceberg table: planned work
units, each encoded into one file staged whole, and a commit that reconciles the counts and replaces
the batch in one transaction (vae.embeddings.catalog).

    plan     list the input files, read every footer, check each schema against the model, cut the
             row groups into work units of about `rows_per_file` rows; the batch id is a hash of the
             listing (paths, sizes, ETags/mtimes) unless named
    encode   a unit's row groups (only the needed columns) -> posterior means and scores -> one file
             written whole under <table>/data/batch_id=<batch>/<run id>/ (bad rows, and rows whose
             model output is not finite, to <table>/runs/<run id>/quarantine/)
    commit   input rows = embedded + quarantined, duplicate keys refused or the latest kept, then
             one Iceberg commit: the batch's earlier rows deleted and the run's files added

The run id is a hash of the batch, the input listing, the model version and the settings that shape
the output, and each unit's file name is fixed by the plan: a run that dies is resumed by running it
again (finished files are kept and added in the final commit). Staged files are invisible to readers
until the commit. No Ray here: the embed job runs `UnitEncoder.encode` in its actors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vae.data.features import FeatureSchema, check_arrow_schema, features_to_numpy, split_bad_rows
from vae.data.keys import key_hash
from vae.data.tabular import with_unseen
from vae.embeddings import contract
from vae.embeddings.catalog import Properties
from vae.encode import attributes, encode_matrix, encode_with_attribution
from vae.errors import DataRefused, InputError, StorageUnavailable, first_line
from vae.killpoints import killpoint
from vae.monitoring.datachecks import CheckSettings, DataCheck, check_batch, failed, worst
from vae.monitoring.profile import InputProfile
from vae.storage import (
    describe_storage_error,
    filesystem,
    is_local,
    is_transient,
    storage_errors,
    url_of,
    with_retries,
    write_bytes_atomically,
)
from vae.versions.artifacts import ModelVersion, code_version, load_profile_text

RUN_MARKER = "_run.json"
log = logging.getLogger("vae.embeddings.runs")


# why a row whose model outputs overflow is refused or quarantined (the embed job and the service)
NOT_FINITE = (
    "has a model output (posterior mean or anomaly score) that is not finite: the row is far outside the "
    "data the model was trained on"
)


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive row groups of one input file, encoded into one output file."""

    index: int
    path: str  # inside the input filesystem
    row_groups: tuple[int, ...]
    rows: int
    partition: dict[str, str]  # hive partition values from the path, e.g. {"date": "2026-11-23"}

    @property
    def output_name(self) -> str:
        return f"part-{self.index:06d}.parquet"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkUnit:
        values = json.loads(text)
        return cls(**{**values, "row_groups": tuple(values["row_groups"])})


@dataclass(frozen=True)
class Plan:
    units: list[WorkUnit]
    listing: list[dict]  # path, size, rows, version (ETag/mtime) per input file: part of the run id
    key_type: Literal["int64", "string"]


@dataclass(frozen=True)
class EncodeOptions:
    """What shapes a run's output rows, besides the model version."""

    batch_id: str
    batch_size: int
    on_bad_rows: Literal["fail", "quarantine"]
    on_duplicate_keys: Literal["fail", "keep-latest"]
    timestamp_column: str | None
    event_time: datetime
    threshold: float | None
    key_type: Literal["int64", "string"]
    # a category the model version never saw: a bad row (refuse) or the "other" bucket (other)
    unseen_categories: Literal["refuse", "other"] = "refuse"
    # mixed tables: also write each row with its missing values filled (vae.impute) beside the table
    impute: bool = False
    # table models: the top columns of each row's score (costs one encoder pass per column)
    attribution: bool = True
    # gather the batch's input profile for its data checks (not in the run id: it shapes no row)
    profile_inputs: bool = True

    @property
    def required(self) -> tuple[str, ...]:
        return (self.timestamp_column,) if self.timestamp_column else ()


@dataclass
class EmbedResult:
    """What a run did: the summary line's figures, and where the output is."""

    output: str  # the table: vae.<entity>.v_<version>
    model_version: str
    batch_id: str
    snapshot_id: int  # the batch's commit
    committed: bool  # False: this run had already landed the batch; nothing changed
    input_rows: int
    embedded_rows: int
    quarantined_rows: int
    duplicate_rows: int  # dropped by on_duplicate_keys: keep-latest
    quarantine: str | None
    files: int
    resumed_files: int
    seconds: float
    startup_seconds: float  # run start until the first unit began encoding
    encode_seconds: float  # first unit began until the last one finished
    commit_seconds: float  # reconcile, settle duplicates, the Iceberg commit
    data_checks: list[dict] = field(default_factory=list)  # every data check run (DataCheck.to_dict)
    profile: str | None = (
        None  # the batch's input profile (JSON); None: the version has none to check against
    )

    @property
    def data_severity(self) -> str | None:
        """The worst failed data check's severity (None: all passed, or unchecked)."""
        return worst([DataCheck.from_dict(c) for c in self.data_checks])

    @property
    def rows_per_second(self) -> float:
        return self.input_rows / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------------------------
# Plan


def plan_run(data: str, features: FeatureSchema, rows_per_file: int, timestamp_column: str | None) -> Plan:
    """Work units over every input file. Every footer is read (in threads: on S3 each is a request)
    and its schema checked, so a corrupt or mismatched file is reported before any work starts."""
    fs, root = filesystem(data)
    files, infos = with_retries(lambda: _list_input(fs, root, data), data)
    units: list[WorkUnit] = []
    listing: list[dict] = []
    key_types: set[str] = set()
    for path, metadata in zip(files, read_footers(fs, files), strict=True):
        relative = path[len(root) :].lstrip("/") if path != root else os.path.basename(path)
        partition = dict(part.split("=", 1) for part in relative.split("/")[:-1] if "=" in part)
        schema = _with_partition_columns(metadata.schema.to_arrow_schema(), partition)
        url = url_of(fs, path)
        check_arrow_schema(schema, features, url)
        key_types.add("int64" if pa.types.is_integer(schema.field(features.key_column).type) else "string")
        if timestamp_column:
            _check_timestamp_column(schema, timestamp_column, url)
        listing.append(_listing_entry(relative, infos[path], metadata.num_rows))
        units += _units_of(path, metadata, partition, rows_per_file, first_index=len(units))
    if not units:
        raise InputError(f"{data}: the dataset has no rows ({len(files)} file(s), all empty)")
    if len(key_types) > 1:
        raise InputError(
            f"{data}: key column '{features.key_column}' is an integer in some files and a string in others"
        )
    return Plan(units, listing, key_types.pop())


def _listing_entry(relative: str, info: dict, rows: int) -> dict:
    # ETag on S3, modification time locally: a file rewritten in place with the same size is another input.
    version = str(info.get("ETag") or info.get("mtime") or "")
    modified = info.get("LastModified") or info.get("mtime")  # s3fs: a datetime; local: epoch seconds
    if isinstance(modified, int | float):
        modified = datetime.fromtimestamp(modified, UTC)
    modified = modified.astimezone(UTC).isoformat() if isinstance(modified, datetime) else None
    return {
        "path": relative,
        "size": int(info.get("size") or 0),
        "rows": rows,
        "version": version,
        "modified": modified,
    }


def batch_id_of(listing: list[dict]) -> str:
    """The default batch id: a hash of what was listed (the same files give the same batch)."""
    identity = [{k: entry[k] for k in ("path", "size", "rows", "version")} for entry in listing]
    return "b-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def batch_time(listing: list[dict]) -> datetime:
    """The batch's own time: when its newest input file was written (UTC)."""
    times = [datetime.fromisoformat(e["modified"]) for e in listing if e.get("modified")]
    return max(times) if times else datetime.now(UTC)


def check_batch_id(batch: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", batch):
        raise InputError(f"batch '{batch}': use letters, digits, '.', '_' and '-' (e.g. 2026-11-23)")
    return batch


def _list_input(fs, root: str, data: str) -> tuple[list[str], dict]:
    with storage_errors(data):
        try:
            root_info = fs.info(root)  # raises on a missing bucket, bad credentials, an unreachable endpoint
        except FileNotFoundError as error:
            missing = (
                describe_storage_error(data, error) or f"{data}: no such file or directory; check the path"
            )
            raise InputError(missing) from None
        if root_info["type"] != "directory":
            return [root], {root: root_info}
        infos = fs.find(root, detail=True)
    files = sorted(
        path for path, info in infos.items() if info["type"] == "file" and not is_hidden(path[len(root) :])
    )
    if not files:
        raise InputError(f"{data}: no Parquet files found; check the path")
    return files, infos


def _units_of(
    path: str, metadata: pq.FileMetaData, partition: dict, rows_per_file: int, first_index: int
) -> list[WorkUnit]:
    """Consecutive row groups of one file, cut into units of at least rows_per_file rows (the last: the
    rest)."""
    units: list[WorkUnit] = []
    group: list[int] = []
    group_rows = 0
    for row_group in range(metadata.num_row_groups):
        group.append(row_group)
        group_rows += metadata.row_group(row_group).num_rows
        if group_rows >= rows_per_file or row_group == metadata.num_row_groups - 1:
            if group_rows:
                units.append(WorkUnit(first_index + len(units), path, tuple(group), group_rows, partition))
            group, group_rows = [], 0
    return units


def read_footers(fs, paths: list[str]) -> list[pq.FileMetaData]:
    """Parquet footers of many files, read in parallel threads (on S3 each is a request)."""

    def footer(path: str) -> pq.FileMetaData:
        url = url_of(fs, path)
        try:
            with storage_errors(url):
                if is_local(fs):
                    return pq.read_metadata(path)
                with fs.open(path, "rb") as f:
                    return pq.read_metadata(f)
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(
                f"{url}: not a readable Parquet file ({first_line(error)}); remove or replace it"
            ) from None

    def footers() -> list[pq.FileMetaData]:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(footer, paths))

    return with_retries(footers, url_of(fs, paths[0]) if paths else "")


def is_hidden(relative: str) -> bool:
    """The names Parquet readers (pyarrow, Spark) skip: _SUCCESS, _metadata, .staging, .crc files."""
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def _with_partition_columns(schema: pa.Schema, partition: dict[str, str]) -> pa.Schema:
    for name in partition:
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.string()))
    return schema


def _check_timestamp_column(schema: pa.Schema, column: str, source: str) -> None:
    if column not in schema.names:
        raise InputError(
            f"{source}: missing timestamp column '{column}'; the file has {', '.join(schema.names)}"
        )
    column_type = schema.field(column).type
    if not (
        pa.types.is_timestamp(column_type) or pa.types.is_date(column_type) or pa.types.is_string(column_type)
    ):
        raise InputError(
            f"{source}: timestamp column '{column}' is {column_type}; it must be a timestamp or a date"
        )


def run_id(
    data: str, model_version: str, listing: list[dict], options: EncodeOptions, rows_per_file: int
) -> str:
    """Same batch, input files, model version and output-shaping settings -> same run, so a re-run resumes."""
    identity = {
        "batch_id": options.batch_id,
        "model_version": model_version,
        "data": data,
        "listing": listing,
        "event_time": options.event_time.isoformat(),
        "anomaly_threshold": options.threshold,
        "timestamp_column": options.timestamp_column,
        "on_bad_rows": options.on_bad_rows,
        "on_duplicate_keys": options.on_duplicate_keys,
        "batch_size": options.batch_size,
        "rows_per_file": rows_per_file,
        "unseen_categories": options.unseen_categories,
        "impute": options.impute,
        "attribution": options.attribution,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunPaths:
    """Where a run stages its files, inside its version table's location (URLs or local paths)."""

    data: str  # <table>/data/batch_id=<batch>/<run id>: the files the commit adds
    quarantine: str  # <table>/runs/<run id>/quarantine: bad rows, never in the table
    marker: str  # <table>/runs/<run id>/run.json

    @property
    def profiles(self) -> str:
        """<table>/runs/<run id>/profiles: each unit's input profile; profile.json beside it, the batch's."""
        return self.marker.rsplit("/", 1)[0] + "/profiles"

    @classmethod
    def of(cls, table_location: str, batch_id: str, run: str) -> RunPaths:
        root = table_location.removeprefix("file://").rstrip("/")
        return cls(
            f"{root}/data/batch_id={batch_id}/{run}",
            f"{root}/runs/{run}/quarantine",
            f"{root}/runs/{run}/run.json",
        )


def start_run(paths: RunPaths, marker: dict) -> set[str]:
    """The unit files an earlier attempt of this run already staged. A new run writes its marker first:
    a location that cannot be written (missing bucket, no permission) fails now, naming it."""
    fs, data = filesystem(paths.data)

    def start() -> set[str]:
        with storage_errors(paths.data):
            done = finished_units(fs, data)
            if not done:
                write_bytes_atomically(fs, filesystem(paths.marker)[1], json.dumps(marker).encode())
        return done

    return with_retries(start, paths.data)


def finished_units(fs, directory: str) -> set[str]:
    if not fs.isdir(directory):
        return set()
    names = [path.rsplit("/", 1)[-1] for path in fs.ls(directory, detail=False, refresh=True)]
    return {n for n in names if n.startswith("part-") and n.endswith(".parquet")}


def discard_run(paths: RunPaths, table) -> bool:
    """Remove a run's staged files (bad input: the input has to change before a run can succeed), unless
    a snapshot of the table was committed by this run: then its files and its quarantine are the table's
    (now or in time travel) and nothing is removed. Returns whether anything was removed."""
    run = paths.data.rsplit("/", 1)[-1]
    if any(s.summary.additional_properties.get(Properties.RUN) == run for s in table.snapshots()):
        return False
    for url in (paths.data, paths.marker.rsplit("/", 1)[0]):
        fs, path = filesystem(url)
        with storage_errors(url), contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
    return True


# ---------------------------------------------------------------------------------------------
# Encode


class UnitEncoder:
    """Encodes work units with one loaded model version, writing each unit's file whole into staging."""

    def __init__(
        self,
        model_version: ModelVersion,
        options: EncodeOptions,
        data: str,
        paths: RunPaths,
        device: torch.device,
    ):
        table = model_version.features.table
        if table is not None:
            features = replace(model_version.features, table=with_unseen(table, options.unseen_categories))
            model_version = replace(model_version, features=features)
        self.model_version, self.options, self.paths, self.device = model_version, options, paths, device
        self.attributes = (
            options.attribution
            and attributes(model_version.model)
            and bool(model_version.features.feature_columns)
        )
        self.imputes = options.impute and model_version.features.table is not None
        # the batch's input profile, for its data checks: only against a version that has one
        self.profiles = options.profile_inputs and model_version.metadata.get("profile_sha256") is not None
        self.input_fs, _ = filesystem(data)
        self.output_fs, _ = filesystem(paths.data)
        self.key_type = pa.int64() if options.key_type == "int64" else pa.string()

    def encode(self, unit: WorkUnit) -> dict:
        """Encode one unit; returns its summary (rows, embedded, quarantined, start and end times). A unit
        is encoded whole and written at once, so storage that fails midway means encoding it again."""
        return with_retries(lambda: self._encode_unit(unit), url_of(self.input_fs, unit.path))

    def _encode_unit(self, unit: WorkUnit) -> dict:
        started = time.time()
        url = url_of(self.input_fs, unit.path)
        embedded: list[pa.Table] = []
        quarantined: list[pa.Table] = []
        imputed: list[tuple[pa.Array, np.ndarray]] = []  # (keys, codes) of the encoded rows
        profile = InputProfile()
        features = self.model_version.features
        with storage_errors(url), _naming_the_file(url):
            for batch in self._read(unit, url):
                if self.profiles:  # every row read, bad ones too: the checks see the input as it came
                    hashes = key_hash(batch.column(features.key_column))
                    profile = profile.merge(InputProfile.of(batch, features, hashes))
                good, matrix, bad = self._split(batch, url)
                posterior_mean, anomaly_score, surprise = self._encode(matrix)
                finite = np.isfinite(posterior_mean).all(axis=1) & np.isfinite(anomaly_score)
                good, posterior_mean, anomaly_score, not_finite = self._finite(
                    good, posterior_mean, anomaly_score, url
                )
                quarantined += [t for t in (bad, not_finite) if t is not None]
                if self.imputes:
                    imputed.append((good.column(self.model_version.features.key_column), matrix[finite]))
                attribution = None
                if surprise is not None:
                    names = self.model_version.features.feature_columns
                    missing = np.isnan(matrix[finite])  # mixed tables' codes: NaN = no value
                    attribution = contract.attribution_columns(surprise[finite], names, missing=missing)
                embedded.append(self._rows(good, posterior_mean, anomaly_score, attribution))
            # The quarantine file first: the embeddings file is the unit's "done" marker.
            if quarantined:
                self._write(f"{self.paths.quarantine}/{unit.output_name}", pa.concat_tables(quarantined))
            quality = self._write_imputed(unit, imputed) if self.imputes else None
            if self.profiles:
                path = filesystem(f"{self.paths.profiles}/{unit.output_name}.json")[1]
                write_bytes_atomically(self.output_fs, path, profile.to_json().encode())
            self._write(
                f"{self.paths.data}/{unit.output_name}",
                pa.concat_tables(embedded) if embedded else self._empty(),
            )
        quarantined_rows = sum(t.num_rows for t in quarantined)
        return {
            "index": unit.index,
            "rows": unit.rows,
            "embedded": unit.rows - quarantined_rows,
            "quarantined": quarantined_rows,
            "started": started,
            "finished": time.time(),
            "imputation": json.dumps(quality) if quality else "",
        }

    def _write_imputed(self, unit: WorkUnit, parts: list[tuple[pa.Array, np.ndarray]]) -> dict | None:
        """The unit's rows with missing values filled, under <table>/runs/<run id>/imputed/, and the
        imputation quality on held-out entries (against mean/mode) for the run's summary."""
        from vae.impute import imputation_quality, imputed_table

        if not parts:
            return None
        features, model = self.model_version.features, self.model_version.model
        keys = pa.concat_arrays(
            [k.combine_chunks() if isinstance(k, pa.ChunkedArray) else k for k, _ in parts]
        )
        codes = np.concatenate([c for _, c in parts])
        rows = imputed_table(features.table, keys, codes, model, features.key_column)
        self._write(f"{self.paths.quarantine.rsplit('/', 1)[0]}/imputed/{unit.output_name}", rows)
        return imputation_quality(model, features.table, codes)

    def _encode(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(posterior means, scores, per-column surprise or None when the model has no columns)."""
        model, normalizer = self.model_version.model, self.model_version.normalizer
        if self.attributes:
            return encode_with_attribution(model, normalizer, matrix, self.device)
        return (*encode_matrix(model, normalizer, matrix, self.device), None)

    def _split(self, batch: pa.RecordBatch, url: str) -> tuple[pa.RecordBatch, np.ndarray, pa.Table | None]:
        """(rows to encode, their feature matrix, quarantined rows or None); on_bad_rows=fail raises
        instead."""
        features, required = self.model_version.features, self.options.required
        if self.options.on_bad_rows != "quarantine":
            return batch, features_to_numpy(batch, features, required), None
        good, matrix, bad, reasons = split_bad_rows(batch, features, required)
        return good, matrix, _quarantine_table(bad, reasons, url) if bad.num_rows else None

    def _finite(self, good, posterior_mean: np.ndarray, anomaly_score: np.ndarray, url: str):
        """Rows whose posterior mean or score is not finite (finite inputs far outside the training data can
        overflow) never reach the table: refused, or quarantined with on_bad_rows=quarantine."""
        finite = np.isfinite(posterior_mean).all(axis=1) & np.isfinite(anomaly_score)
        if finite.all():
            return good, posterior_mean, anomaly_score, None
        reason = NOT_FINITE
        if self.options.on_bad_rows != "quarantine":
            key_column = self.model_version.features.key_column
            key = good.column(key_column)[int(np.flatnonzero(~finite)[0])].as_py()
            raise InputError(f"row {key_column}={key!r} {reason}; fix or drop such rows, or quarantine them")
        mask = pa.array(finite)
        bad = good.filter(pa.compute.invert(mask))
        quarantine = _quarantine_table(bad, [reason] * bad.num_rows, url)
        return good.filter(mask), posterior_mean[finite], anomaly_score[finite], quarantine

    def _read(self, unit: WorkUnit, url: str) -> Iterator[pa.RecordBatch]:
        """The unit's row groups in batches, only the needed columns; hive partition values as columns."""
        wanted = [*self.model_version.features.columns, *self.options.required]
        with contextlib.ExitStack() as stack:
            try:
                if is_local(self.input_fs):
                    parquet = pq.ParquetFile(unit.path)
                else:  # pre_buffer coalesces the column chunks into few large requests
                    handle = stack.enter_context(self.input_fs.open(unit.path, "rb"))
                    parquet = pq.ParquetFile(handle, pre_buffer=True)
                in_file = [c for c in wanted if c in parquet.schema_arrow.names]
                batches = parquet.iter_batches(
                    batch_size=self.options.batch_size, row_groups=list(unit.row_groups), columns=in_file
                )
                for batch in batches:
                    for name in wanted:
                        if name not in in_file:  # a hive partition column
                            values = pa.array([unit.partition[name]] * batch.num_rows, pa.string())
                            batch = batch.append_column(name, values)
                    yield batch
            except (pa.ArrowInvalid, OSError) as error:
                raise _read_error(url, error) from None

    def _rows(
        self, batch, posterior_mean: np.ndarray, anomaly_score: np.ndarray, attribution=None
    ) -> pa.Table:
        column = self.options.timestamp_column
        if column:
            event_timestamp = contract.to_utc_timestamps(batch.column(column), column)
        else:
            event_timestamp = contract.constant_timestamps(self.options.event_time, batch.num_rows)
        key_column = self.model_version.features.key_column
        return contract.embedding_table(
            batch.column(key_column),
            key_column,
            self.key_type,
            posterior_mean,
            anomaly_score,
            self.options.threshold,
            self.model_version.version,
            self.options.batch_id,
            event_timestamp,
            attribution,
        )

    def _empty(self) -> pa.Table:
        return contract.schema(self.model_version.features.key_column, self.key_type).empty_table()

    def _write(self, url: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(
            table, sink, row_group_size=65_536
        )  # several row groups per file: readers can split the work
        write_bytes_atomically(self.output_fs, filesystem(url)[1], sink.getvalue().to_pybytes())


def _quarantine_table(bad: pa.Table | pa.RecordBatch, reasons: list[str], url: str) -> pa.Table:
    table = pa.Table.from_batches([bad]) if isinstance(bad, pa.RecordBatch) else bad
    table = table.append_column("quarantine_reason", pa.array(reasons, pa.string()))
    return table.append_column("source_file", pa.array([url] * table.num_rows, pa.string()))


def _read_error(url: str, error: BaseException) -> InputError | StorageUnavailable:
    # pyarrow reports undecodable pages as ArrowInvalid or a plain OSError; storage failures are told
    # apart by their text.
    if is_transient(error):
        return StorageUnavailable(f"{url}: {first_line(error)}")
    if (problem := describe_storage_error(url, error)) is not None:
        return InputError(problem)
    if isinstance(error, FileNotFoundError):
        return InputError(f"{url}: the file disappeared while the job ran; re-run to plan again")
    return InputError(f"corrupt Parquet data ({first_line(error)}); remove or replace the file")


@contextlib.contextmanager
def _naming_the_file(url: str):
    try:
        yield
    except InputError as error:
        if url in str(error):
            raise
        raise InputError(f"{url}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Commit


def commit_run(
    catalog,
    table,
    paths: RunPaths,
    model_version: ModelVersion,
    plan: Plan,
    options: EncodeOptions,
    summaries: list[dict],
    settings: dict[str, str],
    started: float,
    data_checks: CheckSettings | None = None,
) -> EmbedResult:
    """Reconcile the staged files with the plan, settle duplicate keys, check the batch's inputs against
    the version's (refused: DataRefused, nothing committed), and replace the batch in the version's
    table with one Iceberg commit. `settings`: what the batch records beyond its counts."""
    fs, data = filesystem(paths.data)
    files, quarantine_files = _staged_counts(fs, paths, plan.units)
    input_rows = sum(u.rows for u in plan.units)
    embedded, quarantined = sum(files.values()), sum(quarantine_files.values())
    if embedded + quarantined != input_rows:
        raise RuntimeError(
            f"staged output does not reconcile: {input_rows} input rows, {embedded} embedded + {quarantined} "
            f"quarantined; nothing committed (staging kept at {paths.data})"
        )
    commit_started = time.time()
    key_column = model_version.features.key_column
    staged = [f"{data}/{name}" for name in files]
    duplicates, settled = with_retries(
        lambda: settle_duplicates(fs, staged, key_column, options.on_duplicate_keys), paths.data
    )
    killpoint("embed.settled")
    profile, checks = with_retries(
        lambda: check_inputs(paths, plan, model_version, options.batch_id, duplicates, data_checks),
        paths.data,
    )
    urls = [file_url(fs, settled.get(path, path)) for path in staged]
    properties = {
        **settings,
        Properties.PROFILE: profile or "",
        Properties.DATA_CHECKS: json.dumps([c.to_dict() for c in failed(checks)]) if checks else "",
        Properties.DATA_SEVERITY: worst(checks) or "",
        Properties.EVENT_TIME: options.event_time.isoformat(),
        Properties.INPUT_ROWS: str(input_rows),
        Properties.EMBEDDED_ROWS: str(embedded - duplicates),
        Properties.QUARANTINED_ROWS: str(quarantined),
        Properties.DUPLICATE_ROWS: str(duplicates),
        Properties.QUARANTINE: paths.quarantine if quarantined else "",
        Properties.INPUT_LISTING: hashlib.sha256(
            json.dumps(plan.listing, sort_keys=True).encode()
        ).hexdigest(),
        Properties.INPUT_FILES: str(len(plan.listing)),
        Properties.CODE_VERSION: code_version(),
    }
    run = paths.data.rsplit("/", 1)[-1]
    batch, committed = with_retries(  # idempotent: a commit that landed before the error is found landed
        lambda: catalog.commit_batch(table, options.batch_id, urls, properties, run, int(started * 1000)),
        paths.data,
    )
    killpoint("embed.committed")
    for original in settled:  # the batch holds the settled copies: the encoded originals are of no use now
        with storage_errors(original), contextlib.suppress(FileNotFoundError):
            fs.rm(original)
    now = time.time()
    first_start = min((s["started"] for s in summaries), default=now)
    last_finish = max((s["finished"] for s in summaries), default=now)
    return EmbedResult(
        output=".".join(table.name()),
        model_version=model_version.version,
        batch_id=options.batch_id,
        snapshot_id=batch.snapshot_id,
        committed=committed,
        input_rows=input_rows,
        embedded_rows=embedded - duplicates,
        quarantined_rows=quarantined,
        duplicate_rows=duplicates,
        quarantine=paths.quarantine if quarantined else None,
        files=len(files),
        resumed_files=len(plan.units) - len(summaries),
        seconds=now - started,
        startup_seconds=max(0.0, first_start - started),
        encode_seconds=last_finish - first_start,
        commit_seconds=now - commit_started,
        data_checks=[c.to_dict() for c in checks],
        profile=profile,
    )


def check_inputs(
    paths: RunPaths,
    plan: Plan,
    model_version: ModelVersion,
    batch_id: str,
    duplicates: int,
    settings: CheckSettings | None,
) -> tuple[str | None, list[DataCheck]]:
    """The batch's input profile (its units' merged, written as the run's profile.json) and its data checks
    against the version's training profile: (profile URL, checks). Raises DataRefused when a failed check's
    severity is refuse. (None, []) when the version has no profile or a unit's is missing (a unit staged
    before profiles existed): the batch is embedded unchecked, with a warning."""
    reference_text = load_profile_text(model_version) if settings is not None and settings.enabled else None
    if reference_text is None:
        return None, []
    fs, folder = filesystem(paths.profiles)
    profile = InputProfile()
    wanted = [f"{folder}/{unit.output_name}.json" for unit in plan.units]
    with storage_errors(paths.profiles):
        staged = (
            {p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False, refresh=True)}
            if fs.isdir(folder)
            else set()
        )
        if not {w.rsplit("/", 1)[-1] for w in wanted} <= staged:
            log.warning("%s: a unit was staged without its input profile: no data checks", paths.data)
            return None, []
        texts = fs.cat(wanted)
        for path in wanted:
            profile = profile.merge(InputProfile.from_json(texts[path].decode()))
        write_bytes_atomically(fs, f"{folder}/profile.json", profile.to_json().encode())
    checks = check_batch(InputProfile.from_json(reference_text), profile, duplicates, settings)
    for check in failed(checks):
        log.warning("data check %s (%s): %s", check.name, check.severity, check.detail)
    refused = failed(checks, "refuse")
    if refused:
        reasons = "; ".join(f"{c.name}: {c.detail}" for c in refused)
        raise DataRefused(
            f"batch {batch_id} refused by its data checks: {reasons}; nothing was embedded (set the "
            "check's severity in data_checks to embed such a batch anyway)",
            [c.to_dict() for c in refused],
        )
    return url_of(fs, f"{folder}/profile.json"), checks


def settle_duplicates(fs, paths: list[str], key_column: str, policy: str) -> tuple[int, dict[str, str]]:
    """Keys that occur twice in one batch: refused (fail), or only each key's row with the latest
    event_timestamp kept (keep-latest). Returns the rows dropped and {staged file: its settled copy}.

    The staged files stay as encoded: the settled copies are new files beside them (settled/), so a
    commit that fails leaves a staging that still reconciles with the input, and the re-run settles
    again to the same copies."""
    keys = []
    for index, path in enumerate(paths):
        with fs.open(path, "rb") as f:
            part = pq.read_table(f, columns=[key_column, "event_timestamp"])
        keys.append(
            part.append_column("file", pa.array(np.full(part.num_rows, index, np.int32))).append_column(
                "row", pa.array(np.arange(part.num_rows, dtype=np.int64))
            )
        )
    table = pa.concat_tables(keys) if keys else None
    if table is None or table.num_rows == len(pa.compute.unique(table.column(key_column))):
        return 0, {}
    counts = table.group_by(key_column).aggregate([(key_column, "count")])
    repeated = counts.filter(pa.compute.greater(counts.column(f"{key_column}_count"), 1))
    if policy != "keep-latest":
        example = repeated.column(key_column)[0].as_py()
        raise InputError(
            f"duplicate keys: {repeated.num_rows} key(s) occur more than once in this batch (e.g. "
            f"{key_column}={example!r}); fix the input, or embed with --on-duplicate-keys keep-latest to "
            "keep each key's latest row"
        )
    order = table.sort_by(
        [
            (key_column, "ascending"),
            ("event_timestamp", "descending"),
            ("file", "descending"),
            ("row", "descending"),
        ]
    )
    keys_sorted = order.column(key_column).to_numpy(zero_copy_only=False)
    first = np.ones(len(keys_sorted), bool)
    first[1:] = keys_sorted[1:] != keys_sorted[:-1]
    dropped = order.filter(pa.array(~first))
    settled: dict[str, str] = {}
    for index in sorted(set(dropped.column("file").to_pylist())):
        rows = dropped.filter(pa.compute.equal(dropped.column("file"), index)).column("row").to_numpy()
        with fs.open(paths[index], "rb") as f:
            part = pq.read_table(f)
        keep = np.ones(part.num_rows, bool)
        keep[rows] = False
        sink = pa.BufferOutputStream()
        pq.write_table(part.filter(pa.array(keep)), sink, row_group_size=65_536)
        directory, _, name = paths[index].rpartition("/")
        settled[paths[index]] = f"{directory}/settled/{name}"
        fs.makedirs(f"{directory}/settled", exist_ok=True)
        write_bytes_atomically(fs, settled[paths[index]], sink.getvalue().to_pybytes())
    return dropped.num_rows, settled


def file_url(fs, path: str) -> str:
    """A staged file as the Iceberg table records it."""
    return f"file://{path}" if is_local(fs) else url_of(fs, path)


def _staged_counts(fs, paths: RunPaths, units: list[WorkUnit]) -> tuple[dict[str, int], dict[str, int]]:
    """Rows per staged file, read from the footers: {embeddings file: rows}, {quarantine file: rows}."""
    names = [u.output_name for u in units]
    _, data = filesystem(paths.data)
    _, quarantine_dir = filesystem(paths.quarantine)
    with storage_errors(paths.data):
        quarantined = []
        if fs.isdir(quarantine_dir):
            listed = fs.ls(quarantine_dir, detail=False, refresh=True)
            quarantined = sorted(p.rsplit("/", 1)[-1] for p in listed if p.endswith(".parquet"))
        locations = [f"{data}/{n}" for n in names] + [f"{quarantine_dir}/{n}" for n in quarantined]
        footers = read_footers(fs, locations)
    files = {name: footer.num_rows for name, footer in zip(names, footers[: len(names)], strict=True)}
    quarantine_footers = footers[len(names) :]
    quarantine_files = {name: f.num_rows for name, f in zip(quarantined, quarantine_footers, strict=True)}
    return files, quarantine_files
