"""Similarity search within one model version through Feast's `retrieve_online_documents_v2` on
Milvus Lite (feature_repo/vector_search), checked against exact brute-force neighbours."""

import numpy as np
import pyarrow as pa
import pytest
from conftest import version_rows

import feast_embeddings.vectors
from feast_embeddings import EmbeddingsRepo, search_similar
from ray_jobs.config import PublishConfig
from ray_jobs.publish import publish
from vae import InputError


def vector_repo(feature_repo, dim: int):
    path = feature_repo / "vector_search" / "feature_store.yaml"
    path.write_text(path.read_text().replace("embedding_dim: 16", f"embedding_dim: {dim}"))


def test_search_matches_brute_force_neighbours_per_version(versions, feature_repo):
    from feast import FeatureStore

    vector_repo(feature_repo, dim=8)  # the test model's latent size
    v1, v2, _ = versions["names"]
    for name in (v1, v2):
        publish(
            PublishConfig(
                feature_repo=str(feature_repo),
                model_version=name,
                vector_search=True,
                verify_rows=16,
            )
        )
    store = FeatureStore(repo_path=str(feature_repo / "vector_search"))
    repo = EmbeddingsRepo(feature_repo).definitions

    table = pa.Table.from_pandas(version_rows(feature_repo, v2).reset_index()[["item_id", "latent"]])
    keys = np.asarray(table.column("item_id").to_pylist())
    vectors = np.asarray(table.column("latent").to_pylist(), np.float32)
    queries = np.random.default_rng(0).standard_normal((40, vectors.shape[1])).astype(np.float32)
    recalls = []
    for query in queries:
        exact = keys[np.argsort(((vectors - query) ** 2).sum(axis=1))[:10]]
        hits = search_similar(store, repo.vector_view_name("item", v2), query, 10)
        # searched within the one version
        assert len(hits) == 10 and {h["model_version"] for h in hits} == {v2}
        assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
        squared = dict(zip(keys.tolist(), ((vectors - query) ** 2).sum(axis=1).tolist(), strict=True))
        np.testing.assert_allclose(
            [h["distance"] for h in hits], [squared[h["item_id"]] for h in hits], rtol=1e-4
        )  # each hit's own distance
        recalls.append(len(set(exact) & {h["item_id"] for h in hits}) / 10)
    assert np.mean(recalls) == 1.0  # FLAT is an exact index
    # v1 is searchable on its own, and gives its own answers.
    assert {
        h["model_version"] for h in search_similar(store, repo.vector_view_name("item", v1), queries[0], 10)
    } == {v1}


def test_latent_size_other_than_the_vector_store_is_a_clear_error(versions, feature_repo):
    with pytest.raises(
        InputError, match="embedding_dim is 16 but model version .* has 8-d latents; set embedding_dim: 8"
    ):
        publish(
            PublishConfig(
                feature_repo=str(feature_repo),
                model_version=versions["names"][0],
                vector_search=True,
            )
        )


def test_an_index_whose_vectors_do_not_find_themselves_is_refused(versions, feature_repo, monkeypatch):
    """Publish's self-search check reads the index back: vectors written wrong fail the publish."""
    vector_repo(feature_repo, dim=8)
    real_write = feast_embeddings.vectors.write_batch

    def shifted(store, view, batch, join_key):
        latent = pa.chunked_array([batch.column("latent")]).combine_chunks()
        moved = pa.ListArray.from_arrays(
            latent.offsets, pa.compute.add(latent.values, pa.scalar(0.5, pa.float32()))
        )
        return real_write(
            store, view, batch.set_column(batch.schema.get_field_index("latent"), "latent", moved), join_key
        )

    monkeypatch.setattr(feast_embeddings.vectors, "write_batch", shifted)
    with pytest.raises(RuntimeError, match="vector index verification failed: item_id=.* instead of itself"):
        publish(
            PublishConfig(
                feature_repo=str(feature_repo),
                model_version=versions["names"][0],
                vector_search=True,
                verify_rows=0,
            )
        )
