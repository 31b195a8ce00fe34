"""Shared fixtures: a moto S3 server and one real local Ray cluster per test session, one trained
model version and three embedded versions of it, and private copies of the Feast repo.

tests/unit need none of the servers; tests/integration use real Ray, S3 (moto), Redis and Feast.
Helpers that start servers and clusters live in tests/helpers."""

import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers.servers import free_port, moto_server, redis_server, with_redis_online_store

REPO = Path(__file__).resolve().parent.parent
# No usage telemetry from the test clusters (Ray Data would also query a Prometheus on :9090 per dataset).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# event times of the `versions` fixture
T1, T2, T3 = (datetime(2026, month, 1, tzinfo=UTC) for month in (1, 6, 9))


# `make test` runs two xdist workers that take a module at a time in this order: the slowest first, so
# that both finish together (module times measured 2026-12-07; the others follow in the order collected).
SLOWEST_FIRST = (
    "test_train.py",
    "test_pipeline.py",
    "test_secrets.py",
    "test_fault_tolerance.py",
    "test_publish.py",
    "test_cluster.py",
    "test_daily_batches.py",
    "test_embed.py",
    "test_mixed_tables.py",
    "test_crash_safety.py",
    "test_monitor.py",
    "test_data_checks_month.py",
    "test_registry.py",
    "test_cli.py",
    "test_embed_resume.py",
    "test_serve.py",
    "test_auth.py",
    "test_publish_redis.py",
    "test_pipeline_metrics.py",
    "test_transient_faults.py",
    "test_embed_s3.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its order


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, reached through the standard AWS environment variables, as
    a real deployment would be. Set before Ray starts so that Ray's workers inherit them."""
    import s3fs

    with moto_server() as endpoint:
        saved = {name: os.environ.get(name) for name in _AWS_ENV}
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "test-key-id",
                "AWS_SECRET_ACCESS_KEY": "test-secret-key",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        s3fs.S3FileSystem.clear_instance_cache()


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A real local Ray cluster with the machine's 2 CPUs, torn down after the session. Its dashboard
    and dashboard agent get free ports: Ray's fixed defaults (8265, 52365) stay free for the clusters
    other tests start meanwhile (a job's private cluster, `ray start`)."""
    import ray
    from ray.cluster_utils import Cluster

    ports = {"dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False, **ports}
    )
    ray.init(address=cluster.address, log_to_driver=False)
    yield ray
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def digits_parquet(tmp_path_factory) -> Path:
    from ray_jobs.demo import write_digits_parquet

    return write_digits_parquet(tmp_path_factory.mktemp("data") / "digits.parquet")


@pytest.fixture(scope="session")
def trained(ray_cluster, digits_parquet, tmp_path_factory) -> dict:
    """A model version trained once with 2 DDP workers, shared by the train, embed and publish tests."""
    from ray_jobs.config import TrainConfig
    from ray_jobs.train import train

    work = tmp_path_factory.mktemp("train")
    config = TrainConfig(
        data=str(digits_parquet),
        vector_column="pixels",
        image_shape=[1, 8, 8],
        model_root=str(work / "models"),
        # no KL warm-up and a higher learning rate: 5 of 8 units active in 6 epochs (the publish gate checks
        # collapse)
        label_column="label",
        latent_dim=8,
        hidden_dims=[64, 32],
        epochs=6,
        batch_size=32,
        num_workers=2,
        kl_warmup_epochs=0,
        learning_rate=3e-3,
        storage_path=str(work / "ray_results"),
    )
    version = train(config)
    return {"model_root": work / "models", "version": version, "data": digits_parquet, "config": config}


def validation_reference(model, loaded, trained) -> tuple[dict, dict]:
    """What training stores with a version: its validation rows' posterior means, scores and thresholds."""
    import pyarrow.parquet as pq

    from vae import encode_matrix, features_to_numpy
    from vae.data.keys import is_validation, key_hash
    from vae.monitoring.statistics import anomaly_thresholds

    table = pq.read_table(trained["data"])
    table = table.filter(
        is_validation(key_hash(table.column("item_id")), trained["config"].validation_fraction)
    )
    latents, scores = encode_matrix(model, loaded.normalizer, features_to_numpy(table, loaded.features))
    thresholds = anomaly_thresholds(scores)
    return {"posterior_mean": latents, "anomaly_score": scores}, {
        "quantile": 0.99,
        "threshold": thresholds["0.99"],
        "thresholds": thresholds,
    }


@pytest.fixture(scope="session")
def versions(trained, tmp_path_factory):
    """Three model versions (the trained one and two with perturbed weights) embedded at T1 < T2 < T3."""
    import torch

    from ray_jobs.config import EmbedConfig
    from ray_jobs.embed import embed
    from vae import load_model_version, save_model_version

    work = tmp_path_factory.mktemp("versions")
    loaded = load_model_version(trained["model_root"], trained["version"])
    names = []
    for seed in range(3):
        model = loaded.model
        if seed:
            torch.manual_seed(seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))
        reference, anomaly = validation_reference(model, loaded, trained)
        names.append(
            save_model_version(
                work / "models",
                model,
                loaded.normalizer,
                loaded.features,
                {},
                {},
                {"seed": seed},
                reference=reference,
                anomaly=anomaly,
            )
        )
    import pyarrow.parquet as pq

    # 5 output files per version, one batch each, into a catalog of their own (tests copy it)
    pq.write_table(pq.read_table(trained["data"]), work / "digits.parquet", row_group_size=400)
    catalog = {"catalog": f"sqlite:///{work / 'catalog.db'}", "warehouse": str(work / "warehouse")}
    for name, event_time in zip(names, (T1, T2, T3), strict=True):
        embed(
            EmbedConfig(
                data=str(work / "digits.parquet"),
                model_root=str(work / "models"),
                model_version=name,
                batch="digits",
                event_time=event_time,
                rows_per_file=400,
                **catalog,
            )
        )
    return {
        "catalog_db": work / "catalog.db",
        "warehouse": work / "warehouse",
        "names": names,
        "model_root": work / "models",
    }


@pytest.fixture(autouse=True)
def _versions_in_the_repo(request):
    """A test that asks for the versions and a feature repo gets a repo whose catalog holds them."""
    if {"versions", "feature_repo"} <= set(request.fixturenames):
        use_catalog(request.getfixturevalue("feature_repo"), request.getfixturevalue("versions"))


def use_catalog(feature_repo: Path, versions: dict) -> Path:
    """Point a test's feature repo at a copy of the versions' catalog: its own record of what is
    published, the same tables (new commits write new metadata files, never touching the original's)."""
    (feature_repo / "data").mkdir(exist_ok=True)
    shutil.copy(versions["catalog_db"], feature_repo / "data" / "catalog.db")
    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(
        yaml_path.read_text().replace("warehouse: data/warehouse", f"warehouse: {versions['warehouse']}")
    )
    return feature_repo


def catalog_options(versions: dict) -> dict:
    """Job options that read the versions' own catalog (monitor, embeddings history)."""
    return {"catalog": f"sqlite:///{versions['catalog_db']}", "warehouse": str(versions["warehouse"])}


def commit_rows(catalog, table, rows, batch_id: str) -> None:
    """Commit rows as one batch of a table, the way the embed job lands a run (a file in the table's
    location, one Iceberg commit replacing the batch)."""
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vae.embeddings.runs import RunPaths

    run = f"test-{uuid.uuid4().hex[:8]}"
    paths = RunPaths.of(table.location(), batch_id, run)
    Path(paths.data).mkdir(parents=True)
    batch = pa.array([batch_id] * rows.num_rows, pa.string())
    rows = rows.set_column(rows.schema.get_field_index("batch_id"), "batch_id", batch)
    schema = table.schema().as_arrow()
    path = f"{paths.data}/part-000000.parquet"
    pq.write_table(rows.select(schema.names).cast(schema), path)
    catalog.commit_batch(table, batch_id, [f"file://{path}"], {}, run, int(time.time() * 1000))


def version_rows(feature_repo: Path, version: str, entity: str = "item"):
    """A version's rows as pandas, by key, read from the repo's catalog."""
    from feast_embeddings.settings import StoreSettings

    catalog = StoreSettings.read(feature_repo / "feature_store.yaml").open_catalog()
    key = catalog.entity_set(entity).join_key
    return catalog.read(catalog.table(entity, version)).to_pandas().set_index(key)


@pytest.fixture
def feature_repo(tmp_path) -> Path:
    """A private copy of the project's Feast repo, so tests never touch feature_repo/data."""
    repo = tmp_path / "feature_repo"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py", "vector_search/feature_store.yaml"):
        (repo / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / "feature_repo" / name, repo / name)
    return repo


REDIS_BLOCK = """online_store:
    type: redis
    connection_string: ${REDIS_CONNECTION_STRING}
    key_ttl_seconds: 3600
"""


@pytest.fixture
def redis_repo(feature_repo, monkeypatch):
    """The project's repo switched to Redis the documented way: the online_store block replaced."""
    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(with_redis_online_store(yaml_path.read_text(), REDIS_BLOCK))
    with redis_server() as (port, password):
        monkeypatch.setenv("REDIS_CONNECTION_STRING", f"127.0.0.1:{port},password={password}")
        yield feature_repo, port, password
