"""Publishing into a real Feast repo (SQLite online store, DuckDB offline store, file registry):
versions pinned online and offline, the "current" alias switched atomically, rollback, keep N online."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import T3, version_rows
from helpers.cli import vaectl_command

import ray_jobs.publish
from feast_embeddings import current_features, fetch_online
from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.versions import current_version
from ray_jobs.config import PublishConfig
from ray_jobs.publish import publish
from vae import InputError

CURRENT = "item_embeddings_current"
REPO = Path(__file__).resolve().parents[2]


def config(versions, feature_repo, **options) -> PublishConfig:
    return PublishConfig(feature_repo=str(feature_repo), model_root=str(versions["model_root"]), **options)


def load_repo(feature_repo):
    """The repo as publish opens it (feature_store.yaml, features.py, the embeddings catalog)."""
    return EmbeddingsRepo(feature_repo)


def online_tables(feature_repo) -> dict[str, list]:
    """Every row of every table of the repo's SQLite online store."""
    with sqlite3.connect(feature_repo / "data" / "online_store.db") as connection:
        names = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: sorted(connection.execute(f'SELECT * FROM "{name}"').fetchall()) for name in names}


def read_current(store, repo, keys) -> list[dict]:
    """What a consumer that follows "current" does (README): the service resolved to references once
    per request."""
    response = store.get_online_features(
        features=current_features(store, CURRENT), entity_rows=[{"item_id": k} for k in keys]
    )
    columns = response.to_dict()
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def test_pinned_versions_current_alias_and_rollback(versions, feature_repo):
    from feast import FeatureStore

    v1, v2, _ = versions["names"]
    repo = load_repo(feature_repo)
    first = publish(config(versions, feature_repo, model_version=v1, verify_rows=64))
    assert first["rows"] == 1797 and first["view"] == repo.version_view_name("item", v1)
    store = FeatureStore(repo_path=str(feature_repo))

    # every vector of the pinned view equals the Parquet row and carries its model version
    expected = version_rows(feature_repo, v1)
    fetched = fetch_online(store, first["view"], list(range(1797)), "item_id")
    assert [row["model_version"] for row in fetched] == [v1] * 1797
    for row in fetched[::97]:
        np.testing.assert_array_equal(
            np.asarray(row["latent"], np.float32),
            np.asarray(expected.loc[row["item_id"], "latent"], np.float32),
        )

    publish(config(versions, feature_repo, model_version=v2, verify_rows=16))
    assert {row["model_version"] for row in read_current(store, repo, range(50))} == {v2}
    still = fetch_online(store, repo.version_view_name("item", v1), [5], "item_id")[
        0
    ]  # v1 stays pinned and online
    assert still["model_version"] == v1 and still["latent"] is not None

    resolved_before_rollback = current_features(store, CURRENT)
    stored_before_rollback = online_tables(feature_repo)
    rolled = publish(config(versions, feature_repo, rollback=True))
    assert rolled["model_version"] == v1
    # a switch only: nothing re-encoded, not one row of the online store written or removed
    assert online_tables(feature_repo) == stored_before_rollback and len(stored_before_rollback) == 2
    current = read_current(store, repo, range(50))
    assert {row["model_version"] for row in current} == {v1}
    np.testing.assert_array_equal(
        np.asarray(current[7]["latent"], np.float32), np.asarray(expected.loc[7, "latent"], np.float32)
    )
    # a request resolved before the switch is served whole from the version it resolved (Feast's own
    # features=FeatureService path raises FeatureViewNotFoundException when a switch lands mid-request)
    stale = store.get_online_features(
        features=resolved_before_rollback, entity_rows=[{"item_id": 3}]
    ).to_dict()
    assert stale["model_version"] == [v2] and stale["latent"][0] is not None
    # run again, a rollback rolls back once (never toggles back to v2); forward again is named
    assert publish(config(versions, feature_repo, rollback=True))["model_version"] == v1
    assert current_version(repo, "item") == v1
    assert publish(config(versions, feature_repo, model_version=v2, verify_rows=0))["rows"] == 0
    assert current_version(repo, "item") == v2


def test_a_rollback_killed_between_the_record_and_feast_is_finished_by_its_retry(versions, feature_repo):
    """SIGKILL after the publication record says v1, before Feast's registry does: the documented retry
    (the same command) finishes the rollback to v1; it does not toggle back to v2."""
    from feast_embeddings.versions import serving_in_registry

    v1, v2, _ = versions["names"]
    publish(config(versions, feature_repo, model_version=v1, verify_rows=0))
    publish(config(versions, feature_repo, model_version=v2, verify_rows=0))
    command = vaectl_command("publish", "--feature-repo", str(feature_repo), "--rollback")
    killed = subprocess.run(
        command, env={**os.environ, "VAE_KILL_AT": "publish.recorded"}, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    repo = load_repo(feature_repo)
    assert current_version(repo, "item") == v1  # the record switched...
    assert serving_in_registry(repo, "item") == repo.version_view_name("item", v2)  # ...Feast did not yet
    retried = subprocess.run(command, capture_output=True, text=True)
    assert retried.returncode == 0, retried.stderr[-2000:]
    repo = load_repo(feature_repo)
    assert current_version(repo, "item") == v1
    assert serving_in_registry(repo, "item") == repo.version_view_name("item", v1)


def test_a_retire_killed_before_the_drop_is_finished_by_the_next_publish(versions, feature_repo):
    """SIGKILL after the record takes v1 out of service, before its online rows are dropped: v1 reads
    as offline at once, and the re-run drops its rows and records it as retired."""
    v1, v2, v3 = versions["names"]
    for name in (v1, v2):
        publish(config(versions, feature_repo, model_version=name, keep_online=2, verify_rows=0))
    command = vaectl_command(
        "publish",
        *("--feature-repo", str(feature_repo), "--model-root", str(versions["model_root"])),
        *("--model-version", v3, "--keep-online", "2", "--verify-rows", "0"),
    )
    killed = subprocess.run(
        command, env={**os.environ, "VAE_KILL_AT": "publish.retiring"}, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    repo = load_repo(feature_repo)
    v1_table = next(
        name for name in online_tables(feature_repo) if repo.version_view_name("item", v1) in name
    )
    assert len(online_tables(feature_repo)[v1_table]) > 0  # killed before the drop
    assert repo.publication("item").retiring == [v1] and not repo.publication("item").online[v1]
    retried = subprocess.run(command, capture_output=True, text=True)
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert v1_table not in online_tables(feature_repo)
    state = load_repo(feature_repo).publication("item")
    assert state.retiring == [] and state.online == {v1: False, v2: True, v3: True}


def test_a_reader_of_current_never_mixes_versions_during_publish_and_rollback(versions, feature_repo):
    from feast import FeatureStore

    v1, v2, _ = versions["names"]
    repo = load_repo(feature_repo)
    publish(config(versions, feature_repo, model_version=v1, verify_rows=0))
    reader = FeatureStore(repo_path=str(feature_repo))  # its own registry cache, as a model server has
    seen: list[set] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_loop() -> None:
        while not stop.is_set():
            try:
                rows = read_current(reader, repo, range(0, 1797, 18))
                assert all(row["latent"] is not None for row in rows)
                seen.append({row["model_version"] for row in rows})
            except BaseException as error:  # noqa: BLE001 (reported by the main thread)
                errors.append(error)
                return

    def seconds_until_reader_sees(version: str) -> float:
        switched = time.monotonic()
        while not (seen and seen[-1] == {version}) and not errors and time.monotonic() - switched < 10:
            time.sleep(0.05)
        return time.monotonic() - switched

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        publish(config(versions, feature_repo, model_version=v2, verify_rows=0))
        to_v2 = seconds_until_reader_sees(v2)
        publish(config(versions, feature_repo, rollback=True))
        to_v1 = seconds_until_reader_sees(v1)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors[0]
    assert len(seen) > 20 and all(len(versions_in_response) == 1 for versions_in_response in seen)
    # the reader's registry cache (TTL 2 s) picks up the switch and the rollback within seconds
    assert to_v2 < 5 and to_v1 < 5 and seen[-1] == {v1}


def test_keep_online_drops_old_versions_online_only(versions, feature_repo):
    from feast import FeatureStore

    v1, v2, v3 = versions["names"]
    for name in (v1, v2, v3):
        summary = publish(config(versions, feature_repo, model_version=name, keep_online=2, verify_rows=0))
    assert summary["retired"] == [v1]
    store = FeatureStore(repo_path=str(feature_repo))
    repo = load_repo(feature_repo)
    assert not store.get_feature_view(repo.version_view_name("item", v1)).online
    assert store.get_feature_view(repo.version_view_name("item", v2)).online
    # v1's online rows are gone (its table dropped), while v2 and v3 still read back their own vectors
    tables = online_tables(feature_repo)
    assert len(tables) == 2 and all(len(rows) == 6 * 1797 for rows in tables.values())
    assert not any(repo.version_view_name("item", v1) in name for name in tables)
    for name in (v2, v3):
        expected = version_rows(feature_repo, name)
        for row in fetch_online(store, repo.version_view_name("item", name), [3, 500, 1796], "item_id"):
            assert row["model_version"] == name
            np.testing.assert_array_equal(
                np.asarray(row["latent"], np.float32),
                np.asarray(expected.loc[row["item_id"], "latent"], np.float32),
            )
    # a version published without switching never pushes out the one a rollback returns to (v2), nor is
    # itself retired by its own publish: all three stay online
    pinned = publish(config(versions, feature_repo, model_version=v1, switch_current=False, keep_online=2))
    assert pinned["retired"] == [] and load_repo(feature_repo).publication("item").previous == v2
    # rollback to v2 still works; retrieval pinned to v1 offline still reads its vectors
    assert publish(config(versions, feature_repo, rollback=True))["model_version"] == v2
    entity_df = pd.DataFrame({"item_id": [3, 7], "event_timestamp": [T3, T3]})
    offline = store.get_historical_features(
        entity_df=entity_df, features=[f"{repo.version_view_name('item', v1)}:model_version"]
    ).to_df()
    assert offline["model_version"].tolist() == [v1, v1]
    publish(
        config(versions, feature_repo, model_version=v3, verify_rows=0, keep_online=2)
    )  # v1 retired again
    with pytest.raises(InputError, match="not in the online store any more"):
        from feast_embeddings.versions import switch_current

        switch_current(EmbeddingsRepo(feature_repo), "item", v1)


def test_point_in_time_retrieval_around_a_switch(versions, feature_repo):
    from feast import FeatureStore

    v1, v2, _ = versions["names"]
    repo = load_repo(feature_repo)
    publish(config(versions, feature_repo, model_version=v1, verify_rows=0))
    publish(config(versions, feature_repo, model_version=v2, verify_rows=0))
    store = FeatureStore(repo_path=str(feature_repo))
    times = [
        datetime(2025, 12, 1, tzinfo=UTC),
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 7, 1, tzinfo=UTC),
    ]
    entity_df = pd.DataFrame({"item_id": [11, 11, 11], "event_timestamp": times})

    def versions_at(features) -> list:
        frame = (
            store.get_historical_features(entity_df=entity_df, features=features)
            .to_df()
            .sort_values("event_timestamp")
        )
        return [None if pd.isna(v) else v for v in frame["model_version"]]

    # no all-versions view: a training set is built from one version's coordinates
    assert not [view for view in store.list_feature_views() if view.name == "item_embeddings"]
    # pinned v1 offline: v1 from T1 on, whatever is current
    assert versions_at([f"{repo.version_view_name('item', v1)}:model_version"]) == [None, v1, v1]
    # the current service (v2) offline: only from T2 on
    assert versions_at(current_features(store, CURRENT)) == [None, None, v2]
    frame = store.get_historical_features(
        entity_df=entity_df.iloc[[2]], features=[f"{repo.version_view_name('item', v2)}:latent"]
    ).to_df()
    np.testing.assert_array_equal(
        np.asarray(frame["latent"].iloc[0], np.float32),
        np.asarray(version_rows(feature_repo, v2).loc[11, "latent"], np.float32),
    )


def test_missing_embeddings_and_nothing_to_roll_back_are_clear_errors(feature_repo):
    with pytest.raises(InputError, match="no embeddings for entity 'item' in catalog sqlite:///"):
        publish(PublishConfig(feature_repo=str(feature_repo)))
    with pytest.raises(InputError, match="nothing to roll back"):
        publish(PublishConfig(feature_repo=str(feature_repo), rollback=True))
    with pytest.raises(InputError, match="no embeddings for entity 'user'"):
        publish(PublishConfig(feature_repo=str(feature_repo), entity="user", model_version="v1"))


def test_publish_refuses_a_write_that_left_keys_out_and_switches_nothing(versions, feature_repo, monkeypatch):
    """Every written key is read back from the store: a writer that reports every row but wrote fewer is
    caught, naming a missing key."""
    v1, v2, _ = versions["names"]
    publish(config(versions, feature_repo, model_version=v1, verify_rows=0))
    real_write = ray_jobs.publish.write_table

    def drops_rows(store, view, table, join_key, batch_rows):
        real_write(store, view, table.slice(0, table.num_rows - 10), join_key, batch_rows)
        return table.num_rows  # claims all of them

    monkeypatch.setattr(ray_jobs.publish, "write_table", drops_rows)
    with pytest.raises(
        RuntimeError,
        match=r"did not complete: 10 of 1797 keys written do not hold their rows \(e\.g\. item_id=\d+\)",
    ):
        publish(config(versions, feature_repo, model_version=v2, verify_rows=0))
    assert current_version(EmbeddingsRepo(feature_repo)) == v1


def test_publish_refuses_vectors_that_read_back_wrong_and_switches_nothing(
    versions, feature_repo, monkeypatch
):
    """The read-back compares bit for bit: one vector off by 1e-3 in a sample of all rows is caught."""
    v1, v2, _ = versions["names"]
    publish(config(versions, feature_repo, model_version=v1, verify_rows=0))
    real_write = ray_jobs.publish.write_table

    def corrupts_one(store, view, table, join_key, batch_rows):
        latent = table.column("latent").combine_chunks()
        values = latent.values.to_numpy().copy()
        values[:3] += 1e-3  # the first row's vector
        wrong = pa.ListArray.from_arrays(latent.offsets, pa.array(values))
        return real_write(
            store,
            view,
            table.set_column(table.schema.get_field_index("latent"), "latent", wrong),
            join_key,
            batch_rows,
        )

    monkeypatch.setattr(ray_jobs.publish, "write_table", corrupts_one)
    with pytest.raises(RuntimeError, match="publish verification failed: item_id=0 reads back"):
        publish(config(versions, feature_repo, model_version=v2, verify_rows=1797))
    assert current_version(EmbeddingsRepo(feature_repo)) == v1


CONSUMER = """
import sys
import pandas as pd
from feast import FeatureStore
from feast_embeddings import current_features

store = FeatureStore(repo_path=sys.argv[1])
features = current_features(store, "item_embeddings_current")
online = store.get_online_features(features=features, entity_rows=[{"item_id": 1}, {"item_id": 2}]).to_dict()
entity_df = pd.DataFrame({"item_id": [1, 2], "event_timestamp": pd.Timestamp.now(tz="UTC")})
offline = store.get_historical_features(entity_df=entity_df, features=features).to_df()
print(online["model_version"][0], len(offline))
"""


def test_a_consumer_of_the_repo_sees_nothing_but_its_features(versions, feature_repo, tmp_path):
    """A downstream process that reads the repo the plain Feast way, without MLflow configured: its
    output is its features, nothing on stderr (no warning from Feast, pydantic or MLflow)."""
    import os
    import subprocess

    v1 = versions["names"][0]
    publish(config(versions, feature_repo, model_version=v1, verify_rows=0, show=0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(feature_repo)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [v1, "2"]
    assert result.stderr == "", result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
