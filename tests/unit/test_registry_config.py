"""Where the MLflow registry is found (job option, MLFLOW_TRACKING_URI, feature_store.yaml's mlflow
block) and what rank 0 logs per epoch; the registry itself is tested against real stores in
tests/integration/test_registry.py."""

from pathlib import Path

import pytest

from feast_embeddings.settings import StoreSettings
from ray_jobs.config import PipelineConfig, TrainConfig
from vae import InputError
from vae.versions.mlflow_registry import epoch_metrics, registered_model_name, resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]


def test_the_option_wins_then_the_variable_then_nothing(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # the project's feature_store.yaml names ${MLFLOW_TRACKING_URI}: left unexpanded, it is unset
    assert resolve_tracking_uri("${MLFLOW_TRACKING_URI}") is None


def test_the_feature_stores_mlflow_block(monkeypatch, tmp_path):
    project_yaml = REPO / "feature_repo" / "feature_store.yaml"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert StoreSettings.read(project_yaml).tracking_uri is None  # no block and no URI: no registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert StoreSettings.read(project_yaml).tracking_uri == "http://mlflow:5000"  # no block: the variable
    assert StoreSettings.read(REPO / "deploy" / "feature_store.yaml").tracking_uri == "http://mlflow:5000"
    own = tmp_path / "feature_store.yaml"
    own.write_text("project: p\nmlflow:\n    enabled: true\n    tracking_uri: sqlite:///data/mlflow.db\n")
    # relative to the yaml
    assert StoreSettings.read(own).tracking_uri == f"sqlite:///{tmp_path}/data/mlflow.db"
    own.write_text("project: p\nmlflow:\n    enabled: false\n    tracking_uri: http://mlflow:5000\n")
    assert StoreSettings.read(own).tracking_uri is None, "a block switched off: no registry"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    own.write_text("project: p\nmlflow:\n    enabled: true\n    tracking_uri: ${MLFLOW_TRACKING_URI}\n")
    assert StoreSettings.read(own).tracking_uri is None, "an unexpanded variable is unset"


def test_an_epochs_metrics_with_kl_per_dimension():
    epoch = {"epoch": 3, "val_negative_elbo": 30.5, "active_units": 2, "val_kl_per_dim": [0.5, 0.0]}
    epoch |= {"val_posterior_mean_variance": [1.0, 0.0], "beta": 1.0}
    assert epoch_metrics(epoch) == {
        "val_negative_elbo": 30.5,
        "active_units": 2.0,
        "beta": 1.0,
        "kl_per_dim/0": 0.5,
        "kl_per_dim/1": 0.0,
    }
    assert registered_model_name("user") == "vae-user"


def test_registry_options_do_not_change_which_run_a_rerun_resumes():
    plain = TrainConfig(data="d.parquet")
    tracked = TrainConfig(
        data="d.parquet", entity="user", tracking_uri="http://x", experiment="e", tracking_required=True
    )
    assert plain.run_identity(7) == tracked.run_identity(7)
    assert plain.run_identity(7) != TrainConfig(data="d.parquet", epochs=3).run_identity(7)


def test_the_pipeline_sets_the_challengers_registry():
    with pytest.raises(InputError, match="train: entity, tracking_uri are set by the step"):
        from ray_jobs.config import parse_config

        parse_config(
            PipelineConfig,
            ["--data", "d", "--train", "{tracking_uri: http://x, entity: u}"],
            "vaectl pipeline",
        )
    given = PipelineConfig(data="d", train={"tracking_required": True}).train
    assert given.model_dump(exclude_unset=True) == {"tracking_required": True}
