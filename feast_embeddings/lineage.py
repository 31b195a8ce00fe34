"""From a downstream model's MLflow run back to the VAE training runs behind the embeddings it read.

Feast's MLflow integration (the `mlflow:` block of feature_store.yaml) tags the active run of a
get_historical_features / get_online_features call with the feature views it read
(`feast.feature_views`). Each version's view names its model version (`vae_model_version`), whose
registered MLflow version links to the run that trained it.
"""

from __future__ import annotations

from feast_embeddings.repo import VERSION_TAG, EmbeddingsRepo
from vae.errors import InputError
from vae.versions.mlflow_registry import registered_model_name

VIEWS_TAG = "feast.feature_views"


def training_runs(repo: EmbeddingsRepo, run_id: str) -> list[dict]:
    """One entry per embedding view the run read: view, entity, model version, registered model and
    version, and the VAE's training run (None for a version trained untracked)."""
    if repo.model_registry is None:
        raise InputError(f"lineage needs MLflow: set MLFLOW_TRACKING_URI or the mlflow block of {repo.yaml}")
    tags = repo.model_registry.run_tags(run_id)
    views = [name for name in tags.get(VIEWS_TAG, "").split(",") if name]
    if not views:
        raise InputError(
            f"MLflow run {run_id} has no {VIEWS_TAG} tag: it read no features through Feast while active "
            "(open the store with the mlflow block enabled and read inside mlflow.start_run())"
        )
    found = []
    for view_name in views:
        view = repo.store.get_feature_view(view_name)
        version = view.tags.get(VERSION_TAG)
        if not version:  # another team's view
            continue
        entity = view.entities[0]
        name = registered_model_name(entity)
        registered = repo.model_registry.find(name, version)
        found.append(
            {
                "view": view_name,
                "entity": entity,
                "model_version": version,
                "registered_model": name,
                "registered_version": registered.version if registered else None,
                "training_run": registered.run_id if registered else None,
            }
        )
    return found
