"""A Feast repo of VAE embeddings: the FeatureStore, the repo's declarations (its features.py) and the
embeddings catalog its feature_store.yaml names (the `vae_embeddings` block).

The catalog holds the record of what is published (feast_embeddings.publication: versions, online
flags, current, previous); the Feast objects are derived from it by the factories in features.py. Publish
changes the record and applies the derived objects; `feast apply` in the repo derives the same
objects (features.py calls `declare_published`), so it never deletes a published view or service.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cached_property
from pathlib import Path
from types import ModuleType

from feast_embeddings.publication import Publication, update_publication
from feast_embeddings.settings import StoreSettings
from vae.embeddings.catalog import NAMESPACE, EmbeddingsCatalog, EntitySet, table_name
from vae.embeddings.names import identifier
from vae.errors import InputError
from vae.versions.mlflow_registry import Registry

YAML_KEY = "__vae_feature_store_yaml__"  # set on the definitions module by EmbeddingsRepo
# Tags on the Feast objects features.py declares, read back by publish, lineage and vector search
VERSION_TAG = "vae_model_version"  # on every version's view and on "current": the model version
PUBLISHED_TAG = "vae_published_at"  # on a version's view: when it was first published
PREVIOUS_TAG = "vae_previous_version"  # on "current": the version a rollback returns to


class EmbeddingsRepo:
    """The store, the declarations and the embeddings catalog of one feature repo."""

    def __init__(self, feature_repo: str | os.PathLike, feature_store_yaml: str | os.PathLike | None = None):
        self.path = Path(feature_repo).absolute()
        self.yaml = store_yaml(self.path, feature_store_yaml)
        self.settings = StoreSettings.read(self.yaml)
        self.catalog = self.settings.open_catalog()
        self.definitions = load_definitions(self.path, self.yaml)

    @cached_property
    def store(self):
        from feast import FeatureStore

        store = FeatureStore(repo_path=str(self.path), fs_yaml_file=self.yaml)
        # Feast's MLflow integration (it tags an active run with the views it read: lineage) on exactly
        # when there is a registry, and on the same one: with no URI Feast would fall back to MLflow's
        # default, creating ./mlflow.db wherever the process runs.
        uri = self.settings.tracking_uri
        if store.config.mlflow is None and uri is not None:
            store.config.mlflow_config = {"enabled": True, "tracking_uri": uri}
        elif store.config.mlflow is not None:
            store.config.mlflow.enabled = uri is not None
            store.config.mlflow.tracking_uri = uri
        return store

    @cached_property
    def model_registry(self) -> Registry | None:
        """The MLflow registry of the store's `mlflow:` block (its tracking_uri, else
        MLFLOW_TRACKING_URI); None when the block is off or no URI is set."""
        uri = self.settings.tracking_uri
        return Registry(uri) if uri else None

    def publication(self, entity: str) -> Publication:
        """What of an entity set is published (feast_embeddings.publication)."""
        return Publication.read(self.catalog, entity)

    def update_publication(self, entity: str, **updates: str | None) -> None:
        update_publication(self.catalog, entity, **updates)

    def entity(self, name: str):
        """An entity set's Feast entity, from the catalog (its join key and key type come from the data)."""
        found = self.catalog.entity_set(name)
        return self.definitions.entity(found.name, found.join_key, found.key_type)

    def source(self, entity: str, version: str):
        """A version's Iceberg table as a Feast source, read by the DuckDB offline store through pyiceberg."""
        return _source(self.catalog, self.definitions, entity, version)

    def version_view_name(self, entity: str, version: str) -> str:
        return self.definitions.version_view_name(entity, version)

    def current_service_name(self, entity: str) -> str:
        return self.definitions.current_service_name(entity)

    def version_view(self, entity: str, version: str, online: bool, published_at: str):
        owner = self.entity(entity)
        return self.definitions.version_view(
            owner, version, self.source(entity, version), online, published_at
        )

    def vector_view(self, entity: str, version: str, online: bool = True):
        owner = self.entity(entity)
        return self.definitions.vector_view(owner, version, self.source(entity, version), online)

    def published_objects(self) -> list:
        """The permissions, and every entity set's entity, published version views and current service,
        as the catalog records them."""
        return published_objects(self.catalog, self.definitions)

    def apply(self) -> None:
        """Register the published objects: the registry becomes what the catalog records. The registry's
        record of the online tables is updated too, as `feast apply` does, so `feast plan` shows no change."""
        store = self.store
        # Feast applies changes to its cached registry and writes the whole of it back: refresh first, so
        # a registry another publisher changed within the cache TTL is not written back stale
        store.registry.refresh(project=store.project)
        store.apply(self.published_objects())
        store.registry.refresh(project=store.project)
        infra = store._get_provider().plan_infra(store.config, store.registry.proto())
        store.registry.update_infra(infra, store.project, commit=True)


def published_objects(catalog: EmbeddingsCatalog, definitions) -> list:
    # a features.py from before permissions declares none
    objects: list = list(definitions.permissions()) if hasattr(definitions, "permissions") else []
    for found in catalog.entity_sets():
        objects += _entity_objects(catalog, definitions, found)
    return objects


def _entity_objects(catalog: EmbeddingsCatalog, definitions, found: EntitySet) -> list:
    owner = definitions.entity(found.name, found.join_key, found.key_type)
    state = Publication.read(catalog, found.name)
    views = {}
    for version, published_at in sorted(state.published.items()):
        source = _source(catalog, definitions, found.name, version)
        online = state.online.get(version, False)
        views[version] = definitions.version_view(owner, version, source, online, published_at)
    objects = [owner, *views.values()]
    if state.current in views:
        objects.append(definitions.current_service(views[state.current], found.name, state.previous or ""))
    return objects


def _source(catalog: EmbeddingsCatalog, definitions, entity: str, version: str):
    from feast.infra.data_sources.contrib.iceberg_catalog.iceberg_source import IcebergSource

    return IcebergSource(
        name=f"{definitions.version_view_name(entity, version)}_source",
        warehouse=catalog.warehouse,
        namespace=f"{NAMESPACE}.{entity}",
        table=table_name(version),
        catalog_type="sql",
        catalog_name=NAMESPACE,
        catalog_properties=catalog.connection_properties,
        timestamp_field="event_timestamp",
    )


def declare_published(namespace: dict) -> dict:
    """For features.py: the published objects as module-level names, built with the module's own factories.

    The feature_store.yaml is the one EmbeddingsRepo opened the module for, else Feast's
    FEAST_FS_YAML_FILE_PATH, else the repo's own (so `feast apply` and `feast -f` alike, with the
    variable)."""
    here = Path(namespace["__file__"]).parent
    yaml_path = (
        namespace.get(YAML_KEY) or os.environ.get("FEAST_FS_YAML_FILE_PATH") or here / "feature_store.yaml"
    )
    catalog = StoreSettings.read(yaml_path).open_catalog()
    definitions = ModuleType("declarations")
    definitions.__dict__.update(namespace)
    declared = {}
    for obj in published_objects(catalog, definitions):
        declared[f"{type(obj).__name__.lower()}_{identifier(obj.name)}"] = obj
    return declared


def store_yaml(feature_repo: Path, feature_store_yaml: str | os.PathLike | None = None) -> Path:
    """The feature_store.yaml in use: the given one, or the repo's own."""
    path = Path(feature_store_yaml) if feature_store_yaml else feature_repo / "feature_store.yaml"
    if not path.is_file():
        raise InputError(f"{path}: no such feature_store.yaml")
    return path.absolute()


def load_definitions(feature_repo: Path, yaml_path: Path) -> ModuleType:
    """The repo's features.py as a module: its factories and the objects it declares."""
    path = feature_repo / "features.py"
    if not path.is_file():
        raise InputError(f"{feature_repo}: no features.py with the Feast definitions")
    spec = importlib.util.spec_from_file_location(f"feature_repo_features_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    setattr(module, YAML_KEY, str(yaml_path))
    spec.loader.exec_module(module)
    return module
