"""A version table's history stays small, whatever it holds: every commit writes its batch's record
into the table's batch index and expires the snapshots past the retention, so a year of daily batches
keeps the metadata of a few days; the files a replaced batch leaves behind are deleted once no kept
snapshot references them; time travel reaches the kept snapshots; a table from before the index is
indexed by its next commit; a publish finds its delta by sequence, even when the snapshot it last
wrote has expired. (Real pyiceberg on a SQLite catalog; no Ray.)"""

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feast_embeddings.delta import online_delta
from vae.embeddings import contract
from vae.embeddings.catalog import EmbeddingsCatalog, Properties, rows_per_batch

VERSION = "20260101T000000Z-aaaaaaaa"


def version_table(tmp_path: Path, keep: int):
    """A version's table whose snapshots expire as soon as the newest `keep` allow."""
    catalog = EmbeddingsCatalog(f"sqlite:///{tmp_path}/catalog.db", str(tmp_path / "warehouse"))
    entity = catalog.register("item", "item_id", "int64")
    retention = {Properties.MAX_SNAPSHOT_AGE_MS: "1", Properties.MIN_SNAPSHOTS: str(keep)}
    table = catalog.create_table(entity, VERSION, contract.schema("item_id", pa.int64()), retention)
    return catalog, table


def commit(catalog, table, batch: str, run: str, keys: range) -> str:
    """One run's file of the batch, committed; returns the file's URL."""
    rows = len(keys)
    path = Path(table.location().removeprefix("file://")) / "data" / "runs" / batch / run / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    latents = np.full((rows, 2), float(len(run)), np.float32)
    data = {
        "item_id": pa.array(list(keys), pa.int64()),
        "latent": contract.latent_column(latents),
        "anomaly_score": pa.array(np.zeros(rows, np.float32)),
        "is_anomaly": pa.array([False] * rows),
        "model_version": pa.array([VERSION] * rows),
        "batch_id": pa.array([batch] * rows),
        "event_timestamp": pa.array([datetime(2026, 1, 2, tzinfo=UTC)] * rows, pa.timestamp("us", tz="UTC")),
        "top_columns": pa.array([[]] * rows, pa.list_(pa.string())),
        "top_shares": pa.array([[]] * rows, pa.list_(pa.float32())),
    }
    pq.write_table(pa.table(data, schema=contract.schema("item_id", pa.int64())), path)
    url = f"file://{path}"
    properties = {Properties.EMBEDDED_ROWS: str(rows), Properties.EVENT_TIME: "2026-01-02T00:00:00+00:00"}
    time.sleep(0.002)  # past the 1 ms retention
    catalog.commit_batch(table, batch, [url], properties, run, int(time.time() * 1000))
    table.refresh()
    return url


def referenced(table) -> set[str]:
    return {
        task.file.file_path
        for snapshot in table.snapshots()
        for task in table.scan(snapshot_id=snapshot.snapshot_id).plan_files()
    }


def test_a_year_of_batches_keeps_the_snapshots_of_a_few_and_every_batch(tmp_path):
    catalog, table = version_table(tmp_path, keep=5)
    for day in range(40):
        commit(catalog, table, f"day-{day:03d}", f"run-{day}", range(day * 10, day * 10 + 10 + day))
    assert len(table.snapshots()) == 5  # 40 commits, the newest 5 kept
    batches = catalog.batches(table)
    assert [b.batch_id for b in batches] == [f"day-{day:03d}" for day in range(40)]
    assert [b.run_id for b in batches] == [f"run-{day}" for day in range(40)]
    assert {b.batch_id: b.rows for b in batches} == rows_per_batch(table)
    assert catalog.read(table, ["item_id"]).num_rows == sum(10 + day for day in range(40))
    sequences = [b.sequence for b in batches]
    assert sequences == sorted(sequences) and len(set(sequences)) == 40


def test_a_replaced_batch_leaves_no_file_behind_once_no_kept_snapshot_references_it(tmp_path):
    catalog, table = version_table(tmp_path, keep=2)
    first = commit(catalog, table, "a", "run-1", range(10))
    second = commit(catalog, table, "a", "run-2", range(10))  # re-embedded: run-1's file is replaced
    assert Path(first.removeprefix("file://")).exists()  # a kept snapshot may still reference it
    unreferenced = [key for key in table.properties if key.startswith(Properties.UNREFERENCED)]
    assert unreferenced, "the replaced file is listed until it is deleted"
    for day in range(3):
        commit(catalog, table, f"b{day}", "run-b", range(100 + day, 101 + day))
    assert not Path(first.removeprefix("file://")).exists()
    assert Path(second.removeprefix("file://")).exists()
    assert not [key for key in table.properties if key.startswith(Properties.UNREFERENCED)]
    data = Path(table.location().removeprefix("file://")) / "data"
    on_disk = {f"file://{path}" for path in data.rglob("*.parquet")}
    assert on_disk == referenced(table)  # no orphan, nothing missing
    [a] = [b for b in catalog.batches(table) if b.batch_id == "a"]
    assert (
        a.run_id == "run-2" and catalog.read(table, ["latent"], batches=["a"]).column(0)[0].as_py()[0] == 5.0
    )


def test_time_travel_reaches_the_kept_snapshots_with_every_batch_they_held(tmp_path):
    catalog, table = version_table(tmp_path, keep=3)
    for day in range(10):
        commit(catalog, table, f"day-{day}", f"run-{day}", range(day * 10, day * 10 + 5))
    oldest = min(table.snapshots(), key=lambda s: s.sequence_number)
    then = catalog.batches(table, oldest.snapshot_id)
    assert [b.batch_id for b in then] == [f"day-{day}" for day in range(8)]
    assert [b.run_id for b in then] == [f"run-{day}" for day in range(8)] and {b.rows for b in then} == {5}


def test_a_table_from_before_the_index_is_indexed_by_its_next_commit(tmp_path):
    catalog, table = version_table(tmp_path, keep=100)
    for day in range(3):
        commit(catalog, table, f"day-{day}", f"run-{day}", range(day * 10, day * 10 + 4))
    indexed = catalog.batches(table)
    index_keys = [key for key in table.properties if key.startswith("vae.batch")]
    with table.transaction() as transaction:  # as a table written before the index looks
        transaction.remove_properties(*index_keys)
    table.refresh()
    assert catalog.batches(table) == indexed  # from the snapshots' own records
    commit(catalog, table, "day-3", "run-3", range(30, 34))
    assert table.properties[Properties.BATCH_INDEX] == "1"
    assert catalog.batches(table)[:3] == indexed and catalog.batches(table)[3].batch_id == "day-3"


def test_the_publish_delta_is_what_was_committed_after_the_mark_even_once_its_snapshot_expired(tmp_path):
    catalog, table = version_table(tmp_path, keep=2)
    for day in range(3):
        commit(catalog, table, f"day-{day}", "run", range(day * 10, day * 10 + 4))
    written = online_delta(catalog, table, "item_id", None)
    assert written.first and written.batches == ["day-0", "day-1", "day-2"]
    for day in range(3, 6):
        commit(catalog, table, f"day-{day}", "run", range(day * 10, day * 10 + 4))
    assert table.snapshot_by_id(written.snapshot_id) is None  # expired since
    delta = online_delta(catalog, table, "item_id", written.mark)
    assert not delta.first and delta.batches == ["day-3", "day-4", "day-5"]
    assert sorted(delta.rows.column("item_id").to_pylist()) == [
        k for d in (3, 4, 5) for k in range(d * 10, d * 10 + 4)
    ]
    # a mark from before sequences were recorded (a snapshot id alone) whose snapshot expired: all again
    assert online_delta(catalog, table, "item_id", str(written.snapshot_id)).first
