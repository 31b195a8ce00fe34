"""Credentials never leave the process: train, embed and publish run as a user runs them (`vaectl`, on
a local Ray cluster started with the credentials) with a password in every URI and credential variable
(MLflow behind basic auth, Redis, PostgreSQL, S3, the manifest key), then every output, log, written
file, Iceberg table, the Feast registry and MLflow's store are searched for each secret: no hit. And
MLflow over HTTP behind basic auth: no credentials is one clear line; the right ones track, register
and load."""

import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO
from helpers.cli import vaectl_command
from helpers.local_cluster import local_cluster
from helpers.servers import mlflow_server, postgres_server, redis_server, with_redis_online_store

PUBLISHER = "vae-publisher"


def run(arguments: list[str], env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        vaectl_command(*arguments), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def credentialed(trained, s3_endpoint, tmp_path_factory):
    """A password in every place one can go, and train -> embed -> publish run through them."""
    import s3fs

    work = tmp_path_factory.mktemp("secrets")
    ray_temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    mlflow_password, hmac_key = secrets.token_hex(12), secrets.token_hex(16)
    aws_secret = "aws-" + secrets.token_hex(12)  # moto takes any key: this one is only ever in the env
    bucket = f"vae-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    (work / "mlflow").mkdir()
    with (
        mlflow_server(str(work / "mlflow"), users=(PUBLISHER, mlflow_password)) as mlflow_url,
        redis_server() as (redis_port, redis_password),
        postgres_server() as (pg_port, pg_password),
    ):
        repo = work / "feature_repo"
        repo.mkdir()
        shutil.copy(REPO / "feature_repo" / "features.py", repo / "features.py")
        store = with_redis_online_store((REPO / "feature_repo" / "feature_store.yaml").read_text())
        store = store.replace("catalog: sqlite:///data/catalog.db", f"catalog: {catalog_uri(pg_port)}")
        store = store.replace("warehouse: data/warehouse", f"warehouse: s3://{bucket}/warehouse")
        (repo / "feature_store.yaml").write_text(store)
        host = mlflow_url.removeprefix("http://")
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")},
            "RAY_TMPDIR": str(ray_temp),
            "MLFLOW_TRACKING_URI": f"http://{PUBLISHER}:{mlflow_password}@{host}",
            "MLFLOW_TRACKING_USERNAME": PUBLISHER,
            "MLFLOW_TRACKING_PASSWORD": mlflow_password,
            "REDIS_CONNECTION_STRING": f"127.0.0.1:{redis_port},password={redis_password}",
            "PGUSER": "vae",
            "PGHOST": "127.0.0.1",
            "PGPASSWORD": pg_password,
            "AWS_SECRET_ACCESS_KEY": aws_secret,
            "VAE_MANIFEST_HMAC_KEY": hmac_key,
            # the jobs' 15 s default is for a server that is down; this one is slow when the machine is busy
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
        }
        train_config = trained["config"].model_dump(mode="json") | {
            "model_root": str(work / "models"),
            "storage_path": str(work / "ray_results"),
            "epochs": 2,
            "entity": "item",
        }
        (work / "train.yaml").write_text(yaml.safe_dump(train_config))
        steps = {
            "train": ["train", "--config", str(work / "train.yaml")],
            "embed": [
                "embed",
                *("--data", str(trained["data"]), "--model-root", str(work / "models")),
                *("--feature-store-yaml", str(repo / "feature_store.yaml"), "--batch", "day1"),
            ],
            "publish": [
                "publish",
                "--feature-repo",
                str(repo),
                "--model-version",
                "latest",
                "--verify-rows",
                "50",
                "--force",  # two epochs: the gate would refuse a collapsed space, which is not the point here
                "true",
            ],
        }
        outputs = {}
        # One Ray cluster for the three steps, started with the credentials as a deployment's pods get
        # them (its workers inherit its environment); its logs are under ray_temp with the drivers'.
        with local_cluster(work, head_cpus=2, nodes=[], environment=env) as cluster:
            for name, arguments in steps.items():
                result = run(arguments, {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}, work)
                outputs[name] = result.stdout + result.stderr
                assert result.returncode == 0, f"{name} failed:\n{outputs[name][-3000:]}"
        yield {
            "work": work,
            "data": trained["data"],
            "ray_temp": ray_temp,
            "outputs": outputs,
            "env": env,
            "bucket": bucket,
            "fs": fs,
            "mlflow": mlflow_url,
            "pg_port": pg_port,
            "secrets": {
                "mlflow password": mlflow_password,
                "redis password": redis_password,
                "postgres password": pg_password,
                "aws secret key": aws_secret,
                "manifest key": hmac_key,
            },
            "catalog_tables": catalog_rows(pg_port, pg_password),
        }
    shutil.rmtree(ray_temp, ignore_errors=True)


def catalog_uri(port: int) -> str:
    return f"postgresql+psycopg2://vae@127.0.0.1:{port}/vae_catalog"


def catalog_rows(port: int, password: str) -> str:
    """Every row of every table of the catalog database, as text (table properties included)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(catalog_uri(port), connect_args={"password": password})
    with engine.connect() as connection:
        names = sqlalchemy.inspect(connection).get_table_names()
        rows = [repr(list(connection.execute(sqlalchemy.text(f'SELECT * FROM "{name}"')))) for name in names]
    engine.dispose()
    assert names, "the catalog has no tables: nothing was searched"
    return "\n".join(rows)


def test_no_secret_is_in_any_output_log_file_table_registry_or_tracking_store(credentialed):
    work, fs = credentialed["work"], credentialed["fs"]
    places: dict[str, bytes] = {
        f"vaectl {name}": text.encode() for name, text in credentialed["outputs"].items()
    }
    for root in (work, credentialed["ray_temp"]):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.suffix not in (".sock",):
                if path.name in ("basic_auth.ini", "train.yaml"):
                    continue  # the test's own server config (MLflow's admin name) and job config
                places[str(path)] = path.read_bytes()
    for key in fs.find(credentialed["bucket"]):  # the Iceberg tables' data and metadata on S3
        places[f"s3://{key}"] = fs.cat_file(key)
    places["iceberg catalog (PostgreSQL)"] = credentialed["catalog_tables"].encode()
    # the places this test must have searched, or it proves nothing
    names = "\n".join(places)
    for expected in ("registry.db", "model.json", "manifest.json", "server.db", "metadata.json", "raylet"):
        assert expected in names, f"nothing like {expected} was searched"
    assert any("MLmodel" in name for name in places), "the registered version's files were not searched"
    hits = [
        f"{what} in {where}: ...{context(data, secret)}..."
        for what, secret in credentialed["secrets"].items()
        for where, data in places.items()
        if secret.encode() in data
    ]
    assert not hits, "\n".join(hits[:20])


def context(data: bytes, secret: str) -> str:
    """Where a secret was found, the secret itself masked (the failure message must not leak it)."""
    at = data.index(secret.encode())
    return data[max(0, at - 120) : at + len(secret) + 60].decode(errors="replace").replace(secret, "<SECRET>")


def test_mlflow_over_http_with_basic_auth_tracks_registers_and_loads(credentialed, monkeypatch):
    from mlflow import MlflowClient

    from vae import encode_matrix, features_to_numpy, load_model_version
    from vae.versions.mlflow_registry import load_pyfunc

    secret = credentialed["secrets"]["mlflow password"]
    host = credentialed["mlflow"].removeprefix("http://")
    client = MlflowClient(f"http://{PUBLISHER}:{secret}@{host}")
    (version,) = client.search_model_versions("name = 'vae-item'")
    run = client.get_run(version.run_id)
    train = credentialed["outputs"]["train"]
    assert "untracked" not in train and "not registered" not in train, train[-3000:]
    assert run.info.status == "FINISHED" and float(run.data.params["epochs"]) == 2
    assert client.get_model_version_by_alias("vae-item", "champion").version == version.version
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_negative_elbo")] == [1, 2]
    # a server takes no local source: the folder went up as the run's artifact `model`
    assert version.source == f"runs:/{run.info.run_id}/model"
    # the version's manifest covers the files registering added, signed with the job's key
    name = version.tags["vae.model_version"]
    listed = yaml.safe_load((credentialed["work"] / "models" / name / "manifest.json").read_text())
    assert {"MLmodel", "mlflow_pyfunc.py"} <= set(listed["files"]) and listed["signature"].startswith("hmac-")
    # a consumer with the credentials and the manifest key loads the checked pyfunc from the server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    monkeypatch.setenv("VAE_MANIFEST_HMAC_KEY", credentialed["secrets"]["manifest key"])
    frame = pq.read_table(credentialed["data"]).to_pandas().head(50)
    predicted = load_pyfunc(f"models:/vae-item/{version.version}").predict(frame)
    loaded = load_model_version(credentialed["work"] / "models", name)
    expected, _ = encode_matrix(
        loaded.model,
        loaded.normalizer,
        features_to_numpy(pq.read_table(credentialed["data"]), loaded.features)[:50],
    )
    np.testing.assert_allclose(np.stack(predicted.latent), expected, atol=1e-6)


@pytest.mark.parametrize("credentials", ["none", "wrong"])
def test_mlflow_without_the_right_credentials_is_one_clear_line(credentialed, credentials):
    env = {k: v for k, v in credentialed["env"].items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_TRACKING_URI"] = credentialed["mlflow"]
    if credentials == "wrong":
        env |= {"MLFLOW_TRACKING_USERNAME": PUBLISHER, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    # resolving a registry URI is the job's first call to MLflow, before Ray starts
    arguments = ["embed", "--data", str(credentialed["data"]), "--model-version", "models:/vae-item@champion"]
    result = run([*arguments, "--batch", "day3"], env, credentialed["work"], timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    expected = "wants credentials (401)" if credentials == "none" else "refused the credentials (401)"
    assert expected in errors[0] and "MLFLOW_TRACKING_USERNAME" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_catalog_password_given_on_the_command_line_is_refused_without_echoing_it(credentialed):
    port = credentialed["pg_port"]
    for uri in (
        f"postgresql+psycopg2://vae:cli-secret-1@127.0.0.1:{port}/vae_catalog",
        f"postgresql+psycopg2://vae@127.0.0.1:{port}/vae_catalog?password=cli-secret-1",
    ):
        arguments = ["embeddings", "history", "--entity", "item", "--catalog", uri, "--warehouse", "s3://x/w"]
        result = run(arguments, credentialed["env"], credentialed["work"], timeout=120)
        assert result.returncode == 2 and "holds a password" in result.stderr, result.stderr[-2000:]
        assert "cli-secret-1" not in result.stdout + result.stderr
