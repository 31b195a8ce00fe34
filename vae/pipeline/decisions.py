"""The daily pipeline's decision log: one append-only Iceberg table per entity set, next to the
version tables (vae.<entity>.decisions), one row per decision.

A step appends its decisions in one Iceberg commit at a time, and never appends a decision it
already recorded (same batch, kind and version): a re-run of a step adds nothing. The log is also
the pipeline's state: which batches were monitored and what they showed, when "current" switched,
which challengers were refused or rolled back.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from vae.embeddings.catalog import NAMESPACE, EmbeddingsCatalog
from vae.embeddings.names import check_entity_name
from vae.errors import DATA_REFUSED_EXIT
from vae.killpoints import killpoint
from vae.secrets import redact

log = logging.getLogger("vae.pipeline.decisions")

TABLE = "decisions"
# What a step can decide, most notable last: the step's exit code is that of its most notable one.
KINDS = (
    "embedded",
    "monitored",
    "published",
    "canary_withdrawn",  # by the encoding service, not a step: a canary version taken out of traffic
    "data_warning",
    "drift_seen",
    "data_blocked",
    "retrain_started",
    "challenger_trained",
    "backfilled",
    "switched",
    "challenger_refused",
    "rolled_back",
    "data_refused",
)
EXIT_CODES = {
    "drift_seen": 3,
    "switched": 4,
    "challenger_refused": 5,
    "rolled_back": 6,
    "data_blocked": 7,
    "data_refused": DATA_REFUSED_EXIT,
}

SCHEMA = pa.schema(
    [
        pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),  # JSON: the figures behind the decision
        pa.field("step", pa.string()),  # the step run that decided it
    ]
)


@dataclass(frozen=True)
class Decision:
    batch_id: str
    kind: str
    model_version: str | None
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    decided_at: datetime | None = None
    step: str = ""

    @property
    def identity(self) -> tuple[str, str, str | None]:
        return self.batch_id, self.kind, self.model_version

    def line(self) -> str:
        """The decision as one log line."""
        when = self.decided_at.isoformat(timespec="seconds") if self.decided_at else "-"
        version = self.model_version or "-"
        return f"{when} {self.batch_id} {self.kind} {version}" + (f": {self.reason}" if self.reason else "")


class DecisionLog:
    """An entity set's decisions, oldest first."""

    def __init__(self, catalog: EmbeddingsCatalog, entity: str):
        self.catalog = catalog.catalog
        self.identifier = (NAMESPACE, check_entity_name(entity), TABLE)
        self._table = None
        self._read: tuple[int, list[Decision]] | None = None  # (snapshot id, its decisions)

    def table(self, create: bool = False):
        """The log's table (None before the first decision); created, in the entity set's namespace
        (made by the first embed), on the first append."""
        from pyiceberg.exceptions import TableAlreadyExistsError

        if self._table is None and self.catalog.table_exists(self.identifier):
            self._table = self.catalog.load_table(self.identifier)
        if self._table is None and create:
            for namespace in (self.identifier[:1], self.identifier[:2]):
                self.catalog.create_namespace_if_not_exists(namespace)
            with contextlib.suppress(TableAlreadyExistsError):
                self.catalog.create_table(self.identifier, schema=SCHEMA)
            self._table = self.catalog.load_table(self.identifier)
        return self._table

    def read(self) -> list[Decision]:
        table = self.table()
        if table is None:
            return []
        table.refresh()
        snapshot = table.current_snapshot()
        if snapshot is None:
            return []
        if self._read is not None and self._read[0] == snapshot.snapshot_id:
            return list(self._read[1])
        rows = table.scan().to_arrow().sort_by("decided_at").to_pylist()
        decisions = [
            Decision(
                row["batch_id"],
                row["kind"],
                row["model_version"],
                row["reason"] or "",
                json.loads(row["detail"] or "{}"),
                row["decided_at"],
                row["step"] or "",
            )
            for row in rows
        ]
        self._read = (snapshot.snapshot_id, decisions)
        return list(decisions)

    def append(self, decisions: list[Decision], step: str) -> list[Decision]:
        """Append the decisions not recorded yet, in one commit; returns those appended."""
        from pyiceberg.exceptions import CommitFailedException

        for _attempt in range(10):
            known = self.read()
            base = self._read[0] if self._read and known else None
            seen = {d.identity for d in known}
            new, now = [], datetime.now(UTC)
            for decision in decisions:
                if decision.identity not in seen:
                    seen.add(decision.identity)
                    # a microsecond apart, so that the log reads back in the order decided
                    moment = now + timedelta(microseconds=len(new))
                    new.append(Decision(**{**decision.__dict__, "decided_at": moment, "step": step}))
            if not new:
                return []
            rows = pa.Table.from_pylist(
                [
                    {
                        **d.__dict__,
                        "reason": redact(d.reason),
                        "detail": redact(json.dumps(d.detail, default=_plain)),
                    }
                    for d in new
                ],
                SCHEMA,
            )
            table = self.table(create=True)
            try:
                table.append(rows)
            except CommitFailedException:
                continue  # another writer committed first: read again and retry
            killpoint("decisions.appended")
            if int(table.current_snapshot().summary.additional_properties.get("total-data-files", 0)) > 50:
                self._compact(table)
            # what this commit made the log, without scanning it again (when it was made on top of
            # what this process read)
            snapshot = table.current_snapshot()
            on_top = snapshot.parent_snapshot_id == base
            self._read = (snapshot.snapshot_id, [*known, *new]) if on_top else None
            for decision in new:
                log.info("decision: %s", decision.line())
            return new
        raise RuntimeError(f"{'.'.join(self.identifier)}: the catalog refused 10 commits in a row")

    def _compact(self, table) -> None:
        """Rewrite the log as one file and drop its earlier snapshots: reading it costs one file and its
        metadata stays small, however many years it holds (its rows are the history, its snapshots are
        not). Done every 50 appends; another writer committing meanwhile leaves it to the next time."""
        from pyiceberg.exceptions import CommitFailedException

        try:
            table.overwrite(table.scan().to_arrow().sort_by("decided_at"))
            killpoint("decisions.compacted")
            keep = table.current_snapshot().snapshot_id
            earlier = [s.snapshot_id for s in table.snapshots() if s.snapshot_id != keep]
            table.maintenance.expire_snapshots().by_ids(earlier).commit()
        except CommitFailedException:
            return
        self._read = None


def of_batch(decisions: list[Decision], batch_id: str) -> list[Decision]:
    return [d for d in decisions if d.batch_id == batch_id]


def exit_code(decisions: list[Decision]) -> int:
    """0, or the code of the most notable decision with one, in KINDS' order (3 drift seen, 7 data
    blocked, 4 switched, 5 challenger refused, 6 rolled back, 8 data refused)."""
    coded = [d.kind for d in decisions if d.kind in EXIT_CODES]
    return EXIT_CODES[max(coded, key=KINDS.index)] if coded else 0


def _plain(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
