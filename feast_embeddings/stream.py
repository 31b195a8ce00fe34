"""Write-through for rows embedded online: each request batch to Feast's online store at once (the bytes
publish writes, one write per batch), and to the version's Iceberg table in micro-commits, as the
`stream-<date>` batch, so offline reads, point-in-time retrieval and the next publish see them.

A micro-commit is one Parquet file in the table's location and one Iceberg commit that adds it to the
day's stream batch (EmbeddingsCatalog.commit_batch, append=True): replicas commit the same batch
without dropping each other's files. Rows not yet committed when a replica dies are online only; the
daily batch re-embeds those keys (latest wins).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.writers import write_batch
from vae.embeddings.catalog import Properties
from vae.storage import filesystem, write_bytes_atomically

log = logging.getLogger(__name__)


class StreamWriter:
    """One model version's write-through, in one replica."""

    def __init__(
        self, repo: EmbeddingsRepo, entity: str, version: str, commit_seconds: float, commit_rows: int
    ):
        self.repo, self.entity, self.version = repo, entity, version
        self.commit_seconds, self.commit_rows = commit_seconds, commit_rows
        self.join_key = repo.catalog.entity_set(entity).join_key
        self.store = repo.store
        self.view = self.store.get_feature_view(repo.version_view_name(entity, version))
        self.writer = f"stream-{uuid.uuid4().hex[:12]}"  # this replica's run id in the table's history
        self.pending: list[pa.Table] = []
        self.pending_since: float | None = None
        self.lock = threading.Lock()
        self.commits = 0

    def write(self, rows: pa.Table) -> None:
        """Online now (one write), offline at the next micro-commit that is due."""
        if rows.num_rows == 0:
            return
        write_batch(self.store, self.view, rows, self.join_key)
        with self.lock:
            self.pending.append(rows)
            self.pending_since = self.pending_since or time.monotonic()
        if self.due():
            self.flush()

    def due(self) -> bool:
        with self.lock:
            if not self.pending:
                return False
            rows = sum(t.num_rows for t in self.pending)
            return rows >= self.commit_rows or time.monotonic() - self.pending_since >= self.commit_seconds

    def flush(self) -> int:
        """Commit the rows written online since the last commit; returns how many."""
        with self.lock:
            pending, self.pending, self.pending_since = self.pending, [], None
        if not pending:
            return 0
        rows = pa.concat_tables(pending)
        for batch_id in rows.column("batch_id").unique().to_pylist():  # a day's rows to its own batch
            self._commit(rows.filter(pa.compute.equal(rows.column("batch_id"), batch_id)), batch_id)
        return rows.num_rows

    def _commit(self, rows: pa.Table, batch_id: str) -> None:
        catalog = self.repo.catalog
        table = catalog.table(self.entity, self.version)
        root = table.location().removeprefix("file://").rstrip("/")
        started = int(time.time() * 1000)
        url = f"{root}/data/batch_id={batch_id}/{self.writer}/part-{started}-{uuid.uuid4().hex[:8]}.parquet"
        schema = table.schema().as_arrow()
        sink = pa.BufferOutputStream()
        pq.write_table(rows.select(schema.names).cast(schema), sink)
        fs, path = filesystem(url)
        write_bytes_atomically(fs, path, sink.getvalue().to_pybytes())
        file = url if "://" in url else f"file://{url}"
        properties = {Properties.EMBEDDED_ROWS: str(rows.num_rows), Properties.DATA: "online"}
        catalog.commit_batch(table, batch_id, [file], properties, self.writer, started, append=True)
        self.commits += 1
        log.info("stream: %d rows of %s committed to batch %s", rows.num_rows, self.version, batch_id)
