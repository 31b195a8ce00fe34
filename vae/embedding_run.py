"""An embedding run that lands exactly once: planned work units, each encoded into one file staged
whole, and a commit that reconciles the counts and moves the run into place.

    plan     list the input files, read every footer, check each schema against the model, cut the
             row groups into work units of about `rows_per_file` rows
    encode   a unit's row groups (only the needed columns) -> posterior means and scores -> one
             output file (and its quarantine file) written whole into <output>/.staging/<run id>/
    commit   input rows = embedded + quarantined, write _manifest.json, move the run to
             <output>/<model_version>/ (the layout of vae.embeddings)

The run id is a hash of the input listing, the model version and the settings that shape the
output, and each unit's file name is fixed by the plan: a run that dies is resumed by running it
again (finished files are kept), and the commit publishes exactly one row per input row.
No Ray here: the embed job runs `UnitEncoder.encode` in its actors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vae import embeddings
from vae.artifacts import ModelVersion, code_version
from vae.encode import encode_matrix
from vae.errors import InputError, first_line
from vae.preprocessing import FeatureSchema, check_arrow_schema, features_to_numpy, split_bad_rows
from vae.storage import (
    describe_storage_error,
    filesystem,
    is_local,
    storage_errors,
    url_of,
    write_bytes_atomically,
)

RUN_MARKER = "_run.json"


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

    batch_size: int
    on_bad_rows: Literal["fail", "quarantine"]
    timestamp_column: str | None
    event_time: datetime
    threshold: float | None
    key_type: Literal["int64", "string"]

    @property
    def required(self) -> tuple[str, ...]:
        return (self.timestamp_column,) if self.timestamp_column else ()


@dataclass
class EmbedResult:
    """What a run did: the summary line's figures, and where the output is."""

    output: str
    model_version: str
    input_rows: int
    embedded_rows: int
    quarantined_rows: int
    quarantine: str | None
    files: int
    resumed_files: int
    seconds: float
    startup_seconds: float  # run start until the first unit began encoding
    encode_seconds: float  # first unit began until the last one finished

    @property
    def rows_per_second(self) -> float:
        return self.input_rows / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------------------------
# Plan


def plan_run(data: str, features: FeatureSchema, rows_per_file: int, timestamp_column: str | None) -> Plan:
    """Work units over every input file. Every footer is read (in threads: on S3 each is a request)
    and its schema checked, so a corrupt or mismatched file is reported before any work starts."""
    fs, root = filesystem(data)
    files, infos = _list_input(fs, root, data)
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
        info = infos[path]
        # ETag on S3, modification time locally: a file rewritten in place with the same size is another
        # input.
        version = str(info.get("ETag") or info.get("mtime") or "")
        listing.append(
            {
                "path": relative,
                "size": int(info.get("size") or 0),
                "rows": metadata.num_rows,
                "version": version,
            }
        )
        units += _units_of(path, metadata, partition, rows_per_file, first_index=len(units))
    if not units:
        raise InputError(f"{data}: the dataset has no rows ({len(files)} file(s), all empty)")
    if len(key_types) > 1:
        raise InputError(
            f"{data}: key column '{features.key_column}' is an integer in some files and a string in others"
        )
    return Plan(units, listing, key_types.pop())


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

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(footer, paths))


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
    """Same input files, model version and output-shaping settings -> same run, so a re-run resumes."""
    identity = {
        "model_version": model_version,
        "data": data,
        "listing": listing,
        "event_time": options.event_time.isoformat(),
        "anomaly_threshold": options.threshold,
        "timestamp_column": options.timestamp_column,
        "on_bad_rows": options.on_bad_rows,
        "batch_size": options.batch_size,
        "rows_per_file": rows_per_file,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def start_run(output: str, run: str, marker: dict) -> tuple[str, set[str]]:
    """The run's staging directory (inside the output filesystem) and the unit files already in it.

    A new run writes its marker from here, before any encoder starts: an output location that
    cannot be written (missing bucket, no permission) fails now, naming the output."""
    fs, root = filesystem(output)
    staging = f"{root}/{embeddings.STAGING_DIR}/{run}"
    with storage_errors(output):
        done = finished_units(fs, staging)
        if not done:
            write_bytes_atomically(fs, f"{staging}/{RUN_MARKER}", json.dumps(marker).encode())
    return staging, done


def finished_units(fs, staging: str) -> set[str]:
    if not fs.isdir(staging):
        return set()
    names = [path.rsplit("/", 1)[-1] for path in fs.ls(staging, detail=False, refresh=True)]
    return {n for n in names if n.startswith("part-") and n.endswith(".parquet")}


def discard_run(output: str, staging: str) -> None:
    """Remove a run's staged files (bad input: the input has to change before a run can succeed)."""
    fs, _ = filesystem(output)
    with storage_errors(output):
        fs.rm(staging, recursive=True)


# ---------------------------------------------------------------------------------------------
# Encode


class UnitEncoder:
    """Encodes work units with one loaded model version, writing each unit's file whole into staging."""

    def __init__(
        self,
        model_version: ModelVersion,
        options: EncodeOptions,
        data: str,
        output: str,
        staging: str,
        device: torch.device,
    ):
        self.model_version, self.options, self.device = model_version, options, device
        self.input_fs, _ = filesystem(data)
        self.output_fs, _ = filesystem(output)
        self.staging = staging  # a path inside output_fs
        self.key_type = pa.int64() if options.key_type == "int64" else pa.string()

    def encode(self, unit: WorkUnit) -> dict:
        """Encode one unit; returns its summary (rows, embedded, quarantined, start and end times)."""
        started = time.time()
        url = url_of(self.input_fs, unit.path)
        embedded: list[pa.Table] = []
        quarantined: list[pa.Table] = []
        with storage_errors(url), _naming_the_file(url):
            for batch in self._read(unit, url):
                good, matrix, bad = self._split(batch, url)
                if bad is not None:
                    quarantined.append(bad)
                posterior_mean, anomaly_score = encode_matrix(
                    self.model_version.model, self.model_version.normalizer, matrix, self.device
                )
                embedded.append(self._rows(good, posterior_mean, anomaly_score))
            # The quarantine file first: the embeddings file is the unit's "done" marker.
            if quarantined:
                self._write(f"{embeddings.QUARANTINE_DIR}/{unit.output_name}", pa.concat_tables(quarantined))
            self._write(unit.output_name, pa.concat_tables(embedded) if embedded else self._empty())
        quarantined_rows = sum(t.num_rows for t in quarantined)
        return {
            "index": unit.index,
            "rows": unit.rows,
            "embedded": unit.rows - quarantined_rows,
            "quarantined": quarantined_rows,
            "started": started,
            "finished": time.time(),
        }

    def _split(self, batch: pa.RecordBatch, url: str) -> tuple[pa.RecordBatch, np.ndarray, pa.Table | None]:
        """(rows to encode, their feature matrix, quarantined rows or None). on_bad_rows=fail raises
        instead."""
        features, required = self.model_version.features, self.options.required
        if self.options.on_bad_rows != "quarantine":
            return batch, features_to_numpy(batch, features, required), None
        good, matrix, bad, reasons = split_bad_rows(batch, features, required)
        if not bad.num_rows:
            return good, matrix, None
        table = pa.Table.from_batches([bad]) if isinstance(bad, pa.RecordBatch) else bad
        table = table.append_column("quarantine_reason", pa.array(reasons, pa.string()))
        return good, matrix, table.append_column("source_file", pa.array([url] * table.num_rows, pa.string()))

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

    def _rows(self, batch: pa.RecordBatch, posterior_mean: np.ndarray, anomaly_score: np.ndarray) -> pa.Table:
        column = self.options.timestamp_column
        if column:
            event_timestamp = embeddings.to_utc_timestamps(batch.column(column), column)
        else:
            event_timestamp = embeddings.constant_timestamps(self.options.event_time, batch.num_rows)
        key_column = self.model_version.features.key_column
        return embeddings.embedding_table(
            batch.column(key_column),
            key_column,
            self.key_type,
            posterior_mean,
            anomaly_score,
            self.options.threshold,
            self.model_version.version,
            event_timestamp,
        )

    def _empty(self) -> pa.Table:
        return embeddings.schema(self.model_version.features.key_column, self.key_type).empty_table()

    def _write(self, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        # several row groups per file: readers can split the work
        pq.write_table(table, sink, row_group_size=65_536)
        write_bytes_atomically(self.output_fs, f"{self.staging}/{name}", sink.getvalue().to_pybytes())


def _read_error(url: str, error: BaseException) -> InputError:
    # pyarrow reports undecodable pages as ArrowInvalid or a plain OSError; storage failures are told apart
    # by text.
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
    output: str,
    staging: str,
    model_version: ModelVersion,
    plan: Plan,
    summaries: list[dict],
    settings: dict,
    started: float,
) -> EmbedResult:
    """Reconcile the staged files with the plan, write the manifest, and move the run into place.

    `settings`: what the caller records in the manifest beyond the counts (data, options)."""
    fs, root = filesystem(output)
    files, quarantine_files = _staged_counts(fs, output, staging, plan.units)
    input_rows = sum(u.rows for u in plan.units)
    embedded, quarantined = sum(files.values()), sum(quarantine_files.values())
    if embedded + quarantined != input_rows:
        raise RuntimeError(
            f"staged output does not reconcile: {input_rows} input rows, {embedded} embedded + {quarantined} "
            f"quarantined; nothing committed (staging kept at {url_of(fs, staging)})"
        )
    counts = {"input_rows": input_rows, "embedded_rows": embedded, "quarantined_rows": quarantined}
    manifest = _manifest(model_version, plan, settings, counts, files, quarantine_files, staging)
    destination = f"{root}/{model_version.version}"
    names = [*files, *(f"{embeddings.QUARANTINE_DIR}/{n}" for n in quarantine_files), embeddings.MANIFEST]
    with storage_errors(output):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{staging}/{RUN_MARKER}")
        write_bytes_atomically(
            fs, f"{staging}/{embeddings.MANIFEST}", json.dumps(manifest, indent=2).encode()
        )
        _move_into_place(fs, staging, destination, names)
    now = time.time()
    first_start = min((s["started"] for s in summaries), default=now)
    last_finish = max((s["finished"] for s in summaries), default=now)
    return EmbedResult(
        output=url_of(fs, destination),
        model_version=model_version.version,
        input_rows=input_rows,
        embedded_rows=embedded,
        quarantined_rows=quarantined,
        quarantine=url_of(fs, f"{destination}/{embeddings.QUARANTINE_DIR}") if quarantined else None,
        files=len(files),
        resumed_files=len(plan.units) - len(summaries),
        seconds=now - started,
        startup_seconds=max(0.0, first_start - started),
        encode_seconds=last_finish - first_start,
    )


def _manifest(
    model_version: ModelVersion,
    plan: Plan,
    settings: dict,
    counts: dict,
    files: dict,
    quarantine_files: dict,
    staging: str,
) -> dict:
    """The commit mark of a version directory: what made it, from what, and what it holds."""
    return {
        "format": embeddings.FORMAT,
        "model_version": model_version.version,
        "model_path": model_version.path,
        "key_column": model_version.features.key_column,
        **settings,
        "input_files": plan.listing,
        **counts,
        "files": files,
        "quarantine_files": quarantine_files,
        "run_id": staging.rsplit("/", 1)[-1],
        "committed_at": datetime.now().astimezone().isoformat(),
        "code_version": code_version(),
    }


def _staged_counts(
    fs, output: str, staging: str, units: list[WorkUnit]
) -> tuple[dict[str, int], dict[str, int]]:
    """Rows per staged file, read from the footers: {embeddings file: rows}, {quarantine file: rows}."""
    names = [u.output_name for u in units]
    quarantine_dir = f"{staging}/{embeddings.QUARANTINE_DIR}"
    with storage_errors(output):
        quarantined = []
        if fs.isdir(quarantine_dir):
            listed = fs.ls(quarantine_dir, detail=False, refresh=True)
            quarantined = sorted(p.rsplit("/", 1)[-1] for p in listed if p.endswith(".parquet"))
        paths = [f"{staging}/{n}" for n in names] + [f"{quarantine_dir}/{n}" for n in quarantined]
        footers = read_footers(fs, paths)
    files = {name: footer.num_rows for name, footer in zip(names, footers[: len(names)], strict=True)}
    quarantine_footers = footers[len(names) :]
    quarantine_files = {name: f.num_rows for name, f in zip(quarantined, quarantine_footers, strict=True)}
    return files, quarantine_files


def _move_into_place(fs, staging: str, destination: str, names: list[str]) -> None:
    """Publish a staged run as <output>/<version>, replacing an earlier run of that version.

    Local: one directory rename (the old run is renamed aside first, then deleted). S3 has no
    rename: files are copied server-side under their planned names (a re-run of the same input
    overwrites a file with identical rows, never adds one), files of an earlier run that are not
    in the new manifest are deleted, and the manifest (the last name) is written last.
    """
    if is_local(fs):
        if os.path.exists(destination):
            retired = f"{os.path.dirname(staging)}/retired-{uuid.uuid4().hex}"
            os.rename(destination, retired)
            os.rename(staging, destination)
            fs.rm(retired, recursive=True)
        else:
            os.rename(staging, destination)
        return
    data_files = names[:-1]
    # concurrent requests
    fs.copy([f"{staging}/{n}" for n in data_files], [f"{destination}/{n}" for n in data_files])
    if fs.isdir(destination):
        keep = {f"{destination}/{name}" for name in names}
        stale = [p for p in fs.find(destination) if p not in keep]
        if stale:
            fs.rm(stale)
    fs.copy(f"{staging}/{names[-1]}", f"{destination}/{names[-1]}")
    fs.rm(staging, recursive=True)
