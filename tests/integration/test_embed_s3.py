"""The embed job against a real S3 API (moto's server on 127.0.0.1) through s3fs: input, model
versions and output on S3, and the storage errors a user meets first."""

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from helpers.cli import flags
from helpers.servers import free_port, moto_server
from test_embed import run_embed, run_embed_output

from ray_jobs.cli import run_cli
from ray_jobs.config import EmbedConfig
from ray_jobs.embed import embed, main
from vae import list_model_versions, load_model_version, save_model_version
from vae.embeddings.catalog import EmbeddingsCatalog, table_name


@pytest.fixture
def bucket(s3_endpoint):
    fs = s3fs.S3FileSystem()
    name = f"vae-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return fs, name


def latents_by_key(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    table = table.sort_by("item_id")
    return table.column("item_id").to_numpy(), table.column(
        "latent"
    ).combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)


def test_input_model_and_output_on_s3(trained, bucket, tmp_path):
    fs, name = bucket
    table = pq.read_table(trained["data"])
    for label in range(10):  # hive-style partitions, several files
        part = table.filter(pa.compute.equal(table.column("label"), label)).drop_columns(["label"])
        pq.write_table(part, f"{name}/data/label={label}/part-0.parquet", filesystem=fs, row_group_size=64)
    local = load_model_version(trained["model_root"], trained["version"])
    version = save_model_version(
        f"s3://{name}/models", local.model, local.normalizer, local.features, {}, {}, {"source": "test"}
    )
    assert list_model_versions(f"s3://{name}/models") == [version]
    assert (
        load_model_version(f"s3://{name}/models").metadata["weights_sha256"]
        == local.metadata["weights_sha256"]
    )

    catalog = EmbeddingsCatalog(f"sqlite:///{tmp_path}/catalog.db", f"s3://{name}/warehouse")
    config = EmbedConfig(
        data=f"s3://{name}/data",
        model_root=f"s3://{name}/models",
        rows_per_file=100,
        batch="day-1",
        catalog=catalog.uri,
        warehouse=f"s3://{name}/warehouse",
    )
    result = embed(config)
    assert (
        result.output == f"vae.item.{table_name(version)}"
        and result.input_rows == result.embedded_rows == 1797
    )
    stored = catalog.table("item", version)
    assert stored.location().startswith(f"s3://{name}/warehouse/")
    keys, latent = latents_by_key(catalog.read(stored))
    assert np.array_equal(keys, np.arange(1797))
    # every data file on S3 is the table's: no partial or orphaned objects
    data_objects = {
        f"s3://{p}" for p in fs.find(f"{name}/warehouse") if p.endswith(".parquet") and "/data/" in p
    }
    assert data_objects == set(catalog.data_files(stored)) and len(data_objects) == result.files

    # the same data and version, read locally, give bit-identical latents
    pq.write_table(table, tmp_path / "digits.parquet")
    local = {"catalog": f"sqlite:///{tmp_path}/local.db", "warehouse": str(tmp_path / "warehouse")}
    embed(EmbedConfig(data=str(tmp_path / "digits.parquet"), model_root=f"s3://{name}/models", **local))
    local_catalog = EmbeddingsCatalog(local["catalog"], local["warehouse"])
    _, local_latent = latents_by_key(local_catalog.read(local_catalog.table("item", version)))
    assert local_latent.tobytes() == latent.tobytes()

    # a re-run on S3 changes nothing: no commit, no new objects
    objects = sorted(fs.find(f"{name}/warehouse"))
    again = embed(config)
    assert not again.committed and again.snapshot_id == result.snapshot_id
    after = sorted(fs.find(f"{name}/warehouse"))
    assert after == objects, (set(after) ^ set(objects), objects)


def s3_catalog(tmp_path) -> dict:
    return {"catalog": f"sqlite:///{tmp_path}/catalog.db", "warehouse": "s3://bucket/warehouse"}


@pytest.fixture
def fresh_s3_clients():
    """s3fs caches clients per process; a test that changes the AWS environment needs new ones."""
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_missing_bucket(trained, bucket, capsys, tmp_path, fresh_s3_clients):
    fs, name = bucket
    line = run_embed(
        capsys,
        *flags(
            data="s3://no-such-bucket-4d1f/data",
            model_root=str(trained["model_root"]),
            catalog=f"sqlite:///{tmp_path}/catalog.db",
            warehouse=f"s3://{name}/out",
        ),
    )
    assert "bucket 'no-such-bucket-4d1f' does not exist" in line
    pq.write_table(pq.read_table(trained["data"]), f"{name}/data/part-0.parquet", filesystem=fs)
    line = run_embed(
        capsys,
        *flags(
            data=f"s3://{name}/data",
            model_root=str(trained["model_root"]),
            catalog=f"sqlite:///{tmp_path}/catalog.db",
            warehouse="s3://no-such-bucket-4d1f/out",
        ),
    )
    assert "bucket 'no-such-bucket-4d1f' does not exist" in line
    assert not fs.exists(f"{name}/out")


def test_unreachable_endpoint(trained, capsys, monkeypatch, fresh_s3_clients, tmp_path):
    """Not bad input (the endpoint may be down for a while): retried, then one line and exit 75."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("VAE_STORAGE_RETRIES", "2")
    with pytest.raises(SystemExit) as exit_:
        run_cli(
            main,
            flags(data="s3://bucket/data", model_root=str(trained["model_root"]), **s3_catalog(tmp_path)),
        )
    assert exit_.value.code == 75
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert f"cannot reach the S3 endpoint ({endpoint})" in line and "AWS_ENDPOINT_URL" in line
    assert "after 2 attempts" in line and "Traceback" not in captured.err


def test_bad_credentials_are_named_and_never_printed(
    trained, capsys, caplog, monkeypatch, fresh_s3_clients, tmp_path
):
    caplog.set_level("INFO")  # every record the job logs (it logs at INFO) is searched for the secret too
    with moto_server(require_auth=True) as endpoint:  # an S3 that knows no keys: every key is wrong
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-that-must-not-leak")
        line, output = run_embed_output(
            capsys,
            *flags(data="s3://bucket/data", model_root=str(trained["model_root"]), **s3_catalog(tmp_path)),
        )
    assert "s3://bucket/data: access denied; check the AWS credentials" in line
    everything = output + caplog.text
    assert "secret-that-must-not-leak" not in everything and "test-key-id" not in everything
