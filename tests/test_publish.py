"""Publishing into a real Feast repo: SQLite online store, DuckDB offline store, file registry."""

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_jobs.embed import EmbedConfig, embed
from ray_jobs.publish import PublishConfig, fetch_online, publish
from vae import InputError


@pytest.fixture(scope="module")
def embeddings_root(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("publish") / "embeddings"
    embed(EmbedConfig(data=str(trained["data"]), model_root=str(trained["model_root"]), output=str(root)))
    return root


def test_online_vectors_equal_the_embeddings_parquet(embeddings_root, feature_repo, trained):
    summary = publish(PublishConfig(embeddings=str(embeddings_root), feature_repo=str(feature_repo), verify_rows=0))
    assert summary["rows"] == 1797 and summary["model_version"] == trained["version"]

    from feast import FeatureStore

    store = FeatureStore(repo_path=str(feature_repo))
    table = pq.read_table(embeddings_root / trained["version"]).sort_by("item_id")
    fetched = fetch_online(store, "item_embeddings", table.column("item_id").to_pylist(), "item_id")
    assert len(fetched) == 1797
    for row, online in zip(table.to_pylist(), fetched):
        assert online["item_id"] == row["item_id"]
        assert online["model_version"] == trained["version"]
        np.testing.assert_array_equal(np.asarray(online["latent"], np.float32), np.asarray(row["latent"], np.float32))
        assert online["anomaly_score"] == pytest.approx(row["anomaly_score"], rel=1e-6)


def test_offline_point_in_time_retrieval_reads_the_same_vectors(embeddings_root, feature_repo, trained):
    publish(PublishConfig(embeddings=str(embeddings_root), feature_repo=str(feature_repo), verify_rows=16))
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(feature_repo))
    entity_df = pd.DataFrame({"item_id": [3, 7, 11], "event_timestamp": [datetime.now(UTC)] * 3})
    offline = store.get_historical_features(entity_df=entity_df, features=["item_embeddings:latent", "item_embeddings:model_version"]).to_df()
    table = pq.read_table(embeddings_root / trained["version"]).to_pandas().set_index("item_id")
    for _, row in offline.iterrows():
        assert row["model_version"] == trained["version"]
        np.testing.assert_array_equal(np.asarray(row["latent"], np.float32), np.asarray(table.loc[row["item_id"], "latent"], np.float32))
    # before the vectors existed, point-in-time retrieval must find none
    early = pd.DataFrame({"item_id": [3], "event_timestamp": [datetime(2000, 1, 1, tzinfo=UTC)]})
    assert store.get_historical_features(entity_df=early, features=["item_embeddings:model_version"]).to_df()["model_version"].isna().all()


def test_missing_embeddings_are_a_clear_error(feature_repo, tmp_path):
    with pytest.raises(InputError, match="no embeddings found; run the embed job first"):
        publish(PublishConfig(embeddings=str(tmp_path / "none"), feature_repo=str(feature_repo)))
