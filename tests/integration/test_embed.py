"""The embed job on Ray Data: one row per input row, exactly once, vectors equal to the library's
encoder, bit-identical on re-runs, bad rows failed or quarantined, and every bad input one clear error."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.cli import flags

from ray_jobs.cli import find_input_error, run_cli
from ray_jobs.config import EmbedConfig
from ray_jobs.embed import embed, main
from vae import encode_matrix, features_to_numpy, load_model_version


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


def committed(output) -> list[str]:
    """What readers can see under an embeddings root (hidden staging excluded)."""
    return sorted(p for p in os.listdir(output) if not p.startswith(".")) if os.path.isdir(output) else []


def staged_runs(output) -> list[str]:
    staging = os.path.join(output, ".staging")
    return sorted(os.listdir(staging)) if os.path.isdir(staging) else []


def latents_by_key(directory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = pq.read_table(directory).sort_by("item_id")
    latent = table.column("latent").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    return table.column("item_id").to_numpy(), latent, table.column("anomaly_score").to_numpy()


@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory):
    work = tmp_path_factory.mktemp("embed")
    # work units are whole row groups
    pq.write_table(pixels_table(trained), work / "digits.parquet", row_group_size=200)
    config = EmbedConfig(
        data=str(work / "digits.parquet"),
        model_root=str(trained["model_root"]),
        output=str(work / "embeddings"),
        batch_size=500,
        rows_per_file=400,
    )
    return embed(config), trained


def test_one_row_per_input_row_keys_unchanged(embedded):
    result, _ = embedded
    table = pq.read_table(result.output)
    assert table.num_rows == 1797 == result.input_rows == result.embedded_rows
    assert sorted(table.column("item_id").to_pylist()) == list(range(1797))
    # 9 row groups of 200, 2 per file
    assert result.files == 5 and result.quarantined_rows == 0 and result.quarantine is None


def test_output_follows_the_embeddings_contract(embedded):
    result, trained = embedded
    schema = pq.read_schema(os.path.join(result.output, "part-000000.parquet"))
    assert schema.field("latent").type == pa.list_(pa.float32())
    assert schema.field("anomaly_score").type == pa.float32()
    assert schema.field("model_version").type == pa.string()
    assert schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    table = pq.read_table(result.output)
    assert set(table.column("model_version").to_pylist()) == {trained["version"]}
    assert os.path.basename(result.output) == trained["version"]
    # the default event time is the version's creation time, so re-runs write identical rows
    created = load_model_version(trained["model_root"], trained["version"]).metadata["created_at"]
    assert {t.isoformat() for t in table.column("event_timestamp").to_pylist()} == {created}


def test_is_anomaly_uses_the_threshold_calibrated_on_the_validation_split(embedded, trained):
    from vae.artifacts import load_reference
    from vae.keys import is_validation, key_hash

    result, _ = embedded
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
    table = pq.read_table(result.output)
    scores, flags = (
        table.column("anomaly_score").to_numpy(),
        table.column("is_anomaly").to_numpy(zero_copy_only=False),
    )
    assert (flags == (scores > calibration["threshold"])).all() and table.column("is_anomaly").null_count == 0
    # on the validation rows it was calibrated on, about 1% are flagged
    validation = is_validation(key_hash(table.column("item_id")), trained["config"].validation_fraction)
    assert reference["anomaly_score"].shape == (validation.sum(),) and flags[validation].mean() <= 0.02
    assert (
        json.loads(Path(result.output, "_manifest.json").read_text())["anomaly_threshold"]
        == calibration["threshold"]
    )


def test_manifest_reconciles_and_nothing_is_left_in_staging(embedded):
    result, trained = embedded
    manifest = json.loads(Path(result.output, "_manifest.json").read_text())
    assert manifest["input_rows"] == 1797 == manifest["embedded_rows"] + manifest["quarantined_rows"]
    assert sum(manifest["files"].values()) == 1797 and sorted(manifest["files"]) == sorted(
        p for p in os.listdir(result.output) if p.endswith(".parquet")
    )
    assert manifest["model_version"] == trained["version"]
    assert staged_runs(os.path.dirname(result.output)) == []


def test_vectors_equal_the_library_encoder(embedded):
    result, trained = embedded
    _keys, latent, score = latents_by_key(result.output)
    loaded = load_model_version(trained["model_root"], trained["version"])
    source = pq.read_table(trained["data"]).sort_by("item_id")
    posterior_mean, anomaly_score = encode_matrix(
        loaded.model, loaded.normalizer, features_to_numpy(source, loaded.features)
    )
    assert latent.shape == (1797, 8)
    np.testing.assert_allclose(latent, posterior_mean, atol=1e-5)
    np.testing.assert_allclose(score, anomaly_score, rtol=1e-5, atol=1e-4)


def test_rerun_is_bit_identical_without_duplicates(embedded, tmp_path):
    result, trained = embedded
    keys, latent, score = latents_by_key(result.output)
    # the same job again, into a copy of the same root, with another actor count: replaces the version in
    # place
    output = str(tmp_path / "embeddings")
    shutil.copytree(os.path.dirname(result.output), output)
    data = os.path.join(os.path.dirname(os.path.dirname(result.output)), "digits.parquet")
    again = embed(
        EmbedConfig(
            data=data,
            model_root=str(trained["model_root"]),
            output=output,
            batch_size=500,
            rows_per_file=400,
            num_encoders=1,
        )
    )
    assert again.output == os.path.join(output, trained["version"]) and committed(output) == [
        trained["version"]
    ]
    keys_again, latent_again, score_again = latents_by_key(again.output)
    assert np.array_equal(keys, keys_again) and len(np.unique(keys_again)) == 1797
    assert latent.tobytes() == latent_again.tobytes() and score.tobytes() == score_again.tobytes()
    assert [p for p in os.listdir(os.path.join(output, ".staging"))] == []


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
    result = embed(
        EmbedConfig(
            data=str(tmp_path / "data"),
            model_root=str(trained["model_root"]),
            output=str(tmp_path / "out"),
            rows_per_file=120,
        )
    )
    assert result.input_rows == 1797 and result.files == 20  # units never span input files
    keys, latent, _ = latents_by_key(result.output)
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
    result = embed(
        EmbedConfig(
            data=str(tmp_path / "t.parquet"),
            model_root=str(trained["model_root"]),
            output=str(tmp_path / "out"),
            timestamp_column="seen_at",
        )
    )
    out = pq.read_table(result.output).sort_by("item_id")
    assert out.column("event_timestamp").to_pylist()[5].isoformat() == "2026-01-01T05:00:00+00:00"


def test_quarantine_reconciles_and_names_each_reason(trained, tmp_path):
    table = pixels_table(trained)
    rows = [list(map(float, r)) for r in pixel_matrix(table)]
    rows[3][7] = float("nan")
    rows[10] = None
    rows[20] = rows[20][:10]
    rows[30][0] = float("inf")
    pq.write_table(with_pixels(table, rows, pa.list_(pa.float32())), tmp_path / "bad.parquet")
    config = {
        "data": str(tmp_path / "bad.parquet"),
        "model_root": str(trained["model_root"]),
        "output": str(tmp_path / "out"),
    }
    # the default refuses: one message naming the file and the first bad row, nothing committed
    with pytest.raises(Exception) as raised:
        embed(EmbedConfig(**config))
    error = str(find_input_error(raised.value))
    assert "bad.parquet" in error and "row item_id=3 has NaN or infinite feature values" in error
    assert committed(tmp_path / "out") == [] and staged_runs(tmp_path / "out") == []

    result = embed(EmbedConfig(**config, on_bad_rows="quarantine"))
    assert (result.input_rows, result.embedded_rows, result.quarantined_rows) == (1797, 1793, 4)
    keys, _, _ = latents_by_key(result.output)
    assert set(range(1797)) - set(keys.tolist()) == {3, 10, 20, 30}
    quarantine = pq.read_table(result.quarantine).sort_by("item_id").to_pylist()
    assert [row["item_id"] for row in quarantine] == [3, 10, 20, 30]
    reasons = [row["quarantine_reason"] for row in quarantine]
    assert "NaN or infinite" in reasons[0] and "no value in column 'pixels'" in reasons[1]
    assert "vector of length 10" in reasons[2] and "NaN or infinite" in reasons[3]
    assert quarantine[2]["pixels"] == rows[20] and quarantine[0]["source_file"].endswith("bad.parquet")
    manifest = json.loads(Path(result.output, "_manifest.json").read_text())
    assert manifest["embedded_rows"] + manifest["quarantined_rows"] == manifest["input_rows"] == 1797


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
    line = run_embed(
        capsys,
        *flags(
            data=str(data),
            model_root=str(trained["model_root"]),
            model_version=version,
            output=str(tmp_path / "out"),
        ),
    )
    for fragment in expected:
        assert fragment in line, line
    assert committed(tmp_path / "out") == [] and staged_runs(tmp_path / "out") == []
