"""Authenticated serving: a real `feast serve` with Feast's OIDC auth against an identity provider on
127.0.0.1, and the repo's permissions (consumers read, the publisher writes, nothing else)."""

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import numpy as np
import pytest
from conftest import REPO, use_catalog
from helpers.oidc import CLIENT_ID, new_key, oidc_provider
from helpers.servers import feast_serve, free_port

from feast_embeddings import EmbeddingsRepo
from ray_jobs.config import PublishConfig
from ray_jobs.publish import publish

CONSUMER, PUBLISHER = "vae-consumer", "vae-publisher"


def call(url: str, payload: dict | None = None, token: str | None = None) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def oidc_block(discovery_url: str) -> str:
    return (
        "auth:\n    type: oidc\n"
        f"    auth_discovery_url: {discovery_url}\n    client_id: {CLIENT_ID}\n    verify_ssl: false\n"
    )


@pytest.fixture(scope="module")
def secured(versions, tmp_path_factory):
    """The first version published into a repo whose `feast serve` authenticates with OIDC."""
    repo = tmp_path_factory.mktemp("secured") / "feature_repo"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(REPO / "feature_repo" / name, repo / name)
    use_catalog(repo, versions)
    publish(PublishConfig(feature_repo=str(repo), model_version=versions["names"][0], verify_rows=0))
    with oidc_provider() as provider:
        yaml_path = repo / "feature_store.yaml"
        text = yaml_path.read_text()
        yaml_path.write_text(text.replace("auth:\n    type: no_auth\n", oidc_block(provider.discovery_url)))
        env = {k: v for k, v in os.environ.items() if k != "INTRA_COMMUNICATION_BASE64"}
        with feast_serve(repo, "-w", "1", env=env) as url:
            yield url, repo, provider, versions["names"][0]


def values(body: dict) -> dict:
    return {
        name: r["values"] for name, r in zip(body["metadata"]["feature_names"], body["results"], strict=True)
    }


def read_request(repo: Path, version: str, keys: list[int]) -> dict:
    view = EmbeddingsRepo(repo).version_view_name("item", version)
    return {"features": [f"{view}:latent", f"{view}:model_version"], "entities": {"item_id": keys}}


def write_request(repo: Path, version: str, key: int) -> dict:
    view = EmbeddingsRepo(repo).version_view_name("item", version)
    row = {
        "item_id": [key],
        "latent": [[0.5] * 16],
        "anomaly_score": [1.0],
        "model_version": ["forged"],
        "is_anomaly": [False],
        "top_columns": [[]],
        "top_shares": [[]],
        "event_timestamp": ["2030-01-01T00:00:00+00:00"],
    }
    return {"feature_view_name": view, "df": row}


def test_reads_take_a_consumer_token_and_writes_the_publishers(secured):
    url, repo, provider, version = secured
    read = read_request(repo, version, [0, 5])
    consumer = provider.token("ranker", [CONSUMER])
    publisher = provider.token("vaectl-publish", [PUBLISHER])

    assert call(f"{url}/get-online-features", read)[0] == 401  # no token
    assert (
        call(f"{url}/get-online-features", read, provider.token("ranker", [CONSUMER], expires_in=-60))[0]
        == 401
    )
    forged = provider.token("ranker", [PUBLISHER], key=new_key())  # the right kid, another key
    assert call(f"{url}/get-online-features", read, forged)[0] == 401
    assert call(f"{url}/get-online-features", read, provider.token("intruder", []))[0] == 403  # no role

    status, body = call(f"{url}/get-online-features", read, consumer)
    assert status == 200, body
    assert values(body)["item_id"] == [0, 5] and values(body)["model_version"] == [version, version]

    write = write_request(repo, version, key=0)
    status, body = call(f"{url}/write-to-online-store", write, consumer)
    assert status == 403 and "embeddings_write" in body, body
    assert call(f"{url}/materialize-incremental", {"end_ts": "2030-01-01T00:00:00"}, consumer)[0] == 403
    # nothing the consumer sent was written
    _, body = call(f"{url}/get-online-features", read_request(repo, version, [0]), consumer)
    assert values(body)["model_version"] == [version]

    status, body = call(f"{url}/write-to-online-store", write, publisher)
    assert status == 200, body
    _, body = call(f"{url}/get-online-features", read_request(repo, version, [0]), consumer)
    assert values(body)["model_version"] == ["forged"]
    np.testing.assert_allclose(values(body)["latent"][0], [0.5] * 16)


def test_an_unsigned_token_naming_a_user_gets_nothing_and_the_deploy_never_enables_the_bypass(secured):
    url, repo, _, version = secured
    # Feast treats an unsigned token whose preferred_username equals INTRA_COMMUNICATION_BASE64 as an
    # all-access intra-server call: with the variable unset (as the deploy leaves it), it is refused.
    unsigned = jwt.encode(
        {"preferred_username": "intra-server", "exp": time.time() + 60}, key=None, algorithm="none"
    )
    assert call(f"{url}/get-online-features", read_request(repo, version, [0]), unsigned)[0] == 401
    deploy = [*REPO.joinpath("deploy").rglob("*.yaml"), REPO / "cluster.yaml"]
    setting = re.compile(r"name:\s*INTRA_COMMUNICATION_BASE64\b|INTRA_COMMUNICATION_BASE64\s*[:=]")
    assert not [p for p in deploy if setting.search(p.read_text())]
    assert setting.search("env:\n  - name: INTRA_COMMUNICATION_BASE64\n    value: x")  # it would be seen


def test_a_consumer_client_reads_through_the_remote_online_store_with_its_token(secured, monkeypatch):
    from feast import FeatureStore

    url, repo, provider, version = secured
    client = repo.parent / "client"
    client.mkdir(exist_ok=True)
    (client / "feature_store.yaml").write_text(
        "project: vae_embeddings\n"
        f"registry: {repo / 'data' / 'registry.db'}\n"
        "provider: local\n"
        f"online_store:\n    type: remote\n    path: {url}\n"
        "entity_key_serialization_version: 3\n"
        "auth:\n    type: oidc\n    token_env_var: FEAST_CONSUMER_TOKEN\n"
    )
    view = EmbeddingsRepo(repo).version_view_name("item", version)
    monkeypatch.setenv("FEAST_CONSUMER_TOKEN", provider.token("ranker", [CONSUMER]))
    store = FeatureStore(repo_path=str(client))
    rows = store.get_online_features([f"{view}:model_version"], [{"item_id": 7}]).to_dict()
    assert rows["model_version"] == [version]
    monkeypatch.setenv("FEAST_CONSUMER_TOKEN", provider.token("ranker", []))
    with pytest.raises(Exception, match="403|ermission"):
        FeatureStore(repo_path=str(client)).get_online_features([f"{view}:model_version"], [{"item_id": 7}])


def test_the_encoding_service_applies_the_same_tokens_and_permissions(secured, versions, trained):
    """Writing through makes a caller's rows vectors in the online store: the publisher's right. Without
    write-through, encoding is a read: a consumer's."""
    import pyarrow.parquet as pq
    from ray import serve

    from ray_jobs.config import ServeConfig
    from ray_jobs.serve import start

    _, repo, provider, version = secured
    digits = pq.read_table(trained["data"]).slice(0, 2).select(["item_id", "pixels"]).to_pylist()
    consumer = provider.token("ranker", [CONSUMER])
    publisher = provider.token("ingest", [PUBLISHER])
    config = ServeConfig(
        feature_repo=str(repo), model_root=str(versions["model_root"]), port=free_port(), follow_seconds=60
    )
    url = start(config)
    try:
        rows = {"rows": digits}
        assert call(url, rows)[0] == 401
        assert call(url, rows, provider.token("ranker", [CONSUMER], expires_in=-60))[0] == 401
        status, body = call(url, rows, consumer)
        assert status == 403 and "embeddings_write" in body, body
        status, body = call(url, rows, publisher)
        assert status == 200 and body["model_version"] == version, body
        assert call(url.replace("/embed", "/version"), None, consumer)[0] == 200
        assert call(url.replace("/embed", "/version"), None)[0] == 401

        url = start(config.model_copy(update={"write": False}))  # the same app, redeployed
        status, body = call(url, rows, consumer)
        assert status == 200 and [r["item_id"] for r in body["rows"]] == [d["item_id"] for d in digits]
        assert call(url, rows, provider.token("intruder", []))[0] == 403
    finally:
        serve.shutdown()
