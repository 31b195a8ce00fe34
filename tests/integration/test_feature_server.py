"""`feast serve` over the published repo, queried with a real HTTP client: the values equal the
SDK's, for a pinned version and for the "current" service, and 16 concurrent clients get no errors."""

import json
import urllib.request

import numpy as np
import pytest
from helpers.servers import feast_serve

from benchmarks.common import http_load
from feast_embeddings import EmbeddingsRepo, fetch_online
from ray_jobs.config import PublishConfig
from ray_jobs.publish import publish


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def served(versions, feature_repo):
    publish(
        PublishConfig(
            feature_repo=str(feature_repo),
            model_version=versions["names"][0],
            verify_rows=0,
        )
    )
    # --max-requests 0: gunicorn's default recycles the worker every ~1000 requests, resetting open
    # connections
    with feast_serve(feature_repo, "-r", "2", "--max-requests", "0") as url:
        yield url, feature_repo


def test_http_values_equal_the_sdk_and_survive_16_clients(served, versions):
    from feast import FeatureStore

    url, feature_repo = served
    v1 = versions["names"][0]
    repo = EmbeddingsRepo(feature_repo)
    keys = [0, 5, 1234]
    pinned = repo.version_view_name("item", v1)
    response = post(
        f"{url}/get-online-features",
        {
            "features": [f"{pinned}:latent", f"{pinned}:anomaly_score", f"{pinned}:model_version"],
            "entities": {"item_id": keys},
        },
    )
    names = response["metadata"]["feature_names"]
    by_name = {name: result["values"] for name, result in zip(names, response["results"], strict=True)}
    sdk = fetch_online(FeatureStore(repo_path=str(feature_repo)), pinned, keys, "item_id")
    assert by_name["item_id"] == keys and by_name["model_version"] == [v1] * 3
    for i, row in enumerate(sdk):
        np.testing.assert_array_equal(
            np.asarray(by_name["latent"][i], np.float32), np.asarray(row["latent"], np.float32)
        )
        assert by_name["anomaly_score"][i] == pytest.approx(row["anomaly_score"], rel=1e-6)

    current = post(
        f"{url}/get-online-features",
        {"feature_service": repo.current_service_name("item"), "entities": {"item_id": keys}},
    )
    assert {v for r in current["results"] for v in r["values"] if isinstance(v, str)} == {v1}

    load = http_load(
        f"{url}/get-online-features",
        {"feature_service": repo.current_service_name("item"), "entities": {"item_id": [7]}},
        clients=16,
        seconds=5,
    )
    assert load["errors"] == 0 and load["requests"] > 50, load["first_errors"]
