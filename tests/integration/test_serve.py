"""The online encoding service: a real Ray Serve application on 127.0.0.1 over the published versions,
called over HTTP. Its vectors equal the batch job's, bad rows get 422 naming row and column, rows are
written through to Feast online and the version's Iceberg table, and a publish switch moves it to the new
version while a client keeps calling, without a failed request."""

import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, use_catalog
from helpers.servers import free_port

from feast_embeddings import EmbeddingsRepo
from ray_jobs.config import PublishConfig, ServeConfig
from ray_jobs.publish import publish


def post(url: str, payload: dict | bytes, content_type: str = "application/json") -> tuple[int, dict | bytes]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
            is_json = response.headers.get("content-type", "").startswith("application/json")
            return response.status, json.loads(data) if is_json else data
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def service(versions, trained, tmp_path_factory):
    from ray import serve

    from ray_jobs.serve import start

    repo = tmp_path_factory.mktemp("serve") / "feature_repo"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(REPO / "feature_repo" / name, repo / name)
    use_catalog(repo, versions)
    publish(PublishConfig(feature_repo=str(repo), model_version=versions["names"][0], verify_rows=0, show=0))
    config = ServeConfig(
        feature_repo=str(repo),
        model_root=str(versions["model_root"]),
        port=free_port(),
        follow_seconds=0.5,
        commit_seconds=0.5,
    )
    url = start(config)
    digits = pq.read_table(trained["data"])
    try:
        yield {"url": url, "repo": repo, "digits": digits, "config": config}
    finally:
        serve.shutdown()


def rows_of(digits: pa.Table, keys: list[int]) -> list[dict]:
    picked = digits.filter(pa.compute.is_in(digits.column("item_id"), pa.array(keys)))
    return [{"item_id": r["item_id"], "pixels": r["pixels"]} for r in picked.to_pylist()]


def test_vectors_over_http_equal_the_batch_jobs(service, versions):
    from conftest import version_rows

    keys = list(range(0, 40, 2))
    status, body = post(service["url"], {"rows": rows_of(service["digits"], keys)})
    assert status == 200, body
    assert body["model_version"] == versions["names"][0] and not body["errors"]
    batch = version_rows(service["repo"], versions["names"][0])
    batch = batch[batch["batch_id"] == "digits"]
    for row in body["rows"]:
        want = batch.loc[row["item_id"]]
        np.testing.assert_allclose(row["latent"], want["latent"], atol=1e-6)
        assert row["anomaly_score"] == pytest.approx(float(want["anomaly_score"]), abs=1e-4)
        assert row["is_anomaly"] == bool(want["is_anomaly"])
        assert row["model_version"] == versions["names"][0]
    assert sorted(row["item_id"] for row in body["rows"]) == keys


def test_bad_rows_get_422_naming_row_and_column_and_the_others_are_embedded(service):
    good = rows_of(service["digits"], [1, 3])
    short = {"item_id": 5, "pixels": [0.0] * 10}
    no_vector = {"item_id": 7}
    status, body = post(service["url"], {"rows": [good[0], short, no_vector, good[1]]})
    assert status == 422
    assert [e["row"] for e in body["errors"]] == [1, 2]
    assert "pixels" in body["errors"][0]["error"] and "length" in body["errors"][0]["error"]
    assert "no value in column 'pixels'" in body["errors"][1]["error"]
    assert [r["item_id"] for r in body["rows"]] == [1, 3]

    status, body = post(service["url"], {"rows": [good[0], short], "all_or_nothing": True})
    assert status == 422 and body["rows"] == [] and [e["row"] for e in body["errors"]] == [1]

    status, body = post(service["url"], {"rows": [{"item_id": "seven", "pixels": [0.0] * 64}]})
    assert status == 422 and "item_id" in body["error"]
    status, body = post(service["url"], b"not json")
    assert status == 422 and "not JSON" in body["error"]


def test_bulk_callers_send_and_get_arrow(service, versions):
    keys = list(range(40, 104))
    picked = service["digits"].filter(pa.compute.is_in(service["digits"].column("item_id"), pa.array(keys)))
    picked = picked.select(["item_id", "pixels"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, picked.schema) as stream:
        stream.write_table(picked)
    status, body = post(service["url"], sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream")
    assert status == 200
    rows = pa.ipc.open_stream(body).read_all()
    assert rows.column("item_id").to_pylist() == picked.column("item_id").to_pylist()
    assert set(rows.column("model_version").to_pylist()) == {versions["names"][0]}
    _, answer = post(service["url"], {"rows": rows_of(service["digits"], keys[:5])})
    by_key = {row["item_id"]: row["latent"] for row in answer["rows"]}
    for key, latent in zip(keys[:5], rows.column("latent").to_pylist()[:5], strict=True):
        np.testing.assert_allclose(latent, by_key[key], atol=1e-6)


def test_rows_are_written_through_to_feast_online_and_the_table(service, versions):
    from feast_embeddings.verify import fetch_online

    # new keys: items that arrived after the daily batch
    rows = rows_of(service["digits"], [11, 12, 13])
    for row, key in zip(rows, (900_001, 900_002, 900_003), strict=True):
        row["item_id"] = key
    status, body = post(service["url"], {"rows": rows})
    assert status == 200, body
    repo = EmbeddingsRepo(service["repo"])
    view = repo.version_view_name("item", versions["names"][0])
    online = fetch_online(repo.store, view, [900_001, 900_002, 900_003], "item_id")
    for got, want in zip(online, body["rows"], strict=True):
        np.testing.assert_allclose(got["latent"], want["latent"], rtol=1e-6)
        assert got["model_version"] == versions["names"][0]

    deadline = time.time() + 30
    while time.time() < deadline:
        stored = repo.catalog.read(repo.catalog.table("item", versions["names"][0])).to_pandas()
        streamed = stored[stored["batch_id"].str.startswith("stream-")]
        if {900_001, 900_002, 900_003} <= set(streamed["item_id"]):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the written-through rows never reached the version's table")
    row = streamed.set_index("item_id").loc[900_002]
    np.testing.assert_allclose(row["latent"], body["rows"][1]["latent"], rtol=1e-6)

    # point in time: the vector exists from when it was embedded, not before
    import pandas as pd

    embedded_at = pd.Timestamp(body["rows"][1]["event_timestamp"])
    entity_df = pd.DataFrame(
        {"item_id": [900_002, 900_002], "event_timestamp": [embedded_at - pd.Timedelta(hours=1), embedded_at]}
    )
    offline = repo.store.get_historical_features(entity_df=entity_df, features=[f"{view}:latent"]).to_df()
    offline = offline.sort_values("event_timestamp")
    before = offline["latent"].iloc[0]
    assert before is None or (isinstance(before, float) and np.isnan(before)) or len(before) == 0, before
    np.testing.assert_allclose(list(offline["latent"].iloc[1]), body["rows"][1]["latent"], rtol=1e-6)


def test_a_publish_switch_moves_the_service_without_a_failed_request(service, versions):
    statuses, seen, stop = [], [], threading.Event()
    rows = rows_of(service["digits"], [21])

    def client():
        while not stop.is_set():
            status, body = post(service["url"], {"rows": rows})
            statuses.append(status)
            seen.append(body.get("model_version"))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(1)
        publish(
            PublishConfig(
                feature_repo=str(service["repo"]),
                model_version=versions["names"][1],
                verify_rows=0,
                show=0,
                force=True,
            )
        )
        deadline = time.time() + 30
        while time.time() < deadline and (not seen or seen[-1] != versions["names"][1]):
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert set(statuses) == {200}, statuses
    assert seen[0] == versions["names"][0] and seen[-1] == versions["names"][1]
    # once switched, never back
    first_new = seen.index(versions["names"][1])
    assert set(seen[first_new:]) == {versions["names"][1]}


def test_serving_an_entity_set_with_nothing_published_is_one_line_before_ray_starts(
    versions, feature_repo, capsys
):
    from test_cli import assert_one_line_error

    args = ["serve", "--feature-repo", str(feature_repo), "--model-root", str(versions["model_root"])]
    assert_one_line_error(capsys, args, "entity 'item' has no current version yet")


def broken_version(versions) -> str:
    """versions[0] with its encoder zeroed (every row gets the same posterior), calibration kept."""
    import torch

    from vae import load_model_version, save_model_version
    from vae.versions.artifacts import load_reference

    good = load_model_version(versions["model_root"], versions["names"][0])
    with torch.no_grad():
        for parameter in good.model.encoder.parameters():
            parameter.zero_()
    return save_model_version(
        versions["model_root"],
        good.model,
        good.normalizer,
        good.features,
        {},
        {},
        {"broken": True},
        reference=load_reference(good),
        anomaly=good.metadata["anomaly"],
    )


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def redeploy(service, **options):
    from ray_jobs.serve import start

    return start(service["config"].model_copy(update=options))


def test_a_canary_serves_its_share_and_a_broken_one_is_withdrawn_with_a_decision(service, versions):
    from vae.pipeline.decisions import DecisionLog

    current, canary = versions["names"][1], versions["names"][2]  # current since the switch test
    # the canary's rows are written through to its own view: it is published, not current
    publish(
        PublishConfig(
            feature_repo=str(service["repo"]),
            model_version=canary,
            switch_current=False,
            verify_rows=0,
            show=0,
        )
    )
    url = redeploy(service, canary={"version": canary, "fraction": 0.5})
    rows = rows_of(service["digits"], [31])
    served = [post(url, {"rows": rows})[1]["model_version"] for _ in range(40)]
    assert {current, canary} == set(served) and 8 <= served.count(canary) <= 32, served
    metrics = get(url.replace("/embed", "/metrics"))
    for version in (current, canary):
        assert (
            f'vae_serve_requests_total{{entity="item",model_version="{version}"}} {served.count(version)}.0'
            in (metrics)
        ), metrics

    broken = broken_version(versions)
    url = redeploy(service, write=False, canary={"version": broken, "fraction": 0.5, "min_rows": 40})
    assert json.loads(get(url.replace("/embed", "/version")))["canary"] == broken
    keys = list(range(100, 400))
    answers, deadline = [], time.time() + 60
    while time.time() < deadline and json.loads(get(url.replace("/embed", "/version")))["canary"] is not None:
        key = keys[len(answers) % len(keys)]
        status, body = post(url, {"rows": rows_of(service["digits"], [key])})
        assert status == 200, body
        answers.append(body["model_version"])
    assert broken in answers, "the canary never served"
    assert json.loads(get(url.replace("/embed", "/version")))["canary"] is None, "never withdrawn"
    # out of traffic first, then the decision appended: wait for it
    log, withdrawn, deadline = (
        DecisionLog(EmbeddingsRepo(service["repo"]).catalog, "item"),
        [],
        time.time() + 30,
    )
    while not withdrawn and time.time() < deadline:
        withdrawn = [d for d in log.read() if d.kind == "canary_withdrawn"]
        time.sleep(0.2)
    assert [d.model_version for d in withdrawn] == [broken]
    assert "drift" in withdrawn[0].reason or "anomaly rate" in withdrawn[0].reason, withdrawn[0].reason
    assert withdrawn[0].detail["current"] == current
    after = [post(url, {"rows": rows})[1]["model_version"] for _ in range(10)]
    assert set(after) == {current}
