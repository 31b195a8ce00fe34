"""The daily pipeline (`vaectl pipeline`) over a simulated month, on a real local Ray cluster, real
Iceberg tables and Feast (SQLite online store, DuckDB offline): 30 daily batches of new items, a
planted shift from day 12, a broken challenger on the first retrain, a planted regression after the
first switch, and three planted crashes that a re-run must finish (benchmarks/month.py)."""

import logging
import os

import numpy as np
import pyarrow as pa
import pytest

from benchmarks.month import SHIFT_DAY, simulate, summary
from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.versions import current_features
from ray_jobs.config import PipelineConfig
from vae.pipeline.decisions import DecisionLog

log = logging.getLogger("tests.pipeline")
K = 2  # drift_batches of the month's settings


@pytest.fixture(scope="module")
def month(ray_cluster, tmp_path_factory):
    from conftest import REPO

    work = tmp_path_factory.mktemp("month")
    feature_repo = work / "feature_repo"
    feature_repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        (feature_repo / name).write_text((REPO / "feature_repo" / name).read_text())
    # crashes: day 3 after embedding and monitoring, before publishing; day 14 (the good retrain)
    # after training and backfilling, before the gate and the switch; day 17 (the retrain after the
    # rollback) just after "current" switched, before the switch is logged
    crashes = {3: "publish_version", 14: "gate_challenger", 17: "switch_current:after"}
    # the registry of record on the month's own SQLite store, through the repo's mlflow block
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    try:
        result = simulate(work, feature_repo, crashes=crashes)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    figures = summary(result)
    log.warning("simulated month: %s", figures)
    return {"month": result, "figures": figures, "work": work, "repo": feature_repo}


def test_retrain_refuse_switch_rollback_in_order(month):
    result, figures = month["month"], month["figures"]
    # no retrain and no drift alarm over the null days (day 1 trains the first version)
    assert figures["false_retrains_null_days"] == 0 and figures["drift_seen_null_days"] == 0
    # the shift is acted on within K batches
    assert SHIFT_DAY <= figures["first_retrain_day"] <= SHIFT_DAY + K - 1
    # the broken challenger is refused, for collapse, and "current" does not move
    refused = figures["refused_days"]
    assert refused == [figures["first_retrain_day"]]
    first = result.current[1]
    assert result.current[refused[0]] == first
    decisions = DecisionLog(EmbeddingsRepo(month["repo"]).catalog, "item").read()
    refusal = next(d for d in decisions if d.kind == "challenger_refused")
    assert "collapse" in refusal.reason and refusal.detail["report"].endswith("report.html")
    # a good challenger switches; the regression two days later rolls it back to the first version
    switched = [day for day in figures["switched_days"] if day > 1]
    assert switched and switched[0] > refused[0]
    assert result.current[switched[0]] not in (first, refusal.model_version)
    assert figures["rolled_back_days"][0] == result.regression_day == switched[0] + 2
    assert result.current[result.regression_day] == first
    rollback = next(d for d in decisions if d.kind == "rolled_back")
    assert rollback.model_version == result.current[switched[0]] and rollback.detail["to"] == first
    assert "own reference" in rollback.reason
    # retrained again afterwards; that version holds to the end of the month
    final = result.current[30]
    assert final not in (first, rollback.model_version) and not [
        day for day in figures["rolled_back_days"] if day > result.regression_day
    ]
    # the crashed steps were finished by their re-run: the day-14 challenger was trained once, the
    # day-17 switch was logged once
    assert set(result.crashed) == {3, 14, 17}
    day_17 = [d for d in decisions if d.batch_id == "day-17" and d.kind == "switched"]
    assert len(day_17) == 1 and day_17[0].reason == "logged by the re-run of the step that switched"
    assert day_17[0].detail["from"] == first
    assert "published" in result.decisions[3]
    trained = [d for d in decisions if d.kind == "challenger_trained"]
    assert len(trained) == len(figures["switched_days"]) + len(refused)
    assert len({d.model_version for d in trained}) == len(trained)


def test_nothing_is_lost_offline_or_online(month):
    result = month["month"]
    repo = EmbeddingsRepo(month["repo"])
    catalog = repo.catalog
    decisions = DecisionLog(catalog, "item").read()
    # offline: every batch each version embedded holds all of that day's items under the version
    embedded = {(d.batch_id, d.model_version) for d in decisions if d.kind == "embedded"}
    for version in catalog.versions("item"):
        batches = {b.batch_id: b.rows for b in catalog.batches(catalog.table("item", version))}
        for batch, by in embedded:
            if by == version:
                assert batches.get(batch) == 1000, (version, batch)
    # online: every item of the month, under the version "current" points at
    final = result.current[30]
    assert repo.publication("item").current == final
    features = current_features(repo.store, "item_embeddings_current")
    keys = [day * 100_000 + i for day in range(1, 31) for i in range(1000)]
    for start in range(0, len(keys), 5000):
        chunk = keys[start : start + 5000]
        online = repo.store.get_online_features(features, [{"item_id": k} for k in chunk]).to_dict()
        assert set(online["model_version"]) == {final}, f"items {chunk[0]}.. not all under {final}"
        assert all(latent is not None and len(latent) == 4 for latent in online["latent"])
    # and equal to the version's table
    table = catalog.read(catalog.table("item", final), ["item_id", "latent"]).sort_by("item_id")
    some = table.slice(0, 50)
    online = repo.store.get_online_features(
        features, [{"item_id": k} for k in some.column("item_id").to_pylist()]
    ).to_dict()
    expected = np.stack(some.column("latent").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.array(online["latent"]), expected, rtol=1e-6)


def test_a_rerun_of_a_finished_day_changes_nothing(month):
    import ray_jobs.pipeline as pipeline
    from benchmarks.month import START, pipeline_options

    work, repo = month["work"], month["repo"]
    catalog = EmbeddingsRepo(repo).catalog
    before = len(DecisionLog(catalog, "item").read())
    snapshots = {v: catalog.table("item", v).current_snapshot().snapshot_id for v in catalog.versions("item")}
    config = PipelineConfig(
        **pipeline_options(work, repo),
        data=str(month["month"].data[30]),
        event_time=START + pa.scalar(30 * 86400, pa.duration("s")).as_py(),
    )
    again = pipeline.step(config)
    assert again.exit_code == 0, "day 30 is a quiet day"
    assert [d.kind for d in again.decisions] == month["month"].decisions[30]
    assert len(DecisionLog(catalog, "item").read()) == before, "a re-run appends no decision"
    after = {v: catalog.table("item", v).current_snapshot().snapshot_id for v in catalog.versions("item")}
    assert after == snapshots, "a re-run commits nothing"


def test_mlflow_aliases_follow_the_month(month):
    """@champion ends where "current" does; every challenger is registered (a trained one with its
    run: one run per training, none duplicated by the crashes' re-runs); the refused one is tagged."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{month['work']}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    result = month["month"]
    champion = client.get_model_version_by_alias("vae-item", "champion")
    assert champion.tags["vae.model_version"] == result.current[30]
    decisions = DecisionLog(EmbeddingsRepo(month["repo"]).catalog, "item").read()
    trained = [d.model_version for d in decisions if d.kind == "challenger_trained"]
    runs = client.search_runs([client.get_experiment_by_name("vae-item").experiment_id])
    assert len(runs) == len(trained) and all(r.info.status == "FINISHED" for r in runs)
    registered = {v.tags["vae.model_version"]: v for v in client.search_model_versions("name = 'vae-item'")}
    assert set(trained) <= set(registered)
    refused = next(d.model_version for d in decisions if d.kind == "challenger_refused")
    assert registered[refused].tags["vae.gate"] == "refused"
    run_ids = {r.info.run_id for r in runs}
    assert all(registered[v].run_id in run_ids for v in trained if v != refused)  # the broken one: no run
    if any(d.kind == "switched" and d.model_version == trained[-1] for d in decisions):
        # the last challenger became champion: no @challenger left
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias("vae-item", "challenger")
