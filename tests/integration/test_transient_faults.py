"""Storage that hiccups: moto's S3 behind a proxy that fails requests on purpose (tests/helpers/
faulty_proxy.py). The embed job retries what is transient, never calls it bad input, and never deletes a
file a snapshot references: an endpoint that is gone while an already-committed run is run again used
to make embed discard the run's staging directory, which held the committed batch's files."""

import threading

import pyarrow.parquet as pq
import pytest
import s3fs
from helpers.cli import flags
from helpers.faulty_proxy import faulty_proxy

from ray_jobs.cli import run_cli
from ray_jobs.config import EmbedConfig
from ray_jobs.embed import embed, main
from vae.embeddings.catalog import EmbeddingsCatalog

BUCKET = "flaky"


@pytest.fixture
def proxied(s3_endpoint, monkeypatch):
    """The AWS environment pointed at the faulty proxy (this process only: the embed runs in it)."""
    with faulty_proxy(s3_endpoint) as (endpoint, proxy):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        # botocore's own retries off (s3fs still retries a few times): the faults reach the job's layer
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint, proxy
    s3fs.S3FileSystem.clear_instance_cache()


def test_faults_are_retried_and_never_cost_a_committed_batch(trained, proxied, tmp_path, monkeypatch, capsys):
    endpoint, proxy = proxied
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    pq.write_table(
        pq.read_table(trained["data"]), f"{BUCKET}/data/part-0.parquet", filesystem=fs, row_group_size=300
    )
    options = {
        "data": f"s3://{BUCKET}/data",
        "model_root": str(trained["model_root"]),
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "warehouse": f"s3://{BUCKET}/warehouse",
        "batch": "day-1",
        "rows_per_file": 300,
        "in_process_rows": 1_000_000,  # in this process: it is the one pointed at the proxy
    }

    # Some requests fail (503 SlowDown or a dropped connection): the run completes, every row once.
    proxy.flaky(0.15, seed=3)
    result = embed(EmbedConfig(**options))
    proxy.up()
    assert proxy.failed > 0 and (result.input_rows, result.embedded_rows) == (1797, 1797)
    catalog = EmbeddingsCatalog(options["catalog"], options["warehouse"])
    table = catalog.table("item", trained["version"])
    files = catalog.data_files(table)
    assert catalog.read(table, ["item_id"]).num_rows == 1797

    # The same run again while the endpoint is gone for 3 s: it waits, finds the batch committed, and
    # deletes nothing.
    proxy.down()
    threading.Timer(3.0, proxy.up).start()
    failed_before = proxy.failed
    again = embed(EmbedConfig(**options))
    assert proxy.failed > failed_before and not again.committed
    assert all(fs.exists(path) for path in files)
    assert catalog.read(catalog.table("item", trained["version"]), ["item_id"]).num_rows == 1797

    # Gone for longer than the retries: one line, exit 75 (try again), still nothing deleted.
    monkeypatch.setenv("VAE_STORAGE_RETRIES", "2")
    proxy.down()
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, flags(**options))
    proxy.up()
    assert exit_.value.code == 75
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"cannot reach the S3 endpoint ({endpoint})" in error[0]
    assert "nothing was discarded: run the same command again" in error[0]
    assert all(fs.exists(path) for path in files)
    assert catalog.read(catalog.table("item", trained["version"]), ["item_id"]).num_rows == 1797


def test_a_backfill_and_a_publish_under_faults_complete_or_stop_to_be_run_again(
    trained, proxied, tmp_path, feature_repo, capsys
):
    """The backfill's job (several batches, each its own commit) rides out failing requests; a publish
    that meets them (twice) either completes or stops with exit 75 and one line, and running it again (as the
    line says) completes: every key online at its row, nothing written twice or lost."""
    from feast_embeddings import EmbeddingsRepo, fetch_online
    from ray_jobs import publish
    from ray_jobs.embed import embed_batches

    endpoint, proxy = proxied
    fs = s3fs.S3FileSystem()
    fs.mkdir(f"{BUCKET}-2")
    rows = pq.read_table(trained["data"])
    for day, part in (("day-1", rows.slice(0, 900)), ("day-2", rows.slice(900))):
        pq.write_table(part, f"{BUCKET}-2/{day}/part-0.parquet", filesystem=fs, row_group_size=300)
    options = {
        "model_root": str(trained["model_root"]),
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "warehouse": f"s3://{BUCKET}-2/warehouse",
        "rows_per_file": 300,
        "in_process_rows": 1_000_000,
    }
    proxy.flaky(0.15, seed=5)
    days = ("day-1", "day-2")
    results = embed_batches(
        [EmbedConfig(**options, data=f"s3://{BUCKET}-2/{day}", batch=day) for day in days]
    )
    proxy.up()
    assert proxy.failed > 0 and [r.embedded_rows for r in results] == [900, 897]

    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(
        yaml_path.read_text()
        .replace("sqlite:///data/catalog.db", options["catalog"])
        .replace("warehouse: data/warehouse", f"warehouse: {options['warehouse']}")
    )
    argv = ["--feature-repo", str(feature_repo), "--model-root", options["model_root"], "--verify-rows", "50"]
    proxy.flaky(0.3, seed=11)
    codes = []
    for _ in range(2):
        try:
            run_cli(publish.main, argv)
            codes.append(0)
        except SystemExit as exit_:
            codes.append(exit_.code)
    proxy.up()
    assert set(codes) <= {0, 75}, codes
    stopped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(stopped) == codes.count(75) and all("run the same command again" in line for line in stopped)
    run_cli(publish.main, argv)  # with the endpoint back: completes
    repo = EmbeddingsRepo(feature_repo)
    state = repo.publication("item")
    assert state.current == trained["version"] and state.keys[trained["version"]] == 1797
    stored = repo.catalog.read(repo.catalog.table("item", trained["version"])).sort_by("item_id")
    online = fetch_online(
        repo.store, repo.version_view_name("item", trained["version"]), list(range(1797)), "item_id"
    )
    assert [row["latent"] for row in online] == stored.column("latent").to_pylist()
