"""MLflow as the registry of record, on a real SQLite tracking store (the embedded default) and a real
MLflow tracking server over HTTP on 127.0.0.1: tracked training runs, registered versions, @champion
moving with Feast's "current", models:/ URIs in embed, the pyfunc model, lineage from a downstream run,
and a tracking outage."""

import hashlib
import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO, version_rows
from helpers.servers import free_port

from feast_embeddings.repo import EmbeddingsRepo
from ray_jobs.config import EmbedConfig, PublishConfig
from ray_jobs.embed import embed
from ray_jobs.publish import publish
from ray_jobs.train import train
from vae import InputError, encode_matrix, features_to_numpy, load_model_version, read_model_version_info
from vae.versions.mlflow_registry import PATH_TAG, VERSION_TAG

MODEL = "vae-item"
DAY1 = datetime(2026, 11, 1, tzinfo=UTC)


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _copy_repo(target: Path) -> Path:
    target.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(REPO / "feature_repo" / name, target / name)
    return target


@pytest.fixture(scope="module")
def world(trained, tmp_path_factory):
    """MLFLOW_TRACKING_URI on a SQLite store; one version trained tracked, one trained untracked (the
    session's, copied); both embedded as batch day1 into a repo whose mlflow block is the project's;
    the tracked one published as current."""
    work = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{work}/mlflow.db"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        repo = _copy_repo(work / "feature_repo")
        models = work / "models"
        config = trained["config"].model_copy(
            update={"seed": 1, "model_root": str(models), "storage_path": str(work / "ray_results")}
        )
        tracked = train(config)
        untracked_root = work / "untracked"
        shutil.copytree(trained["model_root"] / trained["version"], untracked_root / trained["version"])
        for root, version in ((models, tracked), (untracked_root, trained["version"])):
            embed(_embed_config(repo, root, version, trained["data"], "day1"))
        publish(PublishConfig(feature_repo=str(repo), model_version=tracked, force=True, show=0))
        yield {
            "uri": uri,
            "repo": repo,
            "models": models,
            "tracked": tracked,
            "untracked": trained["version"],
            "untracked_root": untracked_root,
            "data": trained["data"],
            "config": config,
        }
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def with_mlflow_block(yaml_text: str) -> str:
    """The project's feature_store.yaml with its mlflow block uncommented."""
    block = "# mlflow:\n#     enabled: true\n#     tracking_uri: ${MLFLOW_TRACKING_URI}\n"
    assert block in yaml_text
    return yaml_text.replace(block, block.replace("# ", ""))


def _embed_config(repo: Path, model_root, model_version: str, data, batch: str) -> EmbedConfig:
    return EmbedConfig(
        data=str(data),
        model_root=str(model_root),
        model_version=model_version,
        feature_store_yaml=str(repo / "feature_store.yaml"),
        batch=batch,
        event_time=DAY1,
        in_process_rows=1_000_000,
    )


def _champion(world) -> str:
    found = _client(world["uri"]).get_model_version_by_alias(MODEL, "champion")
    return found.tags[VERSION_TAG]


def _current(world) -> str:
    return EmbeddingsRepo(world["repo"]).publication("item").current


def test_a_training_run_is_tracked_and_its_version_registered(world, tmp_path):
    client, tracked = _client(world["uri"]), world["tracked"]
    info = read_model_version_info(world["models"], tracked)
    metadata, history = info.metadata, info.metadata["metrics"]["history"]
    experiment = client.get_experiment_by_name(MODEL)
    runs = client.search_runs([experiment.experiment_id])
    run = next(r for r in runs if r.data.tags.get(VERSION_TAG) == tracked)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["vae.ray_run"] == f"{world['config'].storage_path}/{run.info.run_name}"
    # the whole config as parameters
    assert run.data.params["latent_dim"] == "8" and run.data.params["seed"] == "1"
    assert run.data.params["data"] == str(world["data"]) and run.data.params["entity"] == "item"
    # per-epoch metrics from rank 0, equal to the run's own history
    elbo = client.get_metric_history(run_id, "val_negative_elbo")
    assert [m.step for m in elbo] == [h["epoch"] for h in history]
    assert [m.value for m in elbo] == pytest.approx([h["val_negative_elbo"] for h in history])
    for i in range(8):
        kl = client.get_metric_history(run_id, f"kl_per_dim/{i}")
        assert [m.value for m in kl] == pytest.approx([h["val_kl_per_dim"][i] for h in history])
    for name in ("val_reconstruction", "val_kl", "active_units", "beta", "lr", "samples_per_second"):
        assert len(client.get_metric_history(run_id, name)) == len(history), name
    assert run.data.metrics["iw_nll"] == pytest.approx(metadata["metrics"]["iw_nll"])
    # identity as tags, the report and model.json as artifacts
    assert run.data.tags["vae.data_fingerprint"] == metadata["data"]["fingerprint"]
    assert run.data.tags["vae.code_version"] == metadata["code_version"]
    assert {a.path for a in client.list_artifacts(run_id)} == {"model.json", "report"}
    assert sorted(Path(a.path).name for a in client.list_artifacts(run_id, "report")) == metadata["report"]
    downloaded = client.download_artifacts(run_id, "model.json", str(tmp_path))
    assert json.loads(Path(downloaded).read_text()) == metadata
    # registered, linked to the run, its source the version folder
    registered = client.search_model_versions(f"name = '{MODEL}' and tags.`{VERSION_TAG}` = '{tracked}'")
    assert len(registered) == 1 and registered[0].run_id == run_id
    assert registered[0].tags[PATH_TAG] == info.path and registered[0].source == Path(info.path).as_uri()


def test_publish_moves_champion_with_current_and_rollback_moves_it_back(world):
    assert _champion(world) == _current(world) == world["tracked"]
    untracked = world["untracked"]
    publish(PublishConfig(feature_repo=str(world["repo"]), model_version=untracked, force=True, show=0))
    assert _champion(world) == _current(world) == untracked
    # trained without tracking: registered by the publish, from its folder, with no run
    registered = _client(world["uri"]).get_model_version_by_alias(MODEL, "champion")
    assert not registered.run_id and registered.tags[PATH_TAG] == str(world["untracked_root"] / untracked)
    publish(PublishConfig(feature_repo=str(world["repo"]), rollback=True))
    assert _champion(world) == _current(world) == world["tracked"]


def test_an_alias_moved_by_hand_stops_publish_until_a_person_decides(world):
    client, repo = _client(world["uri"]), world["repo"]
    untracked = world["untracked"]
    number = client.search_model_versions(f"name = '{MODEL}' and tags.`{VERSION_TAG}` = '{untracked}'")[0]
    client.set_registered_model_alias(MODEL, "champion", number.version)
    before = EmbeddingsRepo(repo).publication("item")
    with pytest.raises(InputError, match=f"disagree.*{MODEL}@champion is {untracked}.*current is"):
        publish(PublishConfig(feature_repo=str(repo), model_version=world["tracked"], show=0))
    assert EmbeddingsRepo(repo).publication("item") == before  # nothing changed
    # serving what the alias names is what the message says to do: it proceeds
    publish(PublishConfig(feature_repo=str(repo), model_version=untracked, force=True, show=0))
    assert _current(world) == _champion(world) == untracked
    publish(PublishConfig(feature_repo=str(repo), model_version=world["tracked"], force=True, show=0))
    assert _current(world) == _champion(world) == world["tracked"]


def test_embed_takes_a_registry_uri(world):
    repo, data = world["repo"], world["data"]
    by_alias = embed(_embed_config(repo, "nowhere", "models:/vae-item@champion", data, "day2"))
    assert by_alias.model_version == world["tracked"] and by_alias.embedded_rows == 1797
    number = _client(world["uri"]).get_model_version_by_alias(MODEL, "champion").version
    by_number = embed(_embed_config(repo, "nowhere", f"models:/vae-item/{number}", data, "day2"))
    assert by_number.model_version == world["tracked"] and not by_number.committed  # the same run
    with pytest.raises(InputError, match="models:/vae-item@nosuch: not found in MLflow"):
        embed(_embed_config(repo, "nowhere", "models:/vae-item@nosuch", data, "day3"))


def test_every_job_names_a_version_the_same_ways(world, capsys, monkeypatch):
    """'current', 'latest', a name and models:/ URIs, in embed, publish, monitor and embeddings alike."""
    from ray_jobs.cli import run_job
    from ray_jobs.config import MonitorConfig, parse_config
    from ray_jobs.monitor import monitor

    repo, data = world["repo"], world["data"]
    yaml_path = str(repo / "feature_store.yaml")
    current = embed(_embed_config(repo, world["models"], "current", data, "day-current"))
    assert current.model_version == world["tracked"] == _current(world)
    run_job("embeddings", ["history", "item", "models:/vae-item@champion", "--feature-store-yaml", yaml_path])
    assert "day-current" in capsys.readouterr().out
    options = ["--model-version", "models:/vae-item@champion", "--batch", "day-current"]
    options += ["--feature-store-yaml", yaml_path, "--model-root", str(world["models"])]
    report = monitor(parse_config(MonitorConfig, [*options, "--output", str(repo / "reports")], "monitor"))
    assert report["model_version"] == world["tracked"]
    # no registry to resolve a models:/ URI in: one line that says where to configure one
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(
        InputError, match=r"models:/vae-item@champion: no MLflow registry .* MLFLOW_TRACKING_URI"
    ):
        run_job(
            "embeddings", ["history", "item", "models:/vae-item@champion", "--feature-store-yaml", yaml_path]
        )
    # an entity set nothing of which is published has no current version
    empty = EmbedConfig(
        data=str(data),
        model_root=str(world["models"]),
        model_version="current",
        catalog=f"sqlite:///{repo}/e.db",
        warehouse=str(repo / "empty"),
        batch="d",
    )
    with pytest.raises(InputError, match="entity 'item' has no current version yet; publish one"):
        embed(empty)


def test_the_pyfunc_model_predicts_what_embed_wrote(world):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/vae-item@champion")
    frame = pq.read_table(world["data"]).to_pandas().head(300)
    predicted = model.predict(frame)
    rows = version_rows(world["repo"], world["tracked"]).reset_index()
    rows = rows[rows.batch_id == "day1"].set_index("item_id").loc[frame.item_id]
    assert (predicted.item_id.to_numpy() == frame.item_id.to_numpy()).all()
    np.testing.assert_allclose(np.stack(predicted.latent), np.stack(rows.latent), atol=1e-6)
    np.testing.assert_allclose(predicted.anomaly_score, rows.anomaly_score, rtol=1e-6)
    assert (predicted.is_anomaly.to_numpy() == rows.is_anomaly.to_numpy()).all()
    assert set(predicted.model_version) == {world["tracked"]}
    # models from code: the folder holds the code and the safetensors weights, no pickled object
    folder = world["models"] / world["tracked"]
    flavor = (folder / "MLmodel").read_text()
    assert "model_code_path" in flavor and "python_model.pkl" not in flavor
    assert not list(folder.rglob("*.pkl"))
    # a folder registered before the library's subpackages (and before manifests) runs the old copy of
    # the code: it still loads
    before = Path(world["models"]).parent / "registered-before" / world["tracked"]
    shutil.copytree(folder, before)
    shutil.copy(REPO / "tests" / "data" / "mlflow_pyfunc_before_subpackages.py", before / "mlflow_pyfunc.py")
    (before / "manifest.json").unlink()
    assert "from vae.artifacts import" in (before / "mlflow_pyfunc.py").read_text()
    again = mlflow.pyfunc.load_model(str(before)).predict(frame)
    np.testing.assert_array_equal(np.stack(again.latent), np.stack(predicted.latent))


def test_registering_covers_the_pyfunc_code_and_a_swapped_copy_never_runs(world, tmp_path):
    from vae.versions.manifest import ManifestError
    from vae.versions.mlflow_registry import add_pyfunc_files, load_pyfunc

    folder = world["models"] / world["tracked"]
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    for name in ("MLmodel", "mlflow_pyfunc.py", "python_env.yaml", "requirements.txt", "model.json"):
        assert listed[name] == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
    frame = pq.read_table(world["data"]).to_pandas().head(20)
    assert len(load_pyfunc("models:/vae-item@champion").predict(frame)) == 20
    # whoever can write to the folder swaps the code every consumer would run
    swapped = tmp_path / "models" / world["tracked"]
    shutil.copytree(folder, swapped)
    marker = tmp_path / "executed"
    code = swapped / "mlflow_pyfunc.py"
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    with pytest.raises(ManifestError, match="mlflow_pyfunc.py changed"):
        load_pyfunc(str(swapped))
    assert not marker.exists()
    with pytest.raises(ManifestError, match="mlflow_pyfunc.py changed"):
        add_pyfunc_files(str(swapped))  # registering again never keeps a different copy silently
    assert not marker.exists()


def test_lineage_from_a_downstream_run_back_to_the_vae_run(world, capsys):
    import mlflow
    from feast import FeatureStore

    from feast_embeddings.lineage import training_runs
    from feast_embeddings.versions import current_features
    from ray_jobs.cli import run_job

    repo = world["repo"]
    experiment = _client(world["uri"]).create_experiment("downstream-ranker")
    # a consumer whose feature_store.yaml has the mlflow block on (uncommented, as it says)
    consumer = repo / "consumer_feature_store.yaml"
    consumer.write_text(with_mlflow_block((repo / "feature_store.yaml").read_text()))
    with mlflow.start_run(experiment_id=experiment) as downstream:  # no global experiment left set
        store = FeatureStore(repo_path=str(repo), fs_yaml_file=consumer)  # Feast's own MLflow integration
        entity_df = pd.DataFrame({"item_id": [0, 1, 2], "event_timestamp": [datetime.now(UTC)] * 3})
        training = store.get_historical_features(
            entity_df, current_features(store, "item_embeddings_current")
        )
        assert training.to_df().latent.notna().all()
    found = training_runs(EmbeddingsRepo(repo), downstream.info.run_id)
    tracked_run = _client(world["uri"]).search_runs(
        [_client(world["uri"]).get_experiment_by_name(MODEL).experiment_id],
        filter_string=f"tags.`{VERSION_TAG}` = '{world['tracked']}'",
    )[0]
    assert [(f["model_version"], f["training_run"]) for f in found] == [
        (world["tracked"], tracked_run.info.run_id)
    ]
    run_job(
        "embeddings",
        [
            "lineage",
            "--run-id",
            downstream.info.run_id,
            "--feature-store-yaml",
            str(repo / "feature_store.yaml"),
        ],
    )
    assert f"trained by run {tracked_run.info.run_id}" in capsys.readouterr().out


def test_an_unreachable_tracking_server_is_one_line_and_training_goes_on(
    ray_cluster, trained, tmp_path, caplog
):
    uri = f"http://127.0.0.1:{free_port()}"
    config = trained["config"].model_copy(
        update={
            "epochs": 1,
            "iw_samples": 0,
            "report_rows": 0,
            "tracking_uri": uri,
            "model_root": str(tmp_path / "models"),
            "storage_path": str(tmp_path / "ray_results"),
        }
    )
    with caplog.at_level(logging.WARNING):
        version = train(config)
    assert load_model_version(tmp_path / "models", version).version == version
    lines = [r.getMessage() for r in caplog.records if "MLflow tracking at" in r.getMessage()]
    assert len(lines) == 1 and uri in lines[0] and "training continues untracked" in lines[0], lines
    started = time.monotonic()
    with pytest.raises(InputError, match=f"MLflow tracking at {uri}: .*failed"):
        train(config.model_copy(update={"tracking_required": True, "seed": 5}))
    assert time.monotonic() - started < 60


def test_a_version_on_s3_is_registered_where_it_is(world, s3_endpoint, monkeypatch):
    import mlflow
    import s3fs

    from vae import save_model_version
    from vae.versions.mlflow_registry import Registry

    bucket = f"vae-registry-{int(time.time() * 1000)}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    local = load_model_version(world["models"], world["tracked"])
    root = f"s3://{bucket}/models"
    version = save_model_version(
        root, local.model, local.normalizer, local.features, {}, {}, {"source": "test"}
    )
    registry = Registry(world["uri"])
    number = registry.register("vae-s3", version, f"{root}/{version}")
    registered = _client(world["uri"]).get_model_version("vae-s3", number)
    assert registered.source == f"{root}/{version}" and fs.exists(f"{bucket}/models/{version}/MLmodel")
    assert registry.resolve(f"models:/vae-s3/{number}") == (root, version)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)  # MLflow's S3 client: the same moto server
    frame = pq.read_table(world["data"]).to_pandas().head(20)
    predicted = mlflow.pyfunc.load_model(f"models:/vae-s3/{number}").predict(frame)
    expected, _ = encode_matrix(
        local.model, local.normalizer, features_to_numpy(pq.read_table(world["data"]), local.features)[:20]
    )
    np.testing.assert_allclose(np.stack(predicted.latent), expected, atol=1e-6)
