"""The one reader of a feature_store.yaml for this project's own blocks (Feast ignores the first):

    vae_embeddings   catalog (Iceberg SQL catalog URI) and warehouse (where its tables keep files):
                     where the embeddings live, for the jobs, features.py and consumers
    mlflow           Feast's own MLflow integration block: when enabled, its tracking_uri (else
                     MLFLOW_TRACKING_URI) is the model registry publish and the pipeline move aliases
                     in; when absent, MLFLOW_TRACKING_URI; when disabled, none

${VARS} are expanded as Feast expands them, and relative paths (a SQLite file, a local warehouse)
are taken relative to the file, where Feast takes the repo's own paths. Imports neither Feast nor
pyiceberg: job configs call it to find their catalog.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vae.errors import InputError, first_line
from vae.versions.mlflow_registry import resolve_tracking_uri


@dataclass(frozen=True)
class StoreSettings:
    """What this project reads from one feature_store.yaml."""

    path: Path
    catalog: str | None  # the vae_embeddings block's catalog URI (absolute for SQLite)
    warehouse: str | None  # ... and warehouse (absolute locally, or an s3:// URL)
    tracking_uri: str | None  # the MLflow registry (see above); None: none

    @classmethod
    def read(cls, path: str | os.PathLike) -> StoreSettings:
        import yaml

        path = Path(path).absolute()
        try:
            values = yaml.safe_load(os.path.expandvars(path.read_text())) or {}
        except (OSError, yaml.YAMLError) as error:
            raise InputError(f"{path}: {first_line(error)}") from None
        values = values if isinstance(values, dict) else {}
        embeddings, mlflow = values.get("vae_embeddings"), values.get("mlflow")
        catalog = warehouse = tracking_uri = None
        if isinstance(embeddings, dict) and embeddings.get("catalog") and embeddings.get("warehouse"):
            catalog = absolute_uri(str(embeddings["catalog"]), path.parent)
            warehouse = absolute_path(str(embeddings["warehouse"]), path.parent)
        if not isinstance(mlflow, dict):  # no block: MLflow wherever MLFLOW_TRACKING_URI says
            tracking_uri = resolve_tracking_uri()
        elif mlflow.get("enabled"):
            uri = resolve_tracking_uri(mlflow.get("tracking_uri"))
            tracking_uri = absolute_uri(uri, path.parent) if uri else None
        return cls(path, catalog, warehouse, tracking_uri)

    def embeddings_catalog(self) -> tuple[str, str]:
        """(catalog URI, warehouse), or one error naming the file when it has no vae_embeddings block."""
        if self.catalog is None or self.warehouse is None:
            raise InputError(
                f"{self.path}: no vae_embeddings block with catalog and warehouse (the project's has one)"
            )
        return self.catalog, self.warehouse

    def open_catalog(self):
        """The embeddings catalog the file names (vae.embeddings.catalog.EmbeddingsCatalog); a URI with a
        password in it is refused: Feast's registry would store it."""
        from vae.embeddings.catalog import EmbeddingsCatalog
        from vae.secrets import holds_credentials

        uri, warehouse = self.embeddings_catalog()
        if holds_credentials(uri):
            raise InputError(
                f"{self.path}: the catalog URI holds a password, which Feast's registry would store; give it "
                "to PostgreSQL in PGPASSWORD instead"
            )
        return EmbeddingsCatalog(uri, warehouse)


def absolute_uri(uri: str, base: Path) -> str:
    """A SQLite URI with a relative file made absolute against `base`; other URIs as they are."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str((base / uri[len(prefix) :]).absolute())
    return uri


def absolute_path(location: str, base: Path) -> str:
    return location if "://" in location else str((base / location).absolute())
