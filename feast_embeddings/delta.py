"""What a publish writes online: the rows of the batches committed since the version was last written,
each key's latest row among them (by event time, then by commit). Only those batches are read: a quiet
day's publish costs its own batch, whatever the version holds.

Which of those rows are newer than what a key already holds online is the store's to say
(`feast_embeddings.online_state`): the publish asks it for the delta's keys only, and the writers keep
the newer row anyway, so batches published in any order leave each key at its latest vector. A
version's first publish (nothing written yet) reads every batch: O(version), once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vae.embeddings.catalog import EmbeddingsCatalog
from vae.embeddings.contract import COLUMNS
from vae.errors import InputError


@dataclass(frozen=True)
class Delta:
    snapshot_id: int  # the table snapshot the delta was read from
    sequence: int  # its sequence number: batches committed later are the next publish's delta
    batches: list[str]  # batches committed since the last write (all of them on a first publish)
    rows: pa.Table  # the rows of those batches, each key's latest among them
    first: bool  # nothing of the version was written before: the delta is the whole version

    @property
    def mark(self) -> str:
        """What the publication records as written (or indexed): '<snapshot id>@<sequence>'."""
        return f"{self.snapshot_id}@{self.sequence}"


def written_sequence(table, mark: str | None) -> int | None:
    """The sequence number a written/indexed mark stands for; None when nothing was written, or for a
    mark from before sequences were recorded (a snapshot id alone) whose snapshot has expired."""
    if mark is None:
        return None
    snapshot_id, _, sequence = mark.partition("@")
    if sequence:
        return int(sequence)
    snapshot = table.snapshot_by_id(int(snapshot_id))
    return snapshot.sequence_number if snapshot is not None else None


def online_delta(catalog: EmbeddingsCatalog, table, join_key: str, mark: str | None) -> Delta:
    """The delta of a version's table against the mark last written online (None: write it all): the
    batches committed after it, found in the table's batch index (no history read)."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        raise InputError(
            f"{'.'.join(table.name())} has no batches yet; run the embed job first (vaectl embed)"
        )
    since = written_sequence(table, mark)
    first = since is None
    new = [b.batch_id for b in catalog.batches(table) if first or b.sequence > since]
    if not new:
        return Delta(snapshot.snapshot_id, snapshot.sequence_number, [], _empty(table, join_key), first)
    rows = catalog.read(table, [join_key, *COLUMNS], batches=new, as_of=snapshot.snapshot_id)
    return Delta(
        snapshot.snapshot_id, snapshot.sequence_number, new, latest_per_key(rows, join_key, new), first
    )


def latest_per_key(rows: pa.Table, join_key: str, commit_order: list[str]) -> pa.Table:
    """One row per key: the latest event time, a tie going to the batch committed last."""
    if rows.num_rows == 0:
        return rows
    # each row's batch as its position in the commit order, without a Python loop over the rows
    order = pc.index_in(rows.column("batch_id"), value_set=pa.array(commit_order, pa.string()))
    ranked = rows.select([join_key, "event_timestamp"]).append_column(
        "_commit", pc.fill_null(order, -1).cast(pa.int64())
    )
    ranked = ranked.append_column("_row", pa.array(np.arange(rows.num_rows), pa.int64()))
    ranked = ranked.take(
        pc.sort_indices(
            ranked,
            [(join_key, "ascending"), ("event_timestamp", "descending"), ("_commit", "descending")],
        )
    )
    key_values = ranked.column(join_key).combine_chunks()
    first = np.ones(ranked.num_rows, bool)
    first[1:] = pc.not_equal(key_values[1:], key_values[:-1]).to_numpy(zero_copy_only=False)
    winners = np.sort(ranked.column("_row").to_numpy()[first])
    return rows.take(pa.array(winners))


def _empty(table, join_key: str) -> pa.Table:
    return table.schema().as_arrow().empty_table().select([join_key, *COLUMNS])
