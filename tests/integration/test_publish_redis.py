"""Publishing with the Redis online store (the production switch in feature_store.yaml): a real
password-protected redis-server on 127.0.0.1, key TTL, retired versions removed from Redis."""

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import version_rows
from helpers.servers import postgres_server

from feast_embeddings import EmbeddingsRepo, current_features, fetch_online
from feast_embeddings.verify import online_row_count
from ray_jobs.config import PublishConfig
from ray_jobs.publish import publish
from vae import InputError

REPO = Path(__file__).resolve().parents[2]


def test_publish_to_redis_with_password_ttl_and_retirement(versions, redis_repo):
    import redis
    from feast import FeatureStore

    feature_repo, port, password = redis_repo
    # the secret stays in the environment
    assert password not in (feature_repo / "feature_store.yaml").read_text()
    v1, v2, v3 = versions["names"]
    for name in (v1, v2, v3):
        summary = publish(
            PublishConfig(feature_repo=str(feature_repo), model_version=name, keep_online=2, verify_rows=64)
        )
    assert summary["retired"] == [v1]

    store = FeatureStore(repo_path=str(feature_repo))
    repo = EmbeddingsRepo(feature_repo)
    expected = version_rows(feature_repo, v3)
    fetched = fetch_online(store, repo.version_view_name("item", v3), list(range(0, 1797, 7)), "item_id")
    for row in fetched:
        assert row["model_version"] == v3
        np.testing.assert_array_equal(
            np.asarray(row["latent"], np.float32),
            np.asarray(expected.loc[row["item_id"], "latent"], np.float32),
        )
    current = store.get_online_features(
        features=current_features(store, "item_embeddings_current"), entity_rows=[{"item_id": 1}]
    ).to_dict()
    assert current["model_version"] == [v3]

    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    keys = list(client.scan_iter(count=1000))
    assert len(keys) == 1797  # one hash per entity, holding every online version's fields
    ttls = [client.ttl(key) for key in keys[:50]]
    assert all(0 < ttl <= 3600 for ttl in ttls)
    # two versions online (v2, v3): per version 6 features + 1 timestamp field; v1's were deleted
    assert {client.hlen(key) for key in keys[:50]} == {14}


def test_wrong_redis_password_is_one_clear_error(versions, redis_repo, monkeypatch):
    feature_repo, port, password = redis_repo
    monkeypatch.setenv("REDIS_CONNECTION_STRING", f"127.0.0.1:{port},password=wrong-{password[:4]}")
    with pytest.raises(InputError, match="online store: AuthenticationError") as raised:
        publish(PublishConfig(feature_repo=str(feature_repo), model_version=versions["names"][0]))
    assert password not in str(raised.value)


def test_the_production_layout_postgres_catalog_s3_tables_s3_registry_redis_and_parallel_writers(
    versions, trained, redis_repo, s3_endpoint, tmp_path, monkeypatch
):
    """deploy/feature_store.yaml as a cluster uses it: the embeddings catalog on a real PostgreSQL
    server (password from PGPASSWORD only), the tables' files on S3 (moto), Feast's registry on S3,
    Redis online. Embed a batch, publish it with two Ray writer actors, read it back online and
    point-in-time offline (Feast's IcebergSource through pyiceberg: PostgreSQL + S3)."""
    import s3fs
    from feast import FeatureStore

    from feast_embeddings.settings import StoreSettings
    from ray_jobs.config import EmbedConfig
    from ray_jobs.embed import embed

    feature_repo, _, _ = redis_repo
    v1 = versions["names"][0]
    fs, bucket = s3fs.S3FileSystem(), f"vae-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    with postgres_server() as (port, password):
        monkeypatch.setenv("PGUSER", "vae")
        monkeypatch.setenv("PGHOST", "127.0.0.1")
        monkeypatch.setenv("PGPASSWORD", password)
        production = tmp_path / "feature_store.yaml"
        text = (
            (REPO / "deploy" / "feature_store.yaml").read_text().replace("s3://my-bucket/", f"s3://{bucket}/")
        )
        production.write_text(text.replace(":5432/", f":{port}/"))
        # Feast's S3 registry (boto3) reads its endpoint from here
        monkeypatch.setenv("FEAST_S3_ENDPOINT_URL", s3_endpoint)
        embedded = embed(
            EmbedConfig(
                data=str(trained["data"]),
                model_root=str(versions["model_root"]),
                model_version=v1,
                feature_store_yaml=str(production),
                rows_per_file=400,
                batch="2026-11-30",
            )
        )
        summary = publish(
            PublishConfig(
                feature_repo=str(feature_repo),
                feature_store_yaml=str(production),
                model_version="latest",
                monitoring=f"s3://{bucket}/monitoring",
                writers=2,
                parallel_min_rows=0,
                write_batch_rows=150,
                verify_rows=200,
            )
        )
        catalog = StoreSettings.read(production).open_catalog()
        table = catalog.table("item", v1)
        assert table.location().startswith(f"s3://{bucket}/vae/warehouse/") and embedded.embedded_rows == 1797
        assert (
            fs.exists(f"{bucket}/vae/feast/registry.pb")
            and not (feature_repo / "data" / "registry.db").exists()
        )
        assert summary["model_version"] == v1 and summary["rows"] == 1797 and summary["writers"] == 2
        assert summary["gate"]["passed"] and summary["gate"]["report"].startswith(
            f"s3://{bucket}/monitoring/{v1}-"
        )
        store = FeatureStore(repo_path=str(feature_repo), fs_yaml_file=production)
        view = store.get_feature_view(summary["view"])
        # offline reads go to the same catalog and tables; the registry holds no password
        assert (
            view.batch_source.catalog_properties["uri"]
            == f"postgresql+psycopg2://vae@127.0.0.1:{port}/vae_catalog"
        )
        assert password not in production.read_text()
        assert online_row_count(store, view) == 1797
        expected = catalog.read(table).to_pandas().set_index("item_id")
        for row in fetch_online(store, summary["view"], list(range(0, 1797, 13)), "item_id"):
            np.testing.assert_array_equal(
                np.asarray(row["latent"], np.float32),
                np.asarray(expected.loc[row["item_id"], "latent"], np.float32),
            )
            assert row["anomaly_score"] == pytest.approx(
                expected.loc[row["item_id"], "anomaly_score"], rel=1e-6
            )
        entity_df = pd.DataFrame({"item_id": [4, 1500], "event_timestamp": [pd.Timestamp.now(tz="UTC")] * 2})
        offline = store.get_historical_features(entity_df=entity_df, features=[f"{view.name}:latent"]).to_df()
        for key, latent in zip(offline["item_id"], offline["latent"], strict=True):
            np.testing.assert_array_equal(
                np.asarray(latent, np.float32), np.asarray(expected.loc[key, "latent"])
            )


def test_a_daily_publish_past_the_redis_ttl_writes_its_batch_and_lets_expired_keys_go(versions, redis_repo):
    """deploy/feature_store.yaml sets a Redis TTL: keys no batch refreshes expire. A daily publish checks
    what it wrote (every key of its batch online at its row), never that the whole version is still
    there, so it keeps working after the TTL; and its re-run changes nothing."""
    import time

    import pyarrow as pa
    import redis
    from conftest import commit_rows
    from feast import FeatureStore

    from vae.embeddings import contract

    feature_repo, port, password = redis_repo
    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("key_ttl_seconds: 3600", "key_ttl_seconds: 2"))
    repo = EmbeddingsRepo(feature_repo)
    rows = repo.catalog.read(repo.catalog.table("item", versions["names"][0]))
    version = "item-ttl"
    table = repo.catalog.create_table(
        repo.catalog.entity_set("item"), version, contract.schema("item_id", pa.int64()), {}
    )
    commit_rows(repo.catalog, table, rows, "day-1")

    def publish_day() -> dict:
        options = {"model_version": version, "switch_current": False, "verify_rows": 64}
        return publish(PublishConfig(feature_repo=str(feature_repo), **options))

    assert (publish_day()["rows"], publish_day()["rows"]) == (1797, 0)
    time.sleep(3)  # past the TTL: every key of day 1 expires
    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    assert list(client.scan_iter(count=1000)) == []

    later = pc_add_days(rows.slice(0, 500), 1)
    commit_rows(repo.catalog, repo.catalog.table("item", version), later, "day-2")
    day_2 = publish_day()
    assert (day_2["batches"], day_2["rows"], day_2["new_keys"]) == (["day-2"], 500, 500)
    assert publish_day()["rows"] == 0  # the re-run: nothing to write, nothing raised
    store = FeatureStore(repo_path=str(feature_repo))
    fetched = fetch_online(store, repo.version_view_name("item", version), [3, 499, 500, 1700], "item_id")
    assert [row["latent"] is not None for row in fetched] == [True, True, False, False]
    assert len(list(client.scan_iter(count=1000))) == 500 and 0 < client.ttl(next(client.scan_iter())) <= 2


def pc_add_days(rows, days: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    moved = pc.add(rows.column("event_timestamp"), pa.scalar(days * 86_400_000_000, pa.duration("us")))
    return rows.set_column(rows.schema.get_field_index("event_timestamp"), "event_timestamp", moved)
