"""The batched online writers store exactly the bytes Feast's own `write_to_online_store` stores:
same rows written both ways into two views of one real store (SQLite file, redis-server), compared
byte for byte, and read back through Feast."""

import sqlite3
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from feast_embeddings import EmbeddingsRepo, fetch_online
from feast_embeddings import writers as feast_online
from vae.embeddings.contract import latent_column

T_OLD, T_NEW = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, 12, 30, 15, 123456, tzinfo=UTC)


def embeddings(rows: int, seed: int, event_time: datetime = T_NEW) -> pa.Table:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, 16), dtype=np.float32)
    vectors[0, :3] = [0.0, -0.0, np.float32(1e-39)]  # zeros and a subnormal: bytes, not decimal text
    return pa.table(
        {
            # negative and large keys
            "item_id": pa.array(rng.permutation(np.arange(-5, rows - 5) * 7_919), pa.int64()),
            "latent": latent_column(vectors),
            "anomaly_score": pa.array(rng.standard_normal(rows, dtype=np.float32) * 100),
            "is_anomaly": pa.array(rng.random(rows) < 0.1),
            "model_version": pa.array(["v-a" if i % 3 else "v-b" for i in range(rows)]),
            "event_timestamp": pa.array([event_time] * rows, pa.timestamp("us", tz="UTC")),
            # attribution: the top columns and their shares (a table model's rows)
            "top_columns": pa.array(
                [["amount", "city", "age"][i % 3 :] for i in range(rows)], pa.list_(pa.string())
            ),
            "top_shares": pa.array(rng.random((rows, 3), dtype=np.float32).tolist(), pa.list_(pa.float32())),
        }
    )


def two_views(feature_repo, tmp_path):
    """The repo's definitions plus two version views: one written by Feast, one by the fast writer."""
    repo = EmbeddingsRepo(feature_repo)
    repo.catalog.register("item", "item_id", "int64")
    store = repo.store
    views = [repo.version_view("item", name, online=True, published_at="") for name in ("by-feast", "by-us")]
    store.apply([repo.entity("item"), *views])
    return store, *(store.get_feature_view(view.name) for view in views)


def test_sqlite_rows_are_byte_identical_to_feasts(feature_repo, tmp_path):
    from feast.infra.online_stores.helpers import compute_table_id

    store, by_feast, by_us = two_views(feature_repo, tmp_path)
    table = embeddings(3_000, seed=0)
    store.write_to_online_store(by_feast.name, table.to_pandas())
    assert {
        feast_online.write_batch(store, by_us, batch, "item_id")
        for batch in table.to_batches(max_chunksize=1_000)
    } == {"sqlite"}

    with sqlite3.connect(feature_repo / "data" / "online_store.db") as connection:

        def rows(view):
            return connection.execute(
                "SELECT entity_key, feature_name, value, value_text, vector_value, event_ts, created_ts "
                "FROM "
                f'"{compute_table_id(store.project, view, False)}" ORDER BY entity_key, feature_name'
            ).fetchall()

        ours, feasts = rows(by_us), rows(by_feast)
    assert len(ours) == 6 * 3_000  # one row per served feature
    assert ours == feasts
    fetched = fetch_online(store, by_us.name, table.column("item_id").to_pylist()[:50], "item_id")
    for row, want in zip(fetched, table.slice(0, 50).to_pylist(), strict=True):
        np.testing.assert_array_equal(
            np.asarray(row["latent"], np.float32), np.asarray(want["latent"], np.float32)
        )
        assert row["model_version"] == want["model_version"] and row["is_anomaly"] == want["is_anomaly"]
    # a version without anomaly calibration has null is_anomaly: not one fixed layout, Feast's own path
    # writes it
    unflagged = table.slice(0, 10).set_column(3, "is_anomaly", pa.nulls(10, pa.bool_()))
    assert (
        feast_online.write_batch(
            store,
            by_us,
            unflagged.set_column(
                5,
                "event_timestamp",
                pa.array([datetime(2026, 5, 1, tzinfo=UTC)] * 10, pa.timestamp("us", tz="UTC")),
            ),
            "item_id",
        )
        == "feast"
    )
    assert [
        row["is_anomaly"]
        for row in fetch_online(store, by_us.name, unflagged.column("item_id").to_pylist(), "item_id")
    ] == [None] * 10


def test_redis_hashes_are_byte_identical_to_feasts_and_older_rows_do_not_overwrite(redis_repo, tmp_path):
    import redis
    from feast.infra.online_stores.helpers import _mmh3

    feature_repo, port, password = redis_repo
    store, by_feast, by_us = two_views(feature_repo, tmp_path)
    table = embeddings(2_000, seed=1)
    store.write_to_online_store(by_feast.name, table.to_pandas())
    assert feast_online.write_batch(store, by_us, table, "item_id") == "redis"

    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    keys = list(client.scan_iter(count=1_000))
    assert len(keys) == 2_000  # one hash per entity, both views' fields in it
    for key in keys[:300]:
        stored = client.hgetall(key)
        for name in ("latent", "anomaly_score", "model_version"):
            assert stored[_mmh3(f"{by_us.name}:{name}")] == stored[_mmh3(f"{by_feast.name}:{name}")]
        assert stored[f"_ts:{by_us.name}".encode()] == stored[f"_ts:{by_feast.name}".encode()]
        assert 0 < client.ttl(key) <= 3600  # key_ttl_seconds of the repo's Redis block

    # As in Feast: a row older than what a key holds for the view is skipped, a newer one replaces it.
    older = embeddings(2_000, seed=2, event_time=T_OLD)
    feast_online.write_batch(store, by_us, older, "item_id")
    keys = table.column("item_id").to_pylist()[:20]
    np.testing.assert_array_equal(
        [r["latent"] for r in fetch_online(store, by_us.name, keys, "item_id")],
        np.asarray(table.column("latent").to_pylist()[:20], np.float32),
    )
    newer = embeddings(2_000, seed=3, event_time=datetime(2026, 5, 1, tzinfo=UTC))
    feast_online.write_batch(store, by_us, newer, "item_id")
    want = dict(zip(newer.column("item_id").to_pylist(), newer.column("latent").to_pylist(), strict=True))
    np.testing.assert_array_equal(
        [r["latent"] for r in fetch_online(store, by_us.name, keys, "item_id")],
        np.asarray([want[k] for k in keys], np.float32),
    )


def test_string_keys_and_ragged_vectors():
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    keys = pa.array(["a", "", "ünïcødé-key", "x" * 300])
    serialized = feast_online.entity_keys(keys, "item_id", 3)
    assert serialized == [
        serialize_entity_key(EntityKey(join_keys=["item_id"], entity_values=[Value(string_val=k)]), 3)
        for k in keys.to_pylist()
    ]
    # Vectors of different lengths are not one fixed layout: the caller falls back to Feast's own path.
    assert feast_online.float_list_values(pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))) is None
    assert feast_online.float_list_values(pa.array([[1.0, 2.0], None], pa.list_(pa.float32()))) is None
