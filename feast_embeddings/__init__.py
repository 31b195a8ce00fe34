"""Everything that speaks Feast, for VAE embeddings (no Ray): opening a feature repo for an
embeddings root, the online writers, the atomic registry store, version operations (current,
switch, rollback, retire), verification, vector search, and what consumers import:

    from feast_embeddings import current_features, fetch_online, search_similar
"""

from feast_embeddings.repo import EmbeddingsRepo
from feast_embeddings.vectors import search_similar
from feast_embeddings.verify import fetch_online
from feast_embeddings.versions import current_features, current_version

__all__ = ["EmbeddingsRepo", "current_features", "current_version", "fetch_online", "search_similar"]
