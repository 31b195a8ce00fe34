"""Embeddings as Apache Iceberg tables in a SQL catalog (pyiceberg): one table per (entity set, model
version), one batch per embed run.

    catalog     a SQLite file (the embedded default) or PostgreSQL
    warehouse   where tables keep their files: a local directory or s3://
    namespace   vae.<entity>: properties join_key and key_type (the entity set), plus whatever other
                packages record there (feast_embeddings keeps its publication record in them)
    table       vae.<entity>.v_<version>, partitioned by batch_id: a batch is whole files
    a batch     one Iceberg commit: rows of batch_id = B deleted and the run's files added, in one
                transaction; its snapshot carries the Properties below (batch, run, event time, counts),
                and the same transaction writes the batch's record into the table's batch index (a
                table property per live batch), so finding a table's batches never walks its history

Readers see a batch whole or not at all. Snapshots older than the table's retention (Iceberg's own
history.expire.* properties; a week by default) are expired by the commits, so a year of daily
batches keeps a table's metadata as small as a week's: time travel reaches back that far. The data
files only expired snapshots referenced (a re-embedded batch's old files) are deleted by a later
commit, and listed in the table's properties until then. A commit that loses the optimistic-
concurrency race (another batch landed first) is retried on the new metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pyarrow as pa

from vae.embeddings.lock import lease_lock
from vae.embeddings.names import check_entity_name, identifier
from vae.errors import InputError, first_line
from vae.secrets import holds_credentials, redact
from vae.storage import filesystem, is_local, storage_errors, url_of

NAMESPACE = "vae"
FILE_IO = "pyiceberg.io.fsspec.FsspecFileIO"  # s3fs: the AWS environment, AWS_ENDPOINT_URL included
KeyType = Literal["int64", "string"]


class Properties:
    """Every key the tables and their snapshots carry: a contract with every reader (history, publish,
    the pipeline's backfill, Feast's lineage) and with the tables written before, so spelled only here."""

    # on a version's table
    MODEL_VERSION = "vae.model-version"  # the model version whose embeddings the table holds
    MODEL_PATH = "vae.model-path"  # its folder (local or s3://): where readers find its model.json
    MIGRATED_FROM = "vae.migrated-from"  # a table made from a Parquet directory (vaectl embeddings migrate)
    # on the snapshot that committed a batch
    BATCH = "vae.batch-id"
    RUN = "vae.run-id"  # the embed run that landed it (a hash of batch, input, version and settings)
    EVENT_TIME = "vae.event-time"  # the batch's event_timestamp (ISO), unless a timestamp column gave them
    DATA = "vae.data"  # the input it was embedded from: what a backfill embeds again
    ANOMALY_THRESHOLD = "vae.anomaly-threshold"
    ON_BAD_ROWS = "vae.on-bad-rows"
    INPUT_ROWS = "vae.input-rows"
    EMBEDDED_ROWS = "vae.embedded-rows"
    QUARANTINED_ROWS = "vae.quarantined-rows"
    DUPLICATE_ROWS = "vae.duplicate-rows-dropped"
    QUARANTINE = "vae.quarantine"  # where the quarantined rows are
    INPUT_LISTING = "vae.input-listing-sha256"
    INPUT_FILES = "vae.input-files"
    CODE_VERSION = "vae.code-version"
    PROFILE = "vae.input-profile"  # the batch's input profile (a JSON file in the run's folder)
    DATA_CHECKS = "vae.data-checks"  # JSON: the data checks the batch failed (severity, column, detail)
    DATA_SEVERITY = "vae.data-severity"  # the worst failed check's severity; "" when all passed
    # on a version's table: its batch index and garbage (see the module's docstring)
    BATCH_RECORD = "vae.batch."  # + batch id: the live batch's record (JSON: its commit and properties)
    BATCH_INDEX = "vae.batch-index"  # "1" once the table keeps the index (tables from before walk history)
    UNREFERENCED = "vae.unreferenced."  # + sequence n: files unreferenced once the snapshots before n expire
    # Iceberg's own retention properties (other engines' expire_snapshots honour the same)
    MAX_SNAPSHOT_AGE_MS = "history.expire.max-snapshot-age-ms"
    MIN_SNAPSHOTS = "history.expire.min-snapshots-to-keep"


DEFAULT_MAX_SNAPSHOT_AGE_MS = 7 * 24 * 3600 * 1000
DEFAULT_MIN_SNAPSHOTS = 10


logging.getLogger("pyiceberg").setLevel(logging.WARNING)


@dataclass(frozen=True)
class EntitySet:
    """An embedding set: what its vectors describe and how a consumer looks them up."""

    name: str
    join_key: str
    key_type: KeyType


@dataclass(frozen=True)
class Batch:
    """One committed batch of a version's table."""

    batch_id: str
    rows: int
    snapshot_id: int
    sequence: int  # the commit's place in the table's history: a later commit has a larger one
    committed_at: str
    run_id: str
    event_time: str | None
    properties: dict[str, str]


def table_name(version: str) -> str:
    """A model version's table: v_20261123T203831Z_450da0be."""
    return "v_" + identifier(version)


class EmbeddingsCatalog:
    """The SQL catalog of a feature repo's embeddings, with its warehouse."""

    def __init__(self, uri: str, warehouse: str):
        from pyiceberg.catalog.sql import SqlCatalog

        if holds_credentials(uri):  # readers are handed the URI (connection_properties): it is stored
            raise InputError(
                f"catalog {redact(uri)}: the URI holds a password or token, which would be stored where "
                "readers find the catalog; give it to PostgreSQL in PGPASSWORD instead"
            )
        _ensure_working_directory()
        fs, root = filesystem(warehouse)
        self.warehouse = f"file://{root}" if is_local(fs) else url_of(fs, root)
        self.uri = uri
        if is_local(fs):
            os.makedirs(root, exist_ok=True)
        if uri.startswith("sqlite:///"):  # SQLite makes the file, not its directory
            os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
        try:
            self.catalog = SqlCatalog(NAMESPACE, uri=uri, warehouse=self.warehouse, **{"py-io-impl": FILE_IO})
        except Exception as error:  # SQLAlchemy: a bad URI, a server that refuses, a missing driver
            raise InputError(
                f"catalog {redact(uri)}: {type(error).__name__}: {first_line(redact(str(error)))}"
            ) from None

    @property
    def connection_properties(self) -> dict[str, str]:
        """What another reader needs to open this catalog (an Iceberg source): no credentials in it."""
        return {"uri": self.uri, "warehouse": self.warehouse, "py-io-impl": FILE_IO}

    # -- entity sets -------------------------------------------------------------------------------

    def entity_sets(self) -> list[EntitySet]:
        """The entity sets with embeddings (a namespace only the decision log made, before the first
        embed, is not one yet: a step killed in its first training leaves one)."""
        namespaces = self.catalog.list_namespaces((NAMESPACE,)) if self._has_root() else []
        found = []
        for namespace in sorted(namespaces):
            properties = self.catalog.load_namespace_properties(namespace)
            if "join_key" in properties:
                found.append(EntitySet(namespace[-1], properties["join_key"], properties["key_type"]))
        return found

    def entity_set(self, name: str) -> EntitySet:
        from pyiceberg.exceptions import NoSuchNamespaceError

        check_entity_name(name)
        try:
            properties = self.catalog.load_namespace_properties((NAMESPACE, name))
        except NoSuchNamespaceError:
            have = ", ".join(e.name for e in self.entity_sets()) or "none"
            raise InputError(
                f"no embeddings for entity '{name}' in catalog {redact(self.uri)} (have: {have})"
            ) from None
        if "join_key" not in properties:  # a decision log before the first embed
            raise InputError(f"entity '{name}' has no embeddings yet; run the embed job first (vaectl embed)")
        return EntitySet(name, properties["join_key"], properties["key_type"])

    def register(self, name: str, join_key: str, key_type: KeyType) -> EntitySet:
        """The entity set, created on first use; a later embed must use the same key."""
        from pyiceberg.exceptions import NamespaceAlreadyExistsError

        check_entity_name(name)
        with contextlib.suppress(NamespaceAlreadyExistsError):
            self.catalog.create_namespace((NAMESPACE,))
        key = {"join_key": join_key, "key_type": key_type}
        with contextlib.suppress(NamespaceAlreadyExistsError):
            self.catalog.create_namespace((NAMESPACE, name), key)
        if "join_key" not in self.catalog.load_namespace_properties((NAMESPACE, name)):
            self.catalog.update_namespace_properties((NAMESPACE, name), updates=key)  # made by the log
        existing = self.entity_set(name)
        if (existing.join_key, existing.key_type) != (join_key, key_type):
            raise InputError(
                f"entity '{name}' is keyed by {existing.join_key} ({existing.key_type}), but this data by "
                f"{join_key} ({key_type}); use another entity name (--entity) or the same key"
            )
        return existing

    def _has_root(self) -> bool:
        return (NAMESPACE,) in self.catalog.list_namespaces()

    # -- tables --------------------------------------------------------------------------------------

    def versions(self, entity: str) -> list[str]:
        self.entity_set(entity)
        tables = self.catalog.list_tables((NAMESPACE, entity))
        loaded = [self.catalog.load_table(table_id) for table_id in tables]
        return sorted(
            t.properties[Properties.MODEL_VERSION] for t in loaded if Properties.MODEL_VERSION in t.properties
        )

    def table(self, entity: str, version: str):
        """The version's table. A name that only maps to the same table (a_b for a-b) is not the version."""
        from pyiceberg.exceptions import NoSuchTableError

        check_entity_name(entity)
        try:
            table = self.catalog.load_table((NAMESPACE, entity, table_name(version)))
        except NoSuchTableError:
            have = ", ".join(self.versions(entity)[-5:]) or "none"
            raise InputError(
                f"entity '{entity}' has no embeddings by model version '{version}' (have: {have})"
            ) from None
        recorded = table.properties.get(Properties.MODEL_VERSION, version)
        if recorded != version:
            raise InputError(
                f"entity '{entity}' has no embeddings by model version '{version}'; did you mean "
                f"'{recorded}'?"
            )
        return table

    def resolve(self, entity: str, version: str) -> str:
        """A version name, with 'latest' (the newest embedded) resolved. ('current', the published one,
        is the feature store's: feast_embeddings.publication.resolve_version.)"""
        if version == "latest":
            versions = self.versions(entity)
            if not versions:
                raise InputError(
                    f"entity '{entity}' has no embeddings yet; run the embed job first (vaectl embed)"
                )
            return versions[-1]
        return version

    def create_table(self, entity: EntitySet, version: str, schema: pa.Schema, properties: dict[str, str]):
        """The version's table, created (partitioned by batch_id) if it does not exist yet; an existing
        one takes a changed retention setting."""
        from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError

        table_id = (NAMESPACE, entity.name, table_name(version))
        if self.catalog.table_exists(table_id):  # create_table writes a metadata file before it checks
            table = self.table(entity.name, version)  # refuses a name that maps to another's table
            changed = {
                key: value
                for key, value in properties.items()
                if key == Properties.MAX_SNAPSHOT_AGE_MS and table.properties.get(key) != value
            }
            if changed:  # losing a race to a commit leaves it to the next run
                with storage_errors(self.warehouse), contextlib.suppress(CommitFailedException):
                    with table.transaction() as transaction:
                        transaction.set_properties(changed)
                table = self.catalog.load_table(table_id)
            missing = [name for name in schema.names if name not in table.schema().column_names]
            if missing:  # a table from before a column joined the contract (attribution): add it
                with storage_errors(self.warehouse), table.update_schema() as update:
                    update.union_by_name(schema)
                table = self.catalog.load_table(table_id)
            return table
        with storage_errors(self.warehouse), contextlib.suppress(TableAlreadyExistsError):
            table = self.catalog.create_table(
                table_id, schema=schema, properties={Properties.MODEL_VERSION: version, **properties}
            )
            with table.update_spec() as spec:
                spec.add_identity("batch_id")
        return self.catalog.load_table(table_id)

    # -- batches ---------------------------------------------------------------------------------------

    def batches(self, table, as_of: str | int | None = None) -> list[Batch]:
        """The batches a snapshot of the table holds (default: the current one), oldest commit first.

        The current snapshot's come from the table's batch index (no history read); an earlier
        snapshot's from its data files and the commits still in the table's history."""
        snapshot = snapshot_of(table, as_of)
        if snapshot is None:
            return []
        if snapshot.snapshot_id == table.current_snapshot().snapshot_id:
            if table.properties.get(Properties.BATCH_INDEX):
                return indexed_batches(table.properties)
            return _walked_batches(table, snapshot)  # a table from before the index: until its next commit
        rows = rows_per_batch(table, snapshot.snapshot_id)
        walked = {b.batch_id: b for b in _walked_batches(table, snapshot)}
        indexed = {b.batch_id: b for b in indexed_batches(table.properties)}
        found = []
        for batch_id, count in rows.items():
            batch = walked.get(batch_id) or indexed.get(batch_id)
            if batch is None or batch.sequence > snapshot.sequence_number:  # its commit has expired
                batch = Batch(batch_id, count, 0, 0, _iso(snapshot.timestamp_ms), "", None, {})
            found.append(dataclasses.replace(batch, rows=count))
        return sorted(found, key=lambda b: b.sequence)

    def read(
        self,
        table,
        columns: list[str] | None = None,
        batches: list[str] | None = None,
        as_of: str | int | None = None,
    ) -> pa.Table:
        """Rows of the table (at a snapshot), optionally of some batches only."""
        from pyiceberg.expressions import AlwaysTrue, In

        snapshot = snapshot_of(table, as_of)
        if snapshot is None:
            return table.schema().as_arrow().empty_table()
        row_filter = In("batch_id", batches) if batches else AlwaysTrue()
        fields = tuple(columns) if columns else ("*",)
        return table.scan(
            row_filter=row_filter, selected_fields=fields, snapshot_id=snapshot.snapshot_id
        ).to_arrow()

    def data_files(
        self, table, batches: list[str] | None = None, as_of: str | int | None = None
    ) -> list[str]:
        """The data files of a snapshot (of some batches): a batch is whole files, so no deletes apply."""
        from pyiceberg.expressions import AlwaysTrue, In

        snapshot = snapshot_of(table, as_of)
        if snapshot is None:
            return []
        row_filter = In("batch_id", batches) if batches else AlwaysTrue()
        tasks = table.scan(row_filter=row_filter, snapshot_id=snapshot.snapshot_id).plan_files()
        return [task.file.file_path.removeprefix("file://") for task in tasks]

    def commit_batch(
        self,
        table,
        batch_id: str,
        files: list[str],
        properties: dict[str, str],
        run_id: str,
        started_ms: int,
        attempts: int = 10,
        append: bool = False,
    ) -> tuple[Batch, bool]:
        """Replace batch B's rows with these files in one transaction; returns the batch as it landed,
        and False where this run had already landed it (nothing committed now).

        Another batch landing first makes the commit retry on the new metadata. Another run of the same
        batch landing after this run started is a conflict: it is named, nothing is replaced.
        append=True: add the files to the batch's (the online service's micro-commits: any writer of the
        batch may land after another, and none drops another's files)."""
        from pyiceberg.exceptions import CommitFailedException

        snapshot_properties = {Properties.BATCH: batch_id, Properties.RUN: run_id, **properties}
        _ensure_working_directory()
        for attempt in range(attempts):
            table.refresh()
            live = self.batches(table)
            landed = next((b for b in live if b.batch_id == batch_id), None)
            stale = landed is not None and landed.run_id != run_id and _committed_ms(landed) > started_ms
            if stale and not append:
                raise InputError(
                    f"batch '{batch_id}' of {table.name()[-1]} was committed by another run "
                    f"({landed.run_id}) at {landed.committed_at}, after this run started; nothing was "
                    "replaced (run again to replace it)"
                )
            replaced = self._files_of(table, batch_id) if landed is not None else set()
            if append:  # only the files not in the batch yet, nothing deleted
                files, replaced = sorted(set(files) - replaced), set()
                if not files:
                    return landed, False
            if landed is not None and landed.run_id == run_id and set(files) <= replaced:
                return landed, False  # this very run already landed (a concurrent twin, or a re-run)
            collected = _delete_collected(table)  # garbage of earlier expiries, before its record goes
            try:
                with table.transaction() as transaction:
                    _replace_batch(transaction, batch_id, files, replaced, snapshot_properties)
                    _record_batch(transaction, table, live, batch_id, snapshot_properties)
                    _expire_snapshots(transaction, collected)
                return next(b for b in self.batches(table) if b.batch_id == batch_id), True
            except CommitFailedException:
                time.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"batch '{batch_id}': the catalog refused {attempts} commits in a row; try again")

    def _files_of(self, table, batch_id: str) -> set[str]:
        """The batch's data files now: a scan planned on its partition (the manifests of other batches
        are skipped by their partition summaries, not read)."""
        from pyiceberg.expressions import EqualTo

        if table.current_snapshot() is None:
            return set()
        return {
            task.file.file_path for task in table.scan(row_filter=EqualTo("batch_id", batch_id)).plan_files()
        }

    # -- what other packages record about an entity set ------------------------------------------------

    def entity_properties(self, entity: str) -> dict[str, str]:
        """The entity set namespace's properties (empty for an entity set not embedded yet)."""
        from pyiceberg.exceptions import NoSuchNamespaceError

        check_entity_name(entity)
        try:
            return dict(self.catalog.load_namespace_properties((NAMESPACE, entity)))
        except NoSuchNamespaceError:
            return {}

    def update_entity_properties(self, entity: str, updates: dict[str, str | None]) -> None:
        """Set namespace properties; None removes one. One catalog transaction."""
        check_entity_name(entity)
        removals = {key for key, value in updates.items() if value is None}
        values = {key: value for key, value in updates.items() if value is not None}
        self.catalog.update_namespace_properties((NAMESPACE, entity), removals=removals, updates=values)

    def lock(self, name: str, ttl_seconds: float = 300, wait_seconds: float = 600, renew: bool = False):
        """A lease lock in the catalog's database (vae.embeddings.lock): one holder at a time across
        machines; renew: extended while held, for work longer than one lease."""
        return lease_lock(self.catalog.engine, name, ttl_seconds, wait_seconds, renew)


def _ensure_working_directory() -> None:
    """pyiceberg looks for its config file in the working directory on every operation; a Ray job's
    working directory can be removed under it by Ray's package cache (seen on a two-node cluster)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        os.chdir(os.path.expanduser("~"))


def model_version_info(table, model_root: str):
    """The model version that made a table's embeddings (metadata only, no weights): at the path the
    table records, else under model_root."""
    from vae.versions.artifacts import read_model_version_info

    version = table.properties[Properties.MODEL_VERSION]
    parent, _, name = table.properties.get(Properties.MODEL_PATH, "").rstrip("/").rpartition("/")
    if parent and name == version:
        with contextlib.suppress(InputError):  # moved since: look under model_root
            return read_model_version_info(parent, name)
    return read_model_version_info(model_root, version)


def snapshot_of(table, as_of: str | int | None):
    """The snapshot a read sees: the current one, a snapshot id, or the one current at an ISO time."""
    if as_of is None:
        return table.current_snapshot()
    text_value = str(as_of)
    if text_value.isdigit():
        snapshot = table.snapshot_by_id(int(text_value))
        if snapshot is None:
            raise InputError(
                f"{'.'.join(table.name())} has no snapshot {as_of}; see vaectl embeddings history"
            )
        return snapshot
    try:
        moment = datetime.fromisoformat(text_value.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--as-of {as_of}: a snapshot id or an ISO time (2026-11-23T00:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    snapshot = table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000))
    if snapshot is None:
        raise InputError(f"{'.'.join(table.name())} did not exist yet at {moment.isoformat()}")
    return snapshot


def rows_per_batch(table, snapshot_id: int | None = None) -> dict[str, int]:
    """Rows per batch in a snapshot, from its data files' records (no data read)."""
    files = table.inspect.files(snapshot_id=snapshot_id)
    rows: dict[str, int] = {}
    partitions = files.column("partition").to_pylist() if files.num_rows else []
    for partition, count in zip(partitions, files.column("record_count").to_pylist(), strict=True):
        rows[partition["batch_id"]] = rows.get(partition["batch_id"], 0) + count
    return rows


def indexed_batches(properties: dict[str, str]) -> list[Batch]:
    """The live batches a table's batch index records, oldest commit first."""
    found = []
    for key, value in properties.items():
        if key.startswith(Properties.BATCH_RECORD):
            record = json.loads(value)
            found.append(
                Batch(
                    key.removeprefix(Properties.BATCH_RECORD),
                    record["rows"],
                    record["snapshot"],
                    record["sequence"],
                    _iso(record["committed_ms"]),
                    record["properties"].get(Properties.RUN, ""),
                    record["properties"].get(Properties.EVENT_TIME),
                    record["properties"],
                )
            )
    return sorted(found, key=lambda b: b.sequence)


def _record(batch: Batch) -> dict[str, str]:
    """A batch's entry in the table's batch index (what indexed_batches reads back)."""
    record = {
        "rows": batch.rows,
        "snapshot": batch.snapshot_id,
        "sequence": batch.sequence,
        "committed_ms": _committed_ms(batch),
        "properties": batch.properties,
    }
    return {Properties.BATCH_RECORD + batch.batch_id: json.dumps(record, sort_keys=True)}


def _iso(milliseconds: int) -> str:
    return datetime.fromtimestamp(milliseconds / 1000, UTC).isoformat()


def _walked_batches(table, snapshot) -> list[Batch]:
    """The batches of a snapshot from the commits in its history (tables from before the batch index,
    and time travel): the last commit of each batch, oldest first."""
    by_id = {s.snapshot_id: s for s in table.snapshots()}
    chain = []
    while snapshot is not None:
        chain.append(snapshot)
        snapshot = by_id.get(snapshot.parent_snapshot_id)
    commits: dict = {}  # batch -> the snapshot that last committed it
    for snap in reversed(chain):  # oldest first: a later commit of a batch replaces the earlier one
        batch = snap.summary.additional_properties.get(Properties.BATCH)
        if batch is not None and snap.summary.operation.value == "append":
            commits.pop(batch, None)
            commits[batch] = snap
    counts = [snap.summary.additional_properties.get(Properties.EMBEDDED_ROWS) for snap in commits.values()]
    if None in counts:  # a batch committed without its count (a migrated table): count the files
        rows = rows_per_batch(table, chain[0].snapshot_id)
    else:
        rows = {batch: int(count) for batch, count in zip(commits, counts, strict=True)}
    return [
        Batch(
            batch,
            rows[batch],
            snap.snapshot_id,
            snap.sequence_number,
            _iso(snap.timestamp_ms),
            snap.summary.additional_properties.get(Properties.RUN, ""),
            snap.summary.additional_properties.get(Properties.EVENT_TIME),
            {k: v for k, v in snap.summary.additional_properties.items() if k.startswith("vae.")},
        )
        for batch, snap in commits.items()
        if batch in rows
    ]


def _replace_batch(transaction, batch_id: str, files: list[str], replaced: set[str], properties) -> None:
    """Stage the batch's rows replaced by the files; the replaced files join the garbage that the
    expiry of every snapshot before this commit frees."""
    from pyiceberg.expressions import EqualTo

    if replaced:
        transaction.delete(EqualTo("batch_id", batch_id), snapshot_properties=properties)
    # the run's files are new (named by the run), and a re-run that landed them returned above: the
    # check would read every manifest of the table, a cost that grows with its history
    transaction.add_files(files, snapshot_properties=properties, check_duplicate_files=False)
    if replaced - set(files):
        sequence = transaction.table_metadata.current_snapshot().sequence_number
        key = f"{Properties.UNREFERENCED}{sequence}"
        transaction.set_properties({key: json.dumps(sorted(replaced - set(files)))})


def _record_batch(transaction, table, live: list[Batch], batch_id: str, properties: dict[str, str]) -> None:
    """Stage the batch's record in the table's batch index (and, on a table from before the index,
    the records of every live batch: once)."""
    committed = transaction.table_metadata.current_snapshot()
    records = {}
    if not table.properties.get(Properties.BATCH_INDEX):
        records = {key: value for b in live for key, value in _record(b).items()}
        records[Properties.BATCH_INDEX] = "1"
    batch = Batch(
        batch_id,
        int(committed.summary.additional_properties.get("added-records", 0)),  # the files' own count
        committed.snapshot_id,
        committed.sequence_number,
        _iso(committed.timestamp_ms),
        properties.get(Properties.RUN, ""),
        properties.get(Properties.EVENT_TIME),
        properties,
    )
    transaction.set_properties(records | _record(batch))


def _expire_snapshots(transaction, collected: list[str]) -> None:
    """Stage the expiry of the snapshots past the table's retention (the newest few always stay), and
    drop the garbage records whose files were deleted before this commit."""
    from pyiceberg.table.update.snapshot import ExpireSnapshots

    metadata = transaction.table_metadata
    max_age = int(metadata.properties.get(Properties.MAX_SNAPSHOT_AGE_MS, DEFAULT_MAX_SNAPSHOT_AGE_MS))
    keep = max(1, int(metadata.properties.get(Properties.MIN_SNAPSHOTS, DEFAULT_MIN_SNAPSHOTS)))
    newest_first = sorted(metadata.snapshots, key=lambda s: s.sequence_number, reverse=True)
    cutoff = time.time() * 1000 - max_age
    expired = [s.snapshot_id for s in newest_first[keep:] if s.timestamp_ms < cutoff]
    if expired:
        ExpireSnapshots(transaction).by_ids(expired).commit()
    if collected:
        transaction.remove_properties(*collected)


def _delete_collected(table) -> list[str]:
    """Delete the files of the garbage records that no snapshot references any more (every snapshot
    before the record's sequence has expired); returns those records' keys, dropped by the commit."""
    oldest = min((s.sequence_number for s in table.snapshots()), default=0)
    collected = []
    for key, value in table.properties.items():
        freed_after = key.removeprefix(Properties.UNREFERENCED)
        if key.startswith(Properties.UNREFERENCED) and int(freed_after) <= oldest:
            for path in json.loads(value):
                fs, name = filesystem(path)
                with storage_errors(path), contextlib.suppress(FileNotFoundError):
                    fs.rm(name)
            collected.append(key)
    return collected


def _committed_ms(batch: Batch) -> int:
    return round(datetime.fromisoformat(batch.committed_at).timestamp() * 1000)
