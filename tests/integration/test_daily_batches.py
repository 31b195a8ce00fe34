"""The daily life of one model version: new and changed items arrive as daily batches, each embedded
as one batch of the version's Iceberg table and published as a delta, offline and online in step.

    incremental  day 1 = items 0-999, day 2 = items 1000-1796 plus 900-999 changed: both days offline
                 and online, day-1 vectors at day-1 times, a re-run of day 1 changes nothing, and
                 `feast plan` / `feast apply` in the repo change and delete nothing (SQLite)
    snapshot     day 2 re-embeds the whole (changed) snapshot: day 1's vectors stay at day-1 times,
                 day 2's are served, a late re-run of day 1 does not overwrite them (S3 + Redis)
    entity sets  `user` (string keys, its own VAE) beside `item` in one repo
    concurrency  4 publishers into one repo at once (2 entity sets, 3 versions) and a reader
"""

import dataclasses
import os
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from conftest import validation_reference
from helpers.cli import flags, vaectl_command

from feast_embeddings import EmbeddingsRepo, current_features, fetch_online
from feast_embeddings.settings import StoreSettings
from ray_jobs import cli
from ray_jobs.config import EmbedConfig, PublishConfig
from ray_jobs.embed import embed
from ray_jobs.publish import publish
from vae import load_model_version, save_model_version
from vae.embeddings.catalog import EmbeddingsCatalog

REPO = Path(__file__).resolve().parents[2]
DAY_1, DAY_2 = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)


def day_files(trained, directory: Path) -> dict[str, Path]:
    """Day 1: items 0-999. Day 2: items 1000-1796, and 900-999 again with other pixels (changed items)."""
    table = pq.read_table(trained["data"]).drop_columns(["label"])
    changed = table.slice(900, 100).set_column(1, "pixels", table.slice(0, 100).column("pixels"))
    days = {"day-1": table.slice(0, 1000), "day-2": pa.concat_tables([changed, table.slice(1000)])}
    paths = {}
    for day, rows in days.items():
        paths[day] = directory / day / "items.parquet"
        paths[day].parent.mkdir(parents=True)
        pq.write_table(rows, paths[day])
    return paths


def catalog_of(feature_repo: Path) -> EmbeddingsCatalog:
    return StoreSettings.read(feature_repo / "feature_store.yaml").open_catalog()


def latents_at(store, features: list[str], keys: list, times: list[datetime], join_key="item_id") -> list:
    entity_df = pd.DataFrame({join_key: keys, "event_timestamp": times})
    frame = store.get_historical_features(entity_df=entity_df, features=features).to_df()
    by_row = {
        (k, t): v for k, t, v in zip(frame[join_key], frame["event_timestamp"], frame["latent"], strict=True)
    }
    return [by_row[(k, pd.Timestamp(t))] for k, t in zip(keys, times, strict=True)]


def vector_of(table: pa.Table, key, batch: str, join_key: str = "item_id") -> np.ndarray:
    mask = pc.and_(pc.equal(table.column(join_key), key), pc.equal(table.column("batch_id"), batch))
    return np.asarray(table.filter(mask).column("latent")[0].as_py(), np.float32)


def string_key_version(trained, tmp_path) -> tuple[str, Path]:
    """The trained VAE saved as a `user` set's model: keyed by a string user_id."""
    loaded = load_model_version(trained["model_root"], trained["version"])
    features = dataclasses.replace(loaded.features, key_column="user_id")
    reference, anomaly = validation_reference(loaded.model, loaded, trained)
    root = tmp_path / "user-models"
    version = save_model_version(
        root,
        loaded.model,
        loaded.normalizer,
        features,
        {},
        {},
        {"set": "user"},
        reference=reference,
        anomaly=anomaly,
    )
    users = pq.read_table(trained["data"]).slice(0, 600).drop_columns(["label"])
    keys = pa.array([f"u-{k:05d}" for k in users.column("item_id").to_pylist()], pa.string())
    path = tmp_path / "users.parquet"
    pq.write_table(users.drop_columns(["item_id"]).add_column(0, "user_id", keys), path)
    return version, path


def test_incremental_days_offline_and_online_rerun_and_feast_apply(trained, feature_repo, tmp_path, capsys):
    from feast import FeatureStore

    days = day_files(trained, tmp_path)
    yaml_path = str(feature_repo / "feature_store.yaml")

    def embed_day(day: str, when: datetime):
        return embed(
            EmbedConfig(
                data=str(days[day]),
                model_root=str(trained["model_root"]),
                batch=day,
                event_time=when,
                feature_store_yaml=yaml_path,
            )
        )

    def publish_item(**options) -> dict:
        return publish(PublishConfig(feature_repo=str(feature_repo), verify_rows=64, **options))

    def written(published: dict) -> tuple:
        return published["rows"], published["version_keys"], published["batches"]

    first = embed_day("day-1", DAY_1)
    published_1 = publish_item()
    assert written(published_1) == (1000, 1000, ["day-1"]) and published_1["gate"]["passed"]
    second = embed_day("day-2", DAY_2)
    published_2 = publish_item()
    # only the day's batch is written online; the key count covers the whole version; no gate (no switch)
    assert written(published_2) == (897, 1797, ["day-2"]) and published_2["gate"] is None

    version = trained["version"]
    catalog = catalog_of(feature_repo)
    table = catalog.read(catalog.table("item", version))
    assert (
        table.num_rows == 1897 and len(pc.unique(table.column("item_id"))) == 1797
    )  # every item of both days
    store = FeatureStore(repo_path=str(feature_repo))
    features = current_features(store, "item_embeddings_current")
    online = fetch_online(store, features[0].split(":")[0], list(range(1797)), "item_id")
    assert all(row["latent"] is not None and row["model_version"] == version for row in online)
    for key, batch in ((5, "day-1"), (950, "day-2"), (1500, "day-2")):  # each key at its latest vector
        np.testing.assert_array_equal(
            np.asarray(online[key]["latent"], np.float32), vector_of(table, key, batch)
        )

    # point in time: day-1 items at a day-1 time get day-1 vectors; a changed item its vector of the day
    noon_1, noon_2 = DAY_1 + timedelta(hours=12), DAY_2 + timedelta(hours=12)
    got = latents_at(store, features, [950, 950, 5, 1500, 1500], [noon_1, noon_2, noon_2, noon_1, noon_2])
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), vector_of(table, 950, "day-1"))
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), vector_of(table, 950, "day-2"))
    np.testing.assert_array_equal(np.asarray(got[2], np.float32), vector_of(table, 5, "day-1"))
    assert got[3] is None or (isinstance(got[3], float) and np.isnan(got[3]))  # not there yet on day 1
    np.testing.assert_array_equal(np.asarray(got[4], np.float32), vector_of(table, 1500, "day-2"))

    # a re-run of day 1 changes nothing: no commit, nothing written online
    again = embed_day("day-1", DAY_1)
    assert not again.committed and again.snapshot_id == first.snapshot_id != second.snapshot_id
    assert publish_item()["rows"] == 0

    # a second entity set in the same repo: string keys, its own VAE, views and current service
    user_version, users = string_key_version(trained, tmp_path)
    embed(
        EmbedConfig(
            data=str(users),
            model_root=str(tmp_path / "user-models"),
            entity="user",
            feature_store_yaml=yaml_path,
        )
    )
    user_published = publish(PublishConfig(feature_repo=str(feature_repo), entity="user", verify_rows=64))
    assert (
        user_published["rows"] == 600
        and user_published["view"] == f"user_embeddings_{user_version.replace('-', '_')}"
    )
    store = FeatureStore(repo_path=str(feature_repo))
    user_rows = store.get_online_features(
        features=current_features(store, "user_embeddings_current"), entity_rows=[{"user_id": "u-00042"}]
    ).to_dict()
    users_table = catalog.read(catalog.table("user", user_version))
    np.testing.assert_array_equal(
        np.asarray(user_rows["latent"][0], np.float32),
        vector_of(users_table, "u-00042", users_table.column("batch_id")[0].as_py(), "user_id"),
    )
    assert user_rows["model_version"] == [user_version] and store.get_entity("user").join_key == "user_id"

    # `feast plan` / `feast apply` in the repo, as every Feast user runs them: no change, nothing deleted
    feast = str(Path(sys.executable).parent / "feast")
    for command in ("plan", "apply"):
        result = subprocess.run(
            [feast, command], cwd=feature_repo, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Deleted" not in result.stdout and "No changes to registry" in result.stdout, result.stdout
    store = FeatureStore(repo_path=str(feature_repo))
    assert {s.name for s in store.list_feature_services()} == {
        "item_embeddings_current",
        "user_embeddings_current",
    }
    assert fetch_online(store, features[0].split(":")[0], [950], "item_id")[0]["latent"] is not None

    # vaectl embeddings history: both batches and their snapshots; export as of day 1's snapshot
    history = cli.run_job("embeddings", ["history", "item", version, *flags(feature_store_yaml=yaml_path)])
    printed = capsys.readouterr().out
    assert [b["batch_id"] for b in history["batches"]] == ["day-1", "day-2"]
    assert "2 batch(es), 1,897 rows" in printed and "day-1" in printed and str(second.snapshot_id) in printed
    export = tmp_path / "day-1.parquet"
    cli.run_job(
        "embeddings",
        [
            "export",
            "item",
            version,
            *flags(as_of=str(first.snapshot_id), output=str(export), feature_store_yaml=yaml_path),
        ],
    )
    exported = pq.read_table(export)
    assert exported.num_rows == 1000 and set(exported.column("batch_id").to_pylist()) == {"day-1"}


def test_whole_snapshot_each_day_on_s3_with_redis(trained, redis_repo, s3_endpoint, tmp_path):
    """Day 2 re-embeds the whole changed snapshot (items 0-1199, 900-999 changed): online serves day 2,
    offline keeps day 1 at day-1 times; a late re-run of day 1 (a new run of the batch) lands, and the
    online store keeps each key's latest vector."""
    import s3fs
    from feast import FeatureStore

    feature_repo, _, _ = redis_repo
    bucket = f"vae-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(
        yaml_path.read_text().replace("warehouse: data/warehouse", f"warehouse: s3://{bucket}/tables")
    )
    table = pq.read_table(trained["data"]).drop_columns(["label"])
    changed = table.slice(900, 100).set_column(1, "pixels", table.slice(0, 100).column("pixels"))
    snapshots = {
        "day-1": table.slice(0, 1000),
        "day-2": pa.concat_tables([table.slice(0, 900), changed, table.slice(1000, 200)]),
    }
    for day, rows in snapshots.items():
        (tmp_path / day).mkdir()
        pq.write_table(rows, tmp_path / day / "items.parquet")

    def embed_day(day: str, when: datetime, **options):
        return embed(
            EmbedConfig(
                data=str(tmp_path / day),
                model_root=str(trained["model_root"]),
                batch=day,
                event_time=when,
                feature_store_yaml=str(yaml_path),
                **options,
            )
        )

    embed_day("day-1", DAY_1)
    publish(PublishConfig(feature_repo=str(feature_repo), verify_rows=32))
    embed_day("day-2", DAY_2)
    assert publish(PublishConfig(feature_repo=str(feature_repo), verify_rows=32))["version_keys"] == 1200
    # a late re-run of day 1 with another setting: a new run, one commit replacing the day-1 batch
    late = embed_day("day-1", DAY_1, batch_size=500)
    assert late.committed
    late_publish = publish(PublishConfig(feature_repo=str(feature_repo), verify_rows=32))
    assert late_publish["batches"] == ["day-1"] and late_publish["rows"] == 0  # day 2 is newer for every key

    catalog = catalog_of(feature_repo)
    stored = catalog.read(catalog.table("item", trained["version"]))
    assert stored.num_rows == 2200 and catalog.table("item", trained["version"]).location().startswith(
        "s3://"
    )
    store = FeatureStore(repo_path=str(feature_repo))
    features = current_features(store, "item_embeddings_current")
    online = fetch_online(store, features[0].split(":")[0], [5, 950, 1150], "item_id")
    for row in online:
        np.testing.assert_array_equal(
            np.asarray(row["latent"], np.float32), vector_of(stored, row["item_id"], "day-2")
        )
    noon_1 = DAY_1 + timedelta(hours=12)
    got = latents_at(store, features, [950, 5], [noon_1, noon_1])
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), vector_of(stored, 950, "day-1"))
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), vector_of(stored, 5, "day-1"))


def test_five_concurrent_publishers_with_the_defaults_and_a_reader(versions, feature_repo):
    """Four versions of `item` and a `user` set published at once by five processes with the default
    keep_online (2), while a reader follows item's current: every publisher succeeds (none retires a
    version another is writing), every version is online and whole or retired whole, current and
    previous stay online, the reader never fails, and the registry ends as the catalog records."""
    from feast import FeatureStore

    v1, v2, v3 = versions["names"]
    repo = EmbeddingsRepo(feature_repo)
    rows = repo.catalog.read(repo.catalog.table("item", v1))
    users = repo.catalog.register("user", "user_id", "string")
    from conftest import commit_rows

    from vae.embeddings import contract

    user_table = repo.catalog.create_table(users, "user-v1", contract.schema("user_id", pa.string()), {})
    keys = pa.array([f"u-{k}" for k in rows.column("item_id").to_pylist()], pa.string())
    commit_rows(
        repo.catalog, user_table, rows.drop_columns(["item_id"]).add_column(0, "user_id", keys), "day-1"
    )
    v4 = "item-v4"  # a fourth version of item: v1's rows in a table of its own
    v4_table = repo.catalog.create_table(
        repo.catalog.entity_set("item"), v4, contract.schema("item_id", pa.int64()), {}
    )
    commit_rows(
        repo.catalog,
        v4_table,
        rows.set_column(
            rows.schema.get_field_index("model_version"), "model_version", pa.array([v4] * rows.num_rows)
        ),
        "day-1",
    )
    publish(PublishConfig(feature_repo=str(feature_repo), model_version=v1, verify_rows=0))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    base = vaectl_command("publish", "--feature-repo", str(feature_repo), "--verify-rows", "16")
    commands = [
        # paused after recording v2 written, before it is done with it: the others' retires run meanwhile
        [*base, "--model-version", v2, "--switch-current", "false", "--show", "5"],
        [*base, "--model-version", v3],
        [*base, "--model-version", v1],
        [*base, "--entity", "user", "--model-version", "user-v1", "--switch-current", "false"],
        [*base, "--model-version", v4, "--switch-current", "false"],
    ]
    reader = FeatureStore(repo_path=str(feature_repo))
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_loop() -> None:
        while not stop.is_set():
            try:
                features = current_features(reader, "item_embeddings_current")
                response = reader.get_online_features(
                    features=features, entity_rows=[{"item_id": 7}]
                ).to_dict()
                assert response["latent"][0] is not None
            except BaseException as error:  # noqa: BLE001 (reported by the main thread)
                errors.append(error)
                return

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        paused = {**env, "VAE_PAUSE_AT": "publish.recorded_written=12"}
        processes = [
            subprocess.Popen(
                c, env=paused if v2 in c else env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for c in commands
        ]
        results = [(p.wait(timeout=400), p.stderr.read()) for p in processes]
    finally:
        stop.set()
        thread.join(timeout=30)
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert not errors, errors[0]
    store = FeatureStore(repo_path=str(feature_repo))
    from feast_embeddings.verify import online_row_count

    state = repo.publication("item")
    assert state.current in {v1, v3} and state.previous in {v1, v2, v3} and not state.writing
    online = [v for v in (v1, v2, v3, v4) if state.online[v]]
    assert {state.current, state.previous} <= set(online) and len(online) <= 3  # keep_online 2 + the pins
    for entity, version in [*(("item", v) for v in online), ("user", "user-v1")]:
        view = store.get_feature_view(repo.version_view_name(entity, version))
        assert view.online and online_row_count(store, view) == 1797, (entity, version)
    for version in {v1, v2, v3, v4} - set(online):  # retired whole: view offline, online table gone
        assert not store.get_feature_view(repo.version_view_name("item", version)).online
    assert repo.publication("user").online == {"user-v1": True}
    # the registry is what the catalog records: current services point where the catalog says
    service = store.get_feature_service("item_embeddings_current")
    assert service.tags["vae_model_version"] == state.current
