"""The embed job on Ray Data: one row per input row as one batch of the version's Iceberg table,
exactly once, vectors equal to the library's encoder, a re-run replacing exactly its batch, bad rows
failed or quarantined, duplicate keys and non-finite outputs handled, and every bad input one clear
error."""

import os
import shutil
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.cli import flags, vaectl_command

from ray_jobs.cli import find_input_error, run_cli
from ray_jobs.config import EmbedConfig
from ray_jobs.embed import embed, main
from vae import encode_matrix, features_to_numpy, load_model_version
from vae.embeddings.catalog import EmbeddingsCatalog, Properties


def pixels_table(trained) -> pa.Table:
    return pq.read_table(trained["data"])


def pixel_matrix(table: pa.Table) -> np.ndarray:
    return table.column("pixels").combine_chunks().flatten().to_numpy().reshape(-1, 64).copy()


def with_pixels(table: pa.Table, values, list_type=None) -> pa.Table:
    """The table with its pixels column replaced by `values` (rows of lists, or a float matrix)."""
    if isinstance(values, np.ndarray):
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
    else:
        column = pa.array(values, list_type)
    return table.set_column(table.schema.get_field_index("pixels"), "pixels", column)


def catalog_of(directory) -> dict:
    """Embed options for a catalog of the test's own: a SQLite file and a local warehouse."""
    return {"catalog": f"sqlite:///{directory}/catalog.db", "warehouse": f"{directory}/warehouse"}


def open_catalog(options: dict) -> EmbeddingsCatalog:
    return EmbeddingsCatalog(options["catalog"], options["warehouse"])


def rows_of(options: dict, version: str, **read) -> pa.Table:
    catalog = open_catalog(options)
    return catalog.read(catalog.table("item", version), **read).sort_by("item_id")


def committed_rows(options: dict) -> int:
    """Rows readers can see in every table of the catalog (0 when nothing was committed)."""
    catalog = open_catalog(options)
    if not [e for e in catalog.entity_sets() if e.name == "item"]:
        return 0
    return sum(catalog.read(catalog.table("item", v)).num_rows for v in catalog.versions("item"))


def staged_files(options: dict) -> list[str]:
    """Files under the warehouse that no table references: left-overs of a failed run."""
    root = options["warehouse"]
    found = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".parquet")]
    catalog = open_catalog(options)
    referenced = set()
    if [e for e in catalog.entity_sets() if e.name == "item"]:
        for version in catalog.versions("item"):
            referenced |= set(catalog.data_files(catalog.table("item", version)))
    return sorted(set(found) - referenced - {f for f in found if "/quarantine/" in f})


def latents_by_key(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = table.sort_by("item_id")
    latent = table.column("latent").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    return table.column("item_id").to_numpy(), latent, table.column("anomaly_score").to_numpy()


@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory):
    work = tmp_path_factory.mktemp("embed")
    # work units are whole row groups
    pq.write_table(pixels_table(trained), work / "digits.parquet", row_group_size=200)
    catalog = catalog_of(work)
    config = EmbedConfig(
        data=str(work / "digits.parquet"),
        model_root=str(trained["model_root"]),
        batch_size=500,
        rows_per_file=400,
        **catalog,
    )
    return embed(config), trained, catalog, config


def test_one_row_per_input_row_keys_unchanged(embedded):
    result, trained, catalog, _ = embedded
    table = rows_of(catalog, trained["version"])
    assert table.num_rows == 1797 == result.input_rows == result.embedded_rows
    assert table.column("item_id").to_pylist() == list(range(1797))
    # 9 row groups of 200, 2 per file
    assert result.files == 5 and result.quarantined_rows == 0 and result.quarantine is None
    assert result.committed and staged_files(catalog) == []


def test_output_follows_the_embeddings_contract(embedded):
    result, trained, catalog, config = embedded
    table = rows_of(catalog, trained["version"])
    assert table.schema.field("latent").type in (pa.list_(pa.float32()), pa.large_list(pa.float32()))
    assert table.schema.field("anomaly_score").type == pa.float32()
    assert table.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert set(table.column("model_version").to_pylist()) == {trained["version"]}
    assert result.output == f"vae.item.v_{trained['version'].replace('-', '_')}"
    # one batch, named by the input listing; its event time is the batch's own (newest input file)
    assert set(table.column("batch_id").to_pylist()) == {result.batch_id} and result.batch_id.startswith("b-")
    written = datetime.fromtimestamp(os.path.getmtime(config.data), UTC).replace(microsecond=0)
    assert {t.replace(microsecond=0) for t in table.column("event_timestamp").to_pylist()} == {written}


def test_is_anomaly_uses_the_threshold_calibrated_on_the_validation_split(embedded, trained):
    from vae.data.keys import is_validation, key_hash
    from vae.versions.artifacts import load_reference

    result, _, catalog, _ = embedded
    loaded = load_model_version(trained["model_root"], trained["version"])
    calibration, reference = loaded.metadata["anomaly"], load_reference(loaded)
    assert calibration["quantile"] == 0.99 and set(calibration["thresholds"]) >= {
        "0.9",
        "0.95",
        "0.99",
        "0.999",
    }
    assert calibration["threshold"] == pytest.approx(
        float(np.quantile(reference["anomaly_score"].astype(np.float64), 0.99))
    )
    table = rows_of(catalog, trained["version"])
    scores = table.column("anomaly_score").to_numpy()
    flags_ = table.column("is_anomaly").to_numpy(zero_copy_only=False)
    assert (flags_ == (scores > calibration["threshold"])).all() and table.column(
        "is_anomaly"
    ).null_count == 0
    # on the validation rows it was calibrated on, about 1% are flagged
    validation = is_validation(key_hash(table.column("item_id")), trained["config"].validation_fraction)
    assert reference["anomaly_score"].shape == (validation.sum(),) and flags_[validation].mean() <= 0.02
    batch = open_catalog(catalog).batches(open_catalog(catalog).table("item", trained["version"]))[0]
    assert float(batch.properties[Properties.ANOMALY_THRESHOLD]) == calibration["threshold"]


def test_the_batch_commit_reconciles(embedded):
    result, trained, catalog, _ = embedded
    cat = open_catalog(catalog)
    [batch] = cat.batches(cat.table("item", trained["version"]))
    counts = {
        k: int(batch.properties[f"vae.{k}"]) for k in ("input-rows", "embedded-rows", "quarantined-rows")
    }
    assert counts == {"input-rows": 1797, "embedded-rows": 1797, "quarantined-rows": 0} and batch.rows == 1797
    assert (batch.batch_id, batch.snapshot_id) == (result.batch_id, result.snapshot_id)


def test_vectors_equal_the_library_encoder(embedded):
    result, trained, catalog, _ = embedded
    _keys, latent, score = latents_by_key(rows_of(catalog, trained["version"]))
    loaded = load_model_version(trained["model_root"], trained["version"])
    source = pq.read_table(trained["data"]).sort_by("item_id")
    posterior_mean, anomaly_score = encode_matrix(
        loaded.model, loaded.normalizer, features_to_numpy(source, loaded.features)
    )
    assert latent.shape == (1797, 8)
    np.testing.assert_allclose(latent, posterior_mean, atol=1e-5)
    np.testing.assert_allclose(score, anomaly_score, rtol=1e-5, atol=1e-4)


def test_a_rerun_changes_nothing_and_another_run_of_the_batch_replaces_exactly_it(embedded, tmp_path):
    result, trained, catalog, config = embedded
    mine = catalog_of(tmp_path)  # a copy of the catalog: the module's stays as it was
    shutil.copy(catalog["catalog"].removeprefix("sqlite:///"), mine["catalog"].removeprefix("sqlite:///"))
    mine["warehouse"] = catalog["warehouse"]
    keys, latent, score = latents_by_key(rows_of(mine, trained["version"]))
    # the very same run: nothing committed, the same snapshot
    same = embed(config.model_copy(update=mine))
    assert not same.committed and same.snapshot_id == result.snapshot_id
    # another batch beside it, then the first batch again with other settings (batch size): a new run
    # whose one commit replaces exactly that batch
    other = embed(config.model_copy(update={**mine, "batch": "other", "rows_per_file": 1000}))
    again = embed(config.model_copy(update={**mine, "batch_size": 250, "num_encoders": 1}))
    assert again.committed and again.batch_id == result.batch_id and again.snapshot_id != result.snapshot_id
    table = rows_of(mine, trained["version"])
    assert table.num_rows == 2 * 1797
    replaced = table.filter(pa.compute.equal(table.column("batch_id"), result.batch_id))
    keys_again, latent_again, score_again = latents_by_key(replaced)
    assert np.array_equal(keys, keys_again) and len(np.unique(keys_again)) == 1797
    np.testing.assert_allclose(latent, latent_again, atol=1e-6)
    np.testing.assert_allclose(score, score_again, rtol=1e-5, atol=1e-4)
    # time travel: the snapshot of the first commit still reads the first batch alone
    assert rows_of(mine, trained["version"], as_of=result.snapshot_id).num_rows == 1797
    assert other.snapshot_id in {
        b.snapshot_id
        for b in open_catalog(mine).batches(open_catalog(mine).table("item", trained["version"]))
    }


def test_many_files_and_hive_partitions_read_only_needed_columns(trained, tmp_path):
    table = pixels_table(trained).append_column("unused", pa.array(["x" * 100] * 1797))
    for label in range(10):
        part = table.filter(pa.compute.equal(table.column("label"), label)).drop_columns(["label"])
        directory = tmp_path / "data" / f"label={label}"
        directory.mkdir(parents=True)
        half = part.num_rows // 2
        pq.write_table(part.slice(0, half), directory / "a.parquet", row_group_size=50)
        pq.write_table(part.slice(half), directory / "b.parquet", row_group_size=50)
    (tmp_path / "data" / "_SUCCESS").write_text("")  # marker files are skipped, as Spark and pyarrow do
    catalog = catalog_of(tmp_path)
    result = embed(
        EmbedConfig(
            data=str(tmp_path / "data"), model_root=str(trained["model_root"]), rows_per_file=120, **catalog
        )
    )
    assert result.input_rows == 1797 and result.files == 20  # units never span input files
    keys, latent, _ = latents_by_key(rows_of(catalog, trained["version"]))
    assert np.array_equal(keys, np.arange(1797))
    loaded = load_model_version(trained["model_root"], trained["version"])
    expected, _ = encode_matrix(
        loaded.model,
        loaded.normalizer,
        features_to_numpy(pixels_table(trained).sort_by("item_id"), loaded.features),
    )
    np.testing.assert_allclose(latent, expected, atol=1e-5)


def test_timestamp_column_becomes_event_timestamp(trained, tmp_path):
    table = pixels_table(trained).slice(0, 100)
    times = pa.array(
        np.datetime64("2026-01-01T00:00:00", "us") + np.arange(100) * np.timedelta64(1, "h"),
        pa.timestamp("us"),
    )
    pq.write_table(table.append_column("seen_at", times), tmp_path / "t.parquet")
    catalog = catalog_of(tmp_path)
    embed(
        EmbedConfig(
            data=str(tmp_path / "t.parquet"),
            model_root=str(trained["model_root"]),
            timestamp_column="seen_at",
            **catalog,
        )
    )
    out = rows_of(catalog, trained["version"])
    assert out.column("event_timestamp").to_pylist()[5].isoformat() == "2026-01-01T05:00:00+00:00"


def test_quarantine_reconciles_and_names_each_reason(trained, tmp_path):
    table = pixels_table(trained)
    rows = [list(map(float, r)) for r in pixel_matrix(table)]
    rows[3][7] = float("nan")
    rows[10] = None
    rows[20] = rows[20][:10]
    rows[30][0] = float("inf")
    pq.write_table(with_pixels(table, rows, pa.list_(pa.float32())), tmp_path / "bad.parquet")
    catalog = catalog_of(tmp_path)
    config = {"data": str(tmp_path / "bad.parquet"), "model_root": str(trained["model_root"]), **catalog}
    # the default refuses: one message naming the file and the first bad row, nothing committed
    with pytest.raises(Exception) as raised:
        embed(EmbedConfig(**config))
    error = str(find_input_error(raised.value))
    assert "bad.parquet" in error and "row item_id=3 has NaN or infinite feature values" in error
    assert committed_rows(catalog) == 0 and staged_files(catalog) == []

    result = embed(EmbedConfig(**config, on_bad_rows="quarantine"))
    assert (result.input_rows, result.embedded_rows, result.quarantined_rows) == (1797, 1793, 4)
    stored = rows_of(catalog, trained["version"])
    assert set(range(1797)) - set(stored.column("item_id").to_pylist()) == {3, 10, 20, 30}
    assert np.isfinite(stored.column("anomaly_score").to_numpy()).all()  # what reaches the store is finite
    quarantine = pq.read_table(result.quarantine).sort_by("item_id").to_pylist()
    assert [row["item_id"] for row in quarantine] == [3, 10, 20, 30]
    reasons = [row["quarantine_reason"] for row in quarantine]
    assert "NaN or infinite" in reasons[0] and "no value in column 'pixels'" in reasons[1]
    assert "vector of length 10" in reasons[2] and "NaN or infinite" in reasons[3]
    assert quarantine[2]["pixels"] == rows[20] and quarantine[0]["source_file"].endswith("bad.parquet")


def test_duplicate_keys_fail_by_default_or_keep_the_latest(trained, tmp_path):
    table = pixels_table(trained).slice(0, 300)
    times = pa.array([datetime(2026, 1, 1, tzinfo=UTC)] * 300, pa.timestamp("us", tz="UTC"))
    first = table.append_column("seen_at", times)
    later = table.slice(0, 50).append_column(
        "seen_at", pa.array([datetime(2026, 1, 2, tzinfo=UTC)] * 50, pa.timestamp("us", tz="UTC"))
    )
    later = with_pixels(later, pixel_matrix(later)[::-1].copy())  # other vectors for keys 0..49
    (tmp_path / "data").mkdir()
    pq.write_table(first, tmp_path / "data" / "a.parquet")
    pq.write_table(later, tmp_path / "data" / "b.parquet")
    catalog = catalog_of(tmp_path)
    config = {
        "data": str(tmp_path / "data"),
        "model_root": str(trained["model_root"]),
        "timestamp_column": "seen_at",
        **catalog,
    }
    with pytest.raises(Exception) as raised:
        embed(EmbedConfig(**config))
    error = str(find_input_error(raised.value))
    assert "item_id" in error and "duplicate" in error and "--on-duplicate-keys keep-latest" in error, error
    assert committed_rows(catalog) == 0

    # Killed (SIGKILL) after settling the duplicates, before the commit: the re-run finishes the run.
    killed = subprocess.run(
        vaectl_command("embed", *flags(**config, on_duplicate_keys="keep-latest")),
        env={**os.environ, "VAE_KILL_AT": "embed.settled"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert committed_rows(catalog) == 0
    result = embed(EmbedConfig(**config, on_duplicate_keys="keep-latest"))
    assert (result.input_rows, result.embedded_rows, result.duplicate_rows) == (350, 300, 50)
    assert result.resumed_files == 2  # the killed run's encoded files, not re-encoded
    staged = Path(config["warehouse"]).rglob("*.parquet")
    table_files = set(
        open_catalog(catalog).data_files(open_catalog(catalog).table("item", trained["version"]))
    )
    assert {str(path) for path in staged if "/data/" in str(path)} == table_files  # no orphans left
    stored = rows_of(catalog, trained["version"])
    assert stored.column("item_id").to_pylist() == list(range(300))
    days = [t.day for t in stored.column("event_timestamp").to_pylist()]
    assert days[:50] == [2] * 50 and days[50:] == [1] * 250


# ---- every bad input: one line on stderr, exit code 2, nothing committed ----------------------


def run_embed(capsys, *args: str) -> str:
    """`vaectl embed ARGS` in this process: exit code 2 and one error line, which is returned."""
    return run_embed_output(capsys, *args)[0]


def run_embed_output(capsys, *args: str) -> tuple[str, str]:
    """(the one error line, everything the job printed) of a run that must fail with exit code 2."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, list(args))
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    return lines[0], captured.out + captured.err


def write(table: pa.Table, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "renamed column",
        "wrong vector length",
        "nan",
        "wrong dtype",
        "string vector",
        "empty dataset",
        "corrupt file among good ones",
        "corrupt page among good ones",
        "schema mismatch",
        "missing model version",
        "missing data",
    ],
)
def test_bad_input_is_one_clear_error(case, trained, tmp_path, capsys):
    table = pixels_table(trained)
    good = table.slice(0, 900), table.slice(900)
    data = tmp_path / "data"
    version = trained["version"]
    if case == "renamed column":
        write(table.rename_columns(["item_id", "image", "label"]), data / "part-0.parquet")
        expected = ["part-0.parquet", "missing column(s) 'pixels'", "image"]
    elif case == "wrong vector length":
        write(with_pixels(table, pixel_matrix(table)[:, :63]), data / "part-0.parquet")
        expected = ["'pixels' has vectors of length 63; the model expects length 64"]
    elif case == "nan":
        values = pixel_matrix(table)
        values[1234, 5] = np.nan
        write(with_pixels(table, values), data / "part-0.parquet")
        expected = ["part-0.parquet", "row item_id=1234 has NaN or infinite"]
    elif case == "wrong dtype":
        write(
            table.set_column(0, "item_id", table.column("item_id").cast(pa.float64())),
            data / "part-0.parquet",
        )
        expected = ["key column 'item_id' is double"]
    elif case == "string vector":
        write(with_pixels(table, [["a"] * 64] * 1797, pa.list_(pa.string())), data / "part-0.parquet")
        expected = ["'pixels' holds string; it must hold numbers"]
    elif case == "empty dataset":
        write(table.slice(0, 0), data / "part-0.parquet")
        expected = ["the dataset has no rows"]
    elif case == "corrupt file among good ones":
        write(good[0], data / "part-0.parquet")
        write(good[1], data / "part-2.parquet")
        (data / "part-1.parquet").write_bytes(b"PAR1 this is not parquet" * 100)
        expected = ["part-1.parquet", "not a readable Parquet file", "remove or replace it"]
    elif case == "corrupt page among good ones":  # the footer reads fine; a data page does not decode
        write(good[0], data / "part-0.parquet")
        write(good[1], data / "part-1.parquet")
        damaged = bytearray((data / "part-1.parquet").read_bytes())
        damaged[200:2000] = b"Z" * 1800
        (data / "part-1.parquet").write_bytes(bytes(damaged))
        expected = ["part-1.parquet", "corrupt Parquet data", "remove or replace the file"]
    elif case == "schema mismatch":
        write(table, data / "part-0.parquet")
        # another dataset's file
        write(pa.table({"item_id": np.arange(5), "f0": np.zeros(5)}), data / "part-1.parquet")
        expected = ["part-1.parquet", "missing column(s) 'pixels'"]
    elif case == "missing model version":
        write(table, data / "part-0.parquet")
        version = "20990101T000000Z-deadbeef"
        expected = ["model version '20990101T000000Z-deadbeef' not found", "latest:"]
    else:
        data = tmp_path / "nowhere"
        expected = ["nowhere: no such file or directory"]
    catalog = catalog_of(tmp_path)
    line = run_embed(
        capsys,
        *flags(data=str(data), model_root=str(trained["model_root"]), model_version=version, **catalog),
    )
    for fragment in expected:
        assert fragment in line, line
    assert committed_rows(catalog) == 0 and staged_files(catalog) == []
