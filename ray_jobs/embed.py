"""Embed a Parquet dataset with a model version: a Ray Data batch job, exactly once.

    plan (driver)   list the input files, check every file's schema against the model, cut the
                    row groups into work units of about `rows_per_file` rows
    encode (Ray)    a pool of encoder actors; each reads its unit's row groups (only the needed
                    columns), encodes them and writes one output file (and its quarantine file)
                    whole into the run's staging directory
    commit (driver) reconcile input rows = embedded + quarantined, write _manifest.json, move the
                    run into <output>/<model_version>/

Output rows (the embeddings contract): the entity key, `latent` (float32 list, posterior mean),
`anomaly_score` (float32, negative ELBO at the posterior mean), `is_anomaly` (score above the
version's threshold, calibrated on its validation split; null for versions without one),
`model_version`, `event_timestamp` (UTC).

Exactly once: the staging directory <output>/.staging/<run id>/ is named by a hash of the input
listing, the model version and the settings that change the output, and each unit's file name
is fixed by the plan. A run that dies is resumed by running the same command again: finished
units are kept, the rest are encoded, and the commit publishes exactly one row per input row.
Readers (Feast's offline source globs <output>/*/*.parquet) never see staging files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from pydantic import Field

from ray_jobs.common import (
    JobConfig,
    alive_node_resources,
    describe,
    find_input_error,
    node_capacity,
    parse_config,
    ray_session,
    run_cli,
)
from vae import InputError, encode_matrix, load_model_version
from vae.artifacts import ModelVersion, anomaly_threshold, code_version
from vae.encode import latent_column
from vae.preprocessing import FeatureSchema, check_arrow_schema, features_to_numpy, split_bad_rows
from vae.storage import describe_storage_error, filesystem, is_local, storage_errors, url_of, write_bytes_atomically

log = logging.getLogger("ray_jobs.embed")

MANIFEST = "_manifest.json"
QUARANTINE_DIR = "_quarantine"  # inside a version directory; Parquet readers skip '_' names
STAGING_DIR = ".staging"


class EmbedConfig(JobConfig):
    """Encode a Parquet dataset with a model version and write the embeddings as Parquet."""

    data: str = Field(description="Parquet file or directory (local or s3://), hive-style partitions allowed")
    model_root: str = Field("models", description="directory or s3:// prefix that holds model versions")
    model_version: str = Field("latest", description="version name, or 'latest'")
    output: str = Field("feature_repo/data/embeddings", description="embeddings root (local or s3://); the job writes <output>/<version>/")
    timestamp_column: str | None = Field(None, description="input column used as event_timestamp")
    event_time: datetime | None = Field(
        None, description="event_timestamp of every row when no timestamp_column (default: the model version's creation time, "
        "so re-runs write identical rows)"
    )
    on_bad_rows: Literal["fail", "quarantine"] = Field(
        "fail", description="a row that cannot be encoded stops the job (fail) or goes to <output>/<version>/_quarantine/ (quarantine)"
    )
    anomaly_quantile: float | None = Field(
        None, gt=0, lt=1, description="is_anomaly = score above this quantile of the version's validation scores "
        "(default: the threshold chosen at training, anomaly_quantile there)"
    )
    batch_size: int = Field(8192, gt=0, description="rows per encoder call")
    rows_per_file: int = Field(262_144, gt=0, description="rows per output file: the unit of work and of resuming")
    num_encoders: int | None = Field(None, gt=0, description="encoder actors (default: one per CPU, or per GPU when the cluster has GPUs)")
    cpus_per_encoder: float = Field(1.0, gt=0, description="CPUs reserved by each encoder actor (its torch threads)")
    gpus_per_encoder: float | None = Field(None, ge=0, description="GPUs per encoder actor (default: 1 if the cluster has GPUs, else 0)")
    encoder_resources: dict[str, float] = Field({}, description="extra Ray resources each encoder actor needs (pins it to node types)")


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


@dataclass
class EmbedResult:
    """What the job did: the summary line's figures, and where the output is."""

    output: str
    model_version: str
    input_rows: int
    embedded_rows: int
    quarantined_rows: int
    quarantine: str | None
    files: int
    resumed_files: int
    seconds: float
    startup_seconds: float  # job start until the first unit began encoding
    encode_seconds: float  # first unit began until the last one finished

    @property
    def rows_per_second(self) -> float:
        return self.input_rows / self.seconds if self.seconds else 0.0


def embed(config: EmbedConfig) -> EmbedResult:
    """Run the whole embedding job; everything is checked before Ray starts."""
    started = time.time()
    model_version = load_model_version(config.model_root, config.model_version)  # resolves 'latest', verifies weights
    features = model_version.features
    event_time = config.event_time or datetime.fromisoformat(model_version.metadata["created_at"])
    if event_time.tzinfo is None:
        raise InputError(f"event_time {event_time.isoformat()} has no time zone; write it in UTC, e.g. 2026-11-23T00:00:00Z")

    threshold = anomaly_threshold(model_version, config.anomaly_quantile)
    if threshold is None:
        log.warning("model version %s has no calibrated anomaly threshold (saved before calibration): is_anomaly is null",
                    model_version.version)

    input_fs, input_root = filesystem(config.data)
    units, listing, key_type = plan_units(input_fs, input_root, config, features)
    run_id = _run_id(config, model_version.version, event_time, listing, threshold)
    output_fs, output_root = filesystem(config.output)
    staging = f"{output_root}/{STAGING_DIR}/{run_id}"
    with storage_errors(config.output):
        done = _finished_units(output_fs, staging)
        if not done:
            # Written from the driver before Ray starts: an output location that cannot be written
            # (missing bucket, no permission) fails here, naming the output, not later in an actor.
            write_bytes_atomically(output_fs, f"{staging}/_run.json", json.dumps(
                {"run_id": run_id, "model_version": model_version.version, "data": config.data, "units": len(units)}
            ).encode())
    pending = [u for u in units if u.output_name not in done]
    if done:
        log.info("resuming run %s: %d of %d output files already written", run_id, len(units) - len(pending), len(units))

    summaries: list[dict] = []
    if pending:
        try:
            with ray_session():
                summaries = _encode_units(config, model_version.version, event_time, key_type, pending, staging, threshold)
        except Exception as error:
            # Bad input must change before a run can succeed, so its staged files are of no use.
            # Any other failure (a lost node, a killed driver) keeps them for the re-run to resume.
            if find_input_error(error) is not None:
                with storage_errors(config.output):
                    output_fs.rm(staging, recursive=True)
            raise
    result = _commit(config, output_fs, output_root, staging, model_version, threshold, units, listing, summaries, started)
    log.info(
        "embedded %s rows with model %s: %s quarantined, %s rows/s end to end -> %s",
        f"{result.embedded_rows:,}", result.model_version, f"{result.quarantined_rows:,}", f"{result.rows_per_second:,.0f}", result.output,
    )
    return result


def plan_units(fs, root: str, config: EmbedConfig, features: FeatureSchema) -> tuple[list[WorkUnit], list[dict], str]:
    """Work units over every input file, the listing (path, size, rows) the run id is made of, and
    the output key type ('int64' or 'string').

    Every file's footer is read (in parallel threads: on S3 each is a request) and its schema
    checked, so a corrupt or mismatched file is reported before any work starts.
    """
    with storage_errors(config.data):
        try:
            root_info = fs.info(root)  # raises on a missing bucket, bad credentials, an unreachable endpoint
        except FileNotFoundError as error:
            missing = describe_storage_error(config.data, error) or f"{config.data}: no such file or directory; check the path"
            raise InputError(missing) from None
        if root_info["type"] == "directory":
            infos = fs.find(root, detail=True)
            files = sorted(path for path, info in infos.items() if info["type"] == "file" and not _hidden(path[len(root):]))
        else:
            infos, files = {root: root_info}, [root]
    if not files:
        raise InputError(f"{config.data}: no Parquet files found; check the path")

    footers = read_footers(fs, files)
    units: list[WorkUnit] = []
    listing: list[dict] = []
    key_types: set[str] = set()
    for path, metadata in zip(files, footers):
        relative = path[len(root):].lstrip("/") if path != root else os.path.basename(path)
        partition = dict(part.split("=", 1) for part in relative.split("/")[:-1] if "=" in part)
        schema = metadata.schema.to_arrow_schema()
        for name in partition:
            if name not in schema.names:
                schema = schema.append(pa.field(name, pa.string()))
        url = url_of(fs, path)
        check_arrow_schema(schema, features, url)
        key_types.add("int64" if pa.types.is_integer(schema.field(features.key_column).type) else "string")
        if config.timestamp_column:
            _check_timestamp_column(schema, config.timestamp_column, url)
        info = infos[path]
        # ETag on S3, modification time locally: a file rewritten in place with the same size is another input.
        listing.append({"path": relative, "size": int(info.get("size") or 0), "rows": metadata.num_rows,
                        "version": str(info.get("ETag") or info.get("mtime") or "")})
        group: list[int] = []
        group_rows = 0
        for row_group in range(metadata.num_row_groups):
            group.append(row_group)
            group_rows += metadata.row_group(row_group).num_rows
            if group_rows >= config.rows_per_file or row_group == metadata.num_row_groups - 1:
                if group_rows:
                    units.append(WorkUnit(len(units), path, tuple(group), group_rows, partition))
                group, group_rows = [], 0
    if not units:
        raise InputError(f"{config.data}: the dataset has no rows ({len(files)} file(s), all empty)")
    if len(key_types) > 1:
        raise InputError(f"{config.data}: key column '{features.key_column}' is an integer in some files and a string in others")
    return units, listing, key_types.pop()


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
            raise InputError(f"{url}: not a readable Parquet file ({_first_line(error)}); remove or replace it") from None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(footer, paths))


def _hidden(relative: str) -> bool:
    # The names Parquet readers (pyarrow, Spark) skip: _SUCCESS, _metadata, .staging, .crc files.
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def _check_timestamp_column(schema: pa.Schema, column: str, source: str) -> None:
    if column not in schema.names:
        raise InputError(f"{source}: missing timestamp column '{column}'; the file has {', '.join(schema.names)}")
    column_type = schema.field(column).type
    if not (pa.types.is_timestamp(column_type) or pa.types.is_date(column_type) or pa.types.is_string(column_type)):
        raise InputError(f"{source}: timestamp column '{column}' is {column_type}; it must be a timestamp or a date")


def _run_id(config: EmbedConfig, version: str, event_time: datetime, listing: list[dict], threshold: float | None) -> str:
    """Same input files, model version and output-shaping settings -> same run, so a re-run resumes."""
    identity = {
        "model_version": version, "data": config.data, "listing": listing, "event_time": event_time.isoformat(),
        "anomaly_threshold": threshold,
        "timestamp_column": config.timestamp_column, "on_bad_rows": config.on_bad_rows,
        "batch_size": config.batch_size, "rows_per_file": config.rows_per_file,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _finished_units(fs, staging: str) -> set[str]:
    if not fs.isdir(staging):
        return set()
    names = [path.rsplit("/", 1)[-1] for path in fs.ls(staging, detail=False, refresh=True)]
    return {n for n in names if n.startswith("part-") and n.endswith(".parquet")}


class UnitEncoder:
    """A Ray Data actor: loads the model version once, then encodes one work unit per call."""

    def __init__(self, config: dict, version: str, event_time: datetime, key_type: str, staging: str, threshold: float | None):
        self.config = EmbedConfig(**config)
        self.threshold = threshold
        resources = ray.get_runtime_context().get_assigned_resources()
        # One torch thread per reserved CPU, so actors sharing a node do not oversubscribe it.
        torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
        self.device = torch.device("cuda" if resources.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu")
        if resources.get("GPU", 0) > 0 and self.device.type == "cpu":
            log.warning("encoder holds a GPU but torch sees no CUDA device (a CPU build of torch?); encoding on CPU")
        self.model_version = load_model_version(self.config.model_root, version)
        self.model_version.model.to(self.device)
        self.event_time = event_time
        self.key_type = pa.int64() if key_type == "int64" else pa.string()
        self.input_fs, _ = filesystem(self.config.data)
        self.output_fs, _ = filesystem(self.config.output)
        self.staging = staging  # a path inside output_fs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [self.encode_unit(WorkUnit.from_json(text)) for text in batch["unit"]]
        return {name: np.array([s[name] for s in summaries]) for name in summaries[0]}

    def encode_unit(self, unit: WorkUnit) -> dict:
        started = time.time()
        features = self.model_version.features
        url = url_of(self.input_fs, unit.path)
        embedded: list[pa.Table] = []
        quarantined: list[pa.Table] = []
        with storage_errors(url), _naming_the_file(url):
            for batch in self._read(unit):
                if self.config.on_bad_rows == "quarantine":
                    good, matrix, bad, reasons = split_bad_rows(batch, features, self._required)
                    if bad.num_rows:
                        quarantined.append(self._quarantine_rows(bad, reasons, url))
                else:
                    good, matrix = batch, features_to_numpy(batch, features, self._required)
                posterior_mean, anomaly_score = encode_matrix(self.model_version.model, self.model_version.normalizer, matrix, self.device)
                embedded.append(self._embedding_rows(good, posterior_mean, anomaly_score))
            # The quarantine file first: the embeddings file is the unit's "done" marker.
            if quarantined:
                self._write(f"{QUARANTINE_DIR}/{unit.output_name}", pa.concat_tables(quarantined))
            self._write(unit.output_name, pa.concat_tables(embedded) if embedded else self._embedding_rows(None, None, None))
        quarantined_rows = sum(t.num_rows for t in quarantined)
        return {"index": unit.index, "rows": unit.rows, "embedded": unit.rows - quarantined_rows, "quarantined": quarantined_rows,
                "started": started, "finished": time.time()}

    @property
    def _required(self) -> tuple[str, ...]:
        return (self.config.timestamp_column,) if self.config.timestamp_column else ()

    def _read(self, unit: WorkUnit):
        """The unit's row groups in batches, only the needed columns; hive partition values as columns."""
        wanted = [*self.model_version.features.columns, *self._required]
        url = url_of(self.input_fs, unit.path)
        with contextlib.ExitStack() as stack:
            try:
                if is_local(self.input_fs):
                    parquet = pq.ParquetFile(unit.path)
                else:  # pre_buffer coalesces the column chunks into few large requests
                    parquet = pq.ParquetFile(stack.enter_context(self.input_fs.open(unit.path, "rb")), pre_buffer=True)
                in_file = [c for c in wanted if c in parquet.schema_arrow.names]
                for batch in parquet.iter_batches(batch_size=self.config.batch_size, row_groups=list(unit.row_groups), columns=in_file):
                    for name in wanted:
                        if name not in in_file:  # a hive partition column
                            batch = batch.append_column(name, pa.array([unit.partition[name]] * batch.num_rows, pa.string()))
                    yield batch
            except (pa.ArrowInvalid, OSError) as error:
                # pyarrow reports undecodable pages as ArrowInvalid or a plain OSError; storage failures are told apart by text.
                if (problem := describe_storage_error(url, error)) is not None:
                    raise InputError(problem) from None
                if isinstance(error, FileNotFoundError):
                    raise InputError(f"{url}: the file disappeared while the job ran; re-run to plan again") from None
                raise InputError(f"corrupt Parquet data ({_first_line(error)}); remove or replace the file") from None

    def _embedding_rows(self, batch, posterior_mean: np.ndarray | None, anomaly_score: np.ndarray | None) -> pa.Table:
        key_column = self.model_version.features.key_column
        schema = embeddings_schema(key_column, self.key_type)
        if batch is None:
            return schema.empty_table()
        rows = batch.num_rows
        if self.config.timestamp_column:
            event_timestamp = _to_utc_timestamps(batch.column(self.config.timestamp_column), self.config.timestamp_column)
        else:
            event_timestamp = pa.array(np.full(rows, np.datetime64(self.event_time.replace(tzinfo=None), "us")), pa.timestamp("us", tz="UTC"))
        return pa.table({
            key_column: batch.column(key_column).cast(self.key_type),
            "latent": latent_column(posterior_mean),
            "anomaly_score": pa.array(anomaly_score.astype(np.float32, copy=False)),
            "is_anomaly": pa.array(anomaly_score > self.threshold) if self.threshold is not None else pa.nulls(rows, pa.bool_()),
            "model_version": pa.DictionaryArray.from_arrays(np.zeros(rows, np.int32), [self.model_version.version]).cast(pa.string()),
            "event_timestamp": event_timestamp,
        }, schema=schema)

    def _quarantine_rows(self, bad: pa.Table | pa.RecordBatch, reasons: list[str], url: str) -> pa.Table:
        table = pa.Table.from_batches([bad]) if isinstance(bad, pa.RecordBatch) else bad
        return table.append_column("quarantine_reason", pa.array(reasons, pa.string())).append_column(
            "source_file", pa.array([url] * table.num_rows, pa.string())
        )

    def _write(self, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=65_536)  # several row groups per file: readers can split the work
        write_bytes_atomically(self.output_fs, f"{self.staging}/{name}", sink.getvalue().to_pybytes())


@contextlib.contextmanager
def _naming_the_file(url: str):
    try:
        yield
    except InputError as error:
        if url in str(error):
            raise
        raise InputError(f"{url}: {error}") from None


def embeddings_schema(key_column: str, key_type: pa.DataType) -> pa.Schema:
    return pa.schema([
        (key_column, key_type), ("latent", pa.list_(pa.float32())), ("anomaly_score", pa.float32()), ("is_anomaly", pa.bool_()),
        ("model_version", pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")),
    ])


def _to_utc_timestamps(column: pa.Array | pa.ChunkedArray, name: str) -> pa.Array | pa.ChunkedArray:
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
        raise InputError(f"timestamp column '{name}' has values that are not timestamps ({_first_line(error)})") from None


def encoder_request(config: EmbedConfig, cluster_has_gpus: bool) -> dict[str, float]:
    """The Ray resources of one encoder actor, all from config: on a GPU when the cluster has
    GPUs and gpus_per_encoder is unset, else on CPU."""
    gpus = config.gpus_per_encoder if config.gpus_per_encoder is not None else (1.0 if cluster_has_gpus else 0.0)
    request = {"CPU": config.cpus_per_encoder, "GPU": gpus, **config.encoder_resources}
    return {name: amount for name, amount in request.items() if amount > 0}


def _encode_units(config: EmbedConfig, version: str, event_time: datetime, key_type: str, units: list[WorkUnit], staging: str,
                  threshold: float | None) -> list[dict]:
    """Encode the units on a pool of actors; returns one summary per unit."""
    nodes = alive_node_resources()
    request = encoder_request(config, cluster_has_gpus=any(node.get("GPU", 0) >= 1 for node in nodes))
    gpus = request.get("GPU", 0.0)
    capacity = node_capacity(request, nodes)
    if capacity < 1:
        raise InputError(f"no node of the cluster holds one encoder ({describe(request)}); lower cpus_per_encoder / "
                         "gpus_per_encoder or check encoder_resources")
    requested = min(config.num_encoders or capacity, len(units))
    # More actors than fit now: start what fits and let Ray Data scale up as nodes join.
    compute = ray.data.ActorPoolStrategy(min_size=min(requested, capacity), max_size=requested, max_tasks_in_flight_per_actor=1)
    log.info("encoding %d unit(s) of about %d rows with %d encoder actor(s) (%g CPU, %g GPU each)",
             len(units), config.rows_per_file, requested, config.cpus_per_encoder, gpus)
    items = [{"unit": unit.to_json()} for unit in units]
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        UnitEncoder,
        fn_constructor_kwargs={"config": config.model_dump(), "version": version, "event_time": event_time, "key_type": key_type,
                              "staging": staging, "threshold": threshold},
        batch_size=1, batch_format="numpy", compute=compute, num_cpus=config.cpus_per_encoder, num_gpus=gpus,
        resources=config.encoder_resources,
    )
    summaries: list[dict] = []
    last_log = time.monotonic()
    for summary in results.iter_rows():
        summaries.append(summary)
        if time.monotonic() - last_log > 10 or len(summaries) == len(units):
            rows = sum(s["rows"] for s in summaries)
            log.info("%d/%d units done, %s rows", len(summaries), len(units), f"{rows:,}")
            last_log = time.monotonic()
    return summaries


def _commit(config: EmbedConfig, fs, output_root: str, staging: str, model_version: ModelVersion, threshold: float | None,
            units: list[WorkUnit], listing: list[dict], summaries: list[dict], started: float) -> EmbedResult:
    """Reconcile the staged files with the plan, write the manifest, and move the run into place."""
    version = model_version.version
    with storage_errors(config.output):
        names = [u.output_name for u in units]
        quarantine_dir = f"{staging}/{QUARANTINE_DIR}"
        quarantined_names = sorted(
            p.rsplit("/", 1)[-1] for p in fs.ls(quarantine_dir, detail=False, refresh=True) if p.endswith(".parquet")
        ) if fs.isdir(quarantine_dir) else []
        footers = read_footers(fs, [f"{staging}/{n}" for n in names] + [f"{quarantine_dir}/{n}" for n in quarantined_names])
    files = {name: footer.num_rows for name, footer in zip(names, footers)}
    quarantine_files = {name: footer.num_rows for name, footer in zip(quarantined_names, footers[len(names):])}
    input_rows = sum(u.rows for u in units)
    embedded, quarantined = sum(files.values()), sum(quarantine_files.values())
    if embedded + quarantined != input_rows:
        raise RuntimeError(
            f"staged output does not reconcile: {input_rows} input rows, {embedded} embedded + {quarantined} quarantined; "
            f"nothing committed (staging kept at {url_of(fs, staging)})"
        )
    destination = f"{output_root}/{version}"
    now = time.time()
    first_start = min((s["started"] for s in summaries), default=now)
    last_finish = max((s["finished"] for s in summaries), default=now)
    result = EmbedResult(
        output=url_of(fs, destination), model_version=version, input_rows=input_rows, embedded_rows=embedded,
        quarantined_rows=quarantined, quarantine=url_of(fs, f"{destination}/{QUARANTINE_DIR}") if quarantined else None,
        files=len(files), resumed_files=len(units) - len(summaries), seconds=0.0,
        startup_seconds=max(0.0, first_start - started), encode_seconds=last_finish - first_start,
    )
    manifest = {
        "format": "vae-embeddings/1", "model_version": version, "model_path": model_version.path, "anomaly_threshold": threshold,
        "data": config.data, "input_files": listing,
        "input_rows": input_rows, "embedded_rows": embedded, "quarantined_rows": quarantined,
        "files": files, "quarantine_files": quarantine_files, "on_bad_rows": config.on_bad_rows,
        "run_id": staging.rsplit("/", 1)[-1], "committed_at": datetime.now().astimezone().isoformat(), "code_version": code_version(),
    }
    with storage_errors(config.output):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{staging}/_run.json")
        write_bytes_atomically(fs, f"{staging}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        _move_into_place(fs, staging, destination, [*files, *(f"{QUARANTINE_DIR}/{n}" for n in quarantine_files), MANIFEST])
    result.seconds = time.time() - started
    return result


def _move_into_place(fs, staging: str, destination: str, names: list[str]) -> None:
    """Publish a staged run as <output>/<version>, replacing an earlier run of that version.

    Local: one directory rename (the old run is renamed aside first, then deleted). S3 has no
    rename: files are copied server-side under their planned names (a re-run of the same input
    overwrites a file with identical rows, never adds one), files of an earlier run that are not
    in the new manifest are deleted, and the manifest is written last.
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
    fs.copy([f"{staging}/{name}" for name in names[:-1]], [f"{destination}/{name}" for name in names[:-1]])  # concurrent requests
    if fs.isdir(destination):
        keep = {f"{destination}/{name}" for name in names}
        stale = [p for p in fs.find(destination) if p not in keep]
        if stale:
            fs.rm(stale)
    fs.copy(f"{staging}/{names[-1]}", f"{destination}/{names[-1]}")
    fs.rm(staging, recursive=True)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def main(argv: list[str] | None = None) -> EmbedResult:
    return embed(parse_config(EmbedConfig, argv, prog="vaectl embed"))


if __name__ == "__main__":
    run_cli(main)
