"""Similarity search over one model version's latents: Feast's Milvus Lite store in the repo's
vector_search/ directory (one collection per version), read with `retrieve_online_documents_v2`."""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import pyarrow as pa

from feast_embeddings.repo import VERSION_TAG, EmbeddingsRepo
from feast_embeddings.writers import write_batch
from vae.errors import InputError

log = logging.getLogger("feast_embeddings")


def index_vectors(
    repo: EmbeddingsRepo, entity: str, version: str, table: pa.Table, batch_rows: int, keep_online: int
) -> None:
    """Write a version's vectors (all of them, or a batch's) to the vector-search store, check that sampled
    vectors find themselves, and keep `keep_online` versions there too."""
    from feast import FeatureStore

    path = repo.path / "vector_search"
    if not (path / "feature_store.yaml").is_file():
        raise InputError(
            f"{path}: no feature_store.yaml for vector search (the project's feature_repo/vector_search "
            "has one)"
        )
    store = FeatureStore(repo_path=str(path))
    _check_dimension(store, path, version, table)
    _apply(store, [repo.entity(entity), repo.vector_view(entity, version)])
    view = store.get_feature_view(repo.definitions.vector_view_name(entity, version))
    join_key = repo.entity(entity).join_key
    started = time.perf_counter()
    for batch in table.to_batches(max_chunksize=batch_rows):
        write_batch(store, view, batch, join_key)
    log.info(
        "indexed %d vectors of %s for search in %.1fs", table.num_rows, version, time.perf_counter() - started
    )
    if table.num_rows:
        verify_self_search(store, view.name, table, join_key)
    retired = _retire(store, keep_online, lambda v, online: repo.vector_view(entity, v, online))
    if retired:  # a version indexed again later is indexed whole
        repo.update_publication(entity, **{f"indexed.{v}": None for v in retired})


def _apply(store, objects: list, attempts: int = 3) -> None:
    """store.apply, which starts Milvus Lite's embedded server on first use: on a loaded machine the
    server can miss pymilvus's connect timeout ("Fail connecting to server on unix:..."), so retry."""
    for attempt in range(attempts):
        try:
            store.apply(objects)
            return
        except Exception as error:
            if "Fail connecting to server" not in str(error) or attempt == attempts - 1:
                raise
            log.warning("vector store: Milvus Lite did not answer in time; retrying (%d)", attempt + 1)
            time.sleep(2)


def _retire(store, keep_online: int, make_view) -> list[str]:
    """Keep the `keep_online` most recently indexed versions' collections; returns the versions retired."""
    views = [v for v in store.list_feature_views(allow_cache=False) if VERSION_TAG in v.tags and v.online]
    views.sort(
        key=lambda v: (v.created_timestamp.timestamp() if v.created_timestamp else 0.0, v.tags[VERSION_TAG]),
        reverse=True,
    )
    retired = views[keep_online:]
    if not retired:
        return []
    store.apply([make_view(v.tags[VERSION_TAG], False) for v in retired])
    store._get_provider().update_infra(
        project=store.project,
        tables_to_delete=retired,
        tables_to_keep=[],
        entities_to_delete=[],
        entities_to_keep=[],
        partial=False,
    )
    return [view.tags[VERSION_TAG] for view in retired]


def _check_dimension(store, path, version: str, table: pa.Table) -> None:
    latent = table.column("latent")
    dim = len(latent[0]) if len(latent) else 0
    expected = store.config.online_store.embedding_dim
    if dim != expected:
        raise InputError(
            f"{path / 'feature_store.yaml'}: embedding_dim is {expected} but model version {version} has "
            f"{dim}-d latents; set embedding_dim: {dim} (one vector-search repo per latent size)"
        )


def verify_self_search(store, view_name: str, table: pa.Table, join_key: str, samples: int = 16) -> None:
    """Each sampled vector's nearest neighbour is itself (distance 0), unless another key has the very same
    vector."""
    picks = np.random.default_rng(0).choice(table.num_rows, size=min(samples, table.num_rows), replace=False)
    for row in table.take(pa.array(picks)).to_pylist():
        hits = search_similar(store, view_name, row["latent"], 1, join_key)
        if not hits or hits[0]["distance"] > 1e-6:
            raise RuntimeError(
                f"vector index verification failed: {join_key}={row[join_key]!r} finds {hits[:1]} instead "
                "of itself"
            )


def search_similar(store, view_name: str, vector, top_k: int, join_key: str = "item_id") -> list[dict]:
    """The `top_k` nearest entities to `vector` (squared L2) in one version's vector view:
    [{join_key, distance, model_version}], nearest first.

    Feast 0.67 returns the keys in rank order but the feature columns (distance, model_version) in
    the order of the sorted keys, and the query itself as every hit's `latent`; the columns are put
    back in rank order here (only when that is what makes the distances ascending, so a fixed Feast
    passes through unchanged). Fetch a hit's own vector by its key from the version's online view."""
    response = store.retrieve_online_documents_v2(
        features=[f"{view_name}:latent", f"{view_name}:model_version"],
        query=list(map(float, vector)),
        top_k=top_k,
        distance_metric="L2",
    ).to_dict()
    keys, distances, versions = response[join_key], response["distance"], response["model_version"]
    by_key = sorted(range(len(keys)), key=keys.__getitem__)
    if not _ascending(distances) and _ascending([distances[j] for j in by_key]):
        distances, versions = [distances[j] for j in by_key], [versions[j] for j in by_key]
    hits = zip(keys, distances, versions, strict=True)
    return [
        {join_key: key, "distance": distance, "model_version": version} for key, distance, version in hits
    ]


def _ascending(values: list) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))
