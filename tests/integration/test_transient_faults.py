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
