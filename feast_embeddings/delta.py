"""What a publish writes online: the rows of the batches committed since the version was last
written, each key's latest row only (by event time, then by commit), so the online store ends up
holding every key of the version at its latest vector, whichever order the batches were published in.
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
    snapshot_id: int  # the table snapshot the delta was read from: recorded as written afterwards
    batches: list[str]  # batches committed since the last write (all of them on a first publish)
    rows: pa.Table  # the rows to write: of those batches, each key's latest row in the version
    version_keys: int  # distinct keys in the whole version: what the online view must hold


def online_delta(catalog: EmbeddingsCatalog, table, join_key: str, written_snapshot: int | None) -> Delta:
    """The delta of a version's table against the snapshot last written online (None: write it all)."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        raise InputError(
            f"{'.'.join(table.name())} has no batches yet; run the embed job first (vaectl embed)"
        )
    live = catalog.batches(table, snapshot.snapshot_id)
    already: set[tuple[str, int]] = set()
    if written_snapshot is not None and table.snapshot_by_id(written_snapshot) is not None:
        already = {(b.batch_id, b.snapshot_id) for b in catalog.batches(table, written_snapshot)}
    new = [b.batch_id for b in live if (b.batch_id, b.snapshot_id) not in already]
    keys = catalog.read(table, [join_key, "event_timestamp", "batch_id"], as_of=snapshot.snapshot_id)
    winners = latest_per_key(keys, join_key, [b.batch_id for b in live])
    if not new:
        return Delta(snapshot.snapshot_id, [], _empty(table, join_key), winners.num_rows)
    rows = catalog.read(table, [join_key, *COLUMNS], batches=new, as_of=snapshot.snapshot_id)
    return Delta(snapshot.snapshot_id, new, _winning_rows(rows, winners, join_key), winners.num_rows)


def latest_per_key(keys: pa.Table, join_key: str, commit_order: list[str]) -> pa.Table:
    """One row per key: the latest event time, a tie going to the batch committed last."""
    if keys.num_rows == 0:
        return keys
    # each row's batch as its position in the commit order, without a Python loop over the rows
    order = pc.index_in(keys.column("batch_id"), value_set=pa.array(commit_order, pa.string()))
    ranked = keys.append_column("_commit", pc.fill_null(order, -1).cast(pa.int64()))
    ranked = ranked.take(
        pc.sort_indices(
            ranked,
            [(join_key, "ascending"), ("event_timestamp", "descending"), ("_commit", "descending")],
        )
    )
    key_values = ranked.column(join_key).combine_chunks()
    first = np.ones(ranked.num_rows, bool)
    first[1:] = pc.not_equal(key_values[1:], key_values[:-1]).to_numpy(zero_copy_only=False)
    return ranked.filter(pa.array(first)).drop_columns(["_commit"])


def _winning_rows(rows: pa.Table, winners: pa.Table, join_key: str) -> pa.Table:
    match = [join_key, "batch_id", "event_timestamp"]
    numbered = rows.select(match).append_column("_row", pa.array(np.arange(rows.num_rows), pa.int64()))
    joined = numbered.join(winners.select(match), keys=match, join_type="inner")
    positions = np.sort(joined.column("_row").to_numpy())
    return rows.take(pa.array(positions))


def _empty(table, join_key: str) -> pa.Table:
    return table.schema().as_arrow().empty_table().select([join_key, *COLUMNS])
