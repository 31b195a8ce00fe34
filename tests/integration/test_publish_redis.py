"""Publishing with the Redis online store (the production switch in feature_store.yaml): a real
password-protected redis-server on 127.0.0.1, key TTL, retired versions removed from Redis."""

import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

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
            PublishConfig(
                embeddings=str(versions["root"]),
                feature_repo=str(feature_repo),
                model_version=name,
                keep_online=2,
                verify_rows=64,
            )
        )
    assert summary["retired"] == [v1]

    store = FeatureStore(repo_path=str(feature_repo))
    repo = EmbeddingsRepo(feature_repo).definitions
    expected = pq.read_table(versions["root"] / v3).to_pandas().set_index("item_id")
    fetched = fetch_online(store, repo.version_view_name(v3), list(range(0, 1797, 7)), "item_id")
    for row in fetched:
        assert row["model_version"] == v3
        np.testing.assert_array_equal(
            np.asarray(row["latent"], np.float32),
            np.asarray(expected.loc[row["item_id"], "latent"], np.float32),
        )
    current = store.get_online_features(
        features=current_features(store, repo.CURRENT_SERVICE), entity_rows=[{"item_id": 1}]
    ).to_dict()
    assert current["model_version"] == [v3]

    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    keys = list(client.scan_iter(count=1000))
    assert len(keys) == 1797  # one hash per entity, holding every online version's fields
    ttls = [client.ttl(key) for key in keys[:50]]
    assert all(0 < ttl <= 3600 for ttl in ttls)
    # two versions online (v2, v3): per version 4 features + 1 timestamp field; v1's were deleted
    assert {client.hlen(key) for key in keys[:50]} == {10}


def test_wrong_redis_password_is_one_clear_error(versions, redis_repo, monkeypatch):
    feature_repo, port, password = redis_repo
    monkeypatch.setenv("REDIS_CONNECTION_STRING", f"127.0.0.1:{port},password=wrong-{password[:4]}")
    with pytest.raises(InputError, match="online store: AuthenticationError") as raised:
        publish(
            PublishConfig(
                embeddings=str(versions["root"]),
                feature_repo=str(feature_repo),
                model_version=versions["names"][0],
            )
        )
    assert password not in str(raised.value)


def test_parallel_writers_publish_from_s3_into_the_production_store(
    versions, redis_repo, s3_endpoint, tmp_path, monkeypatch
):
    """The production layout: deploy/feature_store.yaml (registry on S3, Redis) with embeddings and the
    gate's report on S3 (moto); two Ray writer actors read the version's files from S3 into Redis.
    Every key counted, values read back through Feast from the S3 registry."""
    import s3fs
    from feast import FeatureStore

    feature_repo, _, _ = redis_repo
    v1 = versions["names"][0]
    fs, bucket = s3fs.S3FileSystem(), f"vae-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    # Parquet files + _manifest.json
    fs.put(str(versions["root"] / v1), f"{bucket}/embeddings/{v1}", recursive=True)
    production = tmp_path / "feature_store.yaml"
    production.write_text(
        (REPO / "deploy" / "feature_store.yaml").read_text().replace("s3://my-bucket/", f"s3://{bucket}/")
    )
    # Feast's S3 registry (boto3) reads its endpoint from here
    monkeypatch.setenv("FEAST_S3_ENDPOINT_URL", s3_endpoint)
    summary = publish(
        PublishConfig(
            embeddings=f"s3://{bucket}/embeddings",
            feature_repo=str(feature_repo),
            feature_store_yaml=str(production),
            model_version="latest",
            monitoring=f"s3://{bucket}/monitoring",
            writers=2,
            parallel_min_rows=0,
            write_batch_rows=150,
            verify_rows=200,
        )
    )  # 5 files of up to 400 rows: 5 units over 2 actors
    assert (
        fs.exists(f"{bucket}/vae/feast/registry.pb") and not (feature_repo / "data" / "registry.db").exists()
    )
    assert summary["model_version"] == v1 and summary["rows"] == 1797 and summary["writers"] == 2
    assert summary["gate"]["passed"] and summary["gate"]["report"].startswith(
        f"s3://{bucket}/monitoring/{v1}-"
    )
    assert fs.exists(summary["gate"]["report"]) and fs.exists(
        summary["gate"]["report"].replace("report.html", "report.json")
    )
    store = FeatureStore(repo_path=str(feature_repo), fs_yaml_file=production)
    view = store.get_feature_view(summary["view"])
    assert view.batch_source.path == f"s3://{bucket}/embeddings/{v1}/*.parquet"  # offline reads go to S3 too
    assert online_row_count(store, view) == 1797
    expected = pq.read_table(versions["root"] / v1).to_pandas().set_index("item_id")
    for row in fetch_online(store, summary["view"], list(range(0, 1797, 13)), "item_id"):
        np.testing.assert_array_equal(
            np.asarray(row["latent"], np.float32),
            np.asarray(expected.loc[row["item_id"], "latent"], np.float32),
        )
        assert row["anomaly_score"] == pytest.approx(expected.loc[row["item_id"], "anomaly_score"], rel=1e-6)
