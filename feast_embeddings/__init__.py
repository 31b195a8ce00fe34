"""Everything that speaks Feast, for VAE embeddings (no Ray):

    settings      the one reader of a feature_store.yaml (the embeddings catalog, the MLflow block)
    publication   the record of what is published: versions, online, current, previous
    repo          a feature repo: the FeatureStore, its declarations, the objects derived from the record
    versions      publish a version, switch current, roll back, retire (under one lock)
    delta         what a publish writes online; writers: Feast's online rows, built column-wise
    verify        what publish checks after writing; vectors: the vector-search index
    registry      Feast's file registry, written atomically; lineage: back from a downstream MLflow run

and what consumers import:

    from feast_embeddings import current_features, fetch_online, search_similar
"""

import warnings

# Feast's online reads import every online store it knows to ask which support versioned reads, Milvus's
# among them where pymilvus is installed (the vector extra), and pydantic then warns that Feast's own
# MilvusOnlineStoreConfig shadows a parent's field: nothing a reader can act on. Every process that
# opens this project's repo imports this package first (its registry store is feast_embeddings'),
# so its consumers see nothing unless something is wrong.
warnings.filterwarnings(
    "ignore", message='Field name "vector_enabled" in "MilvusOnlineStoreConfig" shadows', category=UserWarning
)

from feast_embeddings.repo import EmbeddingsRepo  # noqa: E402
from feast_embeddings.vectors import search_similar  # noqa: E402
from feast_embeddings.verify import fetch_online  # noqa: E402
from feast_embeddings.versions import current_features, current_version  # noqa: E402

__all__ = ["EmbeddingsRepo", "current_features", "current_version", "fetch_online", "search_similar"]
