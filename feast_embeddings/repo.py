"""A Feast repo of VAE embeddings, opened for one embeddings root: the FeatureStore, the repo's
declarations (its features.py), and the views they make over that root.

The declarations never look up where embeddings live: every view gets its files from here
(<root>/<model_version>/*.parquet, vae.embeddings), so one repo serves a local root and an
s3:// one alike, and nothing travels through the environment.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cached_property
from pathlib import Path
from types import ModuleType

from vae import embeddings
from vae.errors import InputError
from vae.storage import filesystem, url_of


class EmbeddingsRepo:
    """The store and the declarations of a feature repo, with the views for one embeddings root."""

    def __init__(
        self,
        feature_repo: str | os.PathLike,
        feature_store_yaml: str | os.PathLike | None = None,
        embeddings_root: str | None = None,
    ):
        self.path = Path(feature_repo).absolute()
        self.yaml = store_yaml(self.path, feature_store_yaml)
        self.definitions = load_definitions(self.path)
        root = embeddings_root or str(self.path / "data" / "embeddings")
        fs, path = filesystem(root)
        self.embeddings_root = url_of(fs, path)  # absolute or a URL: DuckDB resolves relative paths elsewhere

    @cached_property
    def store(self):
        from feast import FeatureStore

        return FeatureStore(repo_path=str(self.path), fs_yaml_file=self.yaml)

    @property
    def current_service(self) -> str:
        return self.definitions.CURRENT_SERVICE

    @property
    def entity(self):
        """The one entity the repo declares: what every embeddings view is keyed by."""
        from feast import Entity

        entities = [v for v in vars(self.definitions).values() if isinstance(v, Entity)]
        if len(entities) != 1:
            raise InputError(
                f"{self.path / 'features.py'}: declares {len(entities)} entities; one is expected"
            )
        return entities[0]

    @property
    def join_key(self) -> str:
        """The entity's join key, which must be the embeddings' key column."""
        return self.entity.join_key

    def version_view_name(self, version: str) -> str:
        return self.definitions.version_view_name(version)

    def version_view(self, version: str, online: bool = True):
        """The view that pins one model version, over <root>/<version>/*.parquet."""
        path = embeddings.version_files(self.embeddings_root, version)
        return self.definitions.version_view(version, path, online=online, s3_endpoint=self._s3_endpoint())

    def vector_view(self, version: str, online: bool = True):
        """One version's vectors, indexed for similarity search (the vector_search repo)."""
        path = embeddings.version_files(self.embeddings_root, version)
        return self.definitions.vector_view(version, path, online=online, s3_endpoint=self._s3_endpoint())

    def declarations(self) -> list:
        """The module-level Feast objects, as `feast apply` collects them, with the history view over
        this root in place of the repo's default one."""
        from feast import Entity, FeatureService, FeatureView
        from feast.data_source import DataSource

        history = self.definitions.history_view(
            embeddings.all_version_files(self.embeddings_root), s3_endpoint=self._s3_endpoint()
        )
        kinds = (Entity, FeatureView, FeatureService, DataSource)
        replaced = {history.name, history.batch_source.name}
        declared = [
            v for v in vars(self.definitions).values() if isinstance(v, kinds) and v.name not in replaced
        ]
        return [*declared, history]

    def check_key_column(self, key_column: str, source: str) -> None:
        if key_column != self.join_key:
            raise InputError(
                f"{source}: the embeddings' key column is '{key_column}' but the feature views join on "
                f"'{self.join_key}'; edit {self.path / 'features.py'} (the entity's join key and the key "
                "field)"
            )

    def _s3_endpoint(self) -> str | None:
        # The S3 endpoint the publishing environment uses (unset on AWS; set for S3-compatible stores).
        return os.environ.get("AWS_ENDPOINT_URL") if self.embeddings_root.startswith("s3://") else None


def store_yaml(feature_repo: Path, feature_store_yaml: str | os.PathLike | None = None) -> Path:
    """The feature_store.yaml in use: the given one, or the repo's own."""
    path = Path(feature_store_yaml) if feature_store_yaml else feature_repo / "feature_store.yaml"
    if not path.is_file():
        raise InputError(f"{path}: no such feature_store.yaml")
    return path.absolute()


def load_definitions(feature_repo: Path) -> ModuleType:
    """The repo's features.py as a module: its Feast objects and the per-version view factories."""
    path = feature_repo / "features.py"
    if not path.is_file():
        raise InputError(f"{feature_repo}: no features.py with the Feast definitions")
    spec = importlib.util.spec_from_file_location(f"feature_repo_features_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
