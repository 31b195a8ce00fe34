"""The pipeline step's signals through real servers: the figures it pushes to Debian's
prometheus-pushgateway, read back through Prometheus's HTTP query API after a scrape, with the alert
rules of deploy/prometheus/ loaded; a failed step's push; the CLI's exit codes; the lock."""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers.servers import prometheus_servers

from ray_jobs.config import PipelineConfig
from ray_jobs.pipeline import step
from vae import InputError
from vae.versions.artifacts import read_model_version_info

REPO = Path(__file__).resolve().parents[2]


def query(prometheus: str, expression: str, want=lambda values: bool(values), seconds: float = 30) -> dict:
    """{labels as a sorted tuple: value} of an instant query, once `want` holds (scrapes are each 1 s)."""
    deadline = time.monotonic() + seconds
    while True:
        url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expression)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        values = {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in answer["data"]["result"]}
        if want(values) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def only(values: dict) -> float:
    assert len(values) == 1, values
    return next(iter(values.values()))


def test_a_step_pushes_its_figures_and_prometheus_reads_them_back(
    trained, feature_repo, tmp_path, monkeypatch
):
    version = trained["version"]
    with prometheus_servers(REPO / "deploy" / "prometheus" / "rules.yml") as (gateway, prometheus):
        config = PipelineConfig(
            entity="item",
            data=str(trained["data"]),
            batch="day-1",
            feature_repo=str(feature_repo),
            model_root=str(trained["model_root"]),
            initial_version=version,
            monitoring=str(tmp_path / "monitoring"),
            permutations=50,
            pushgateway=gateway,
            exit_codes=False,
        )
        result = step(config)
        assert result.current == version and "switched" in [d.kind for d in result.decisions]
        monitored = next(d for d in result.decisions if d.kind == "monitored")
        labels = 'job="vae_pipeline",entity="item"'

        rows = query(prometheus, f'vae_rows_embedded{{{labels},batch="day-1"}}')
        assert only(rows) == 1797
        (series,) = rows
        assert dict(series)["model_version"] == version
        assert only(query(prometheus, f"vae_step_success{{{labels}}}")) == 1
        p_value = only(query(prometheus, f"vae_drift_p_value{{{labels}}}"))
        assert p_value == pytest.approx(monitored.detail["health"]["drift_p_value"])
        tests = query(prometheus, f"vae_drift_test_p_value{{{labels}}}")
        assert {dict(s)["test"] for s in tests} >= {"mmd", "mean_shift", "classifier"}
        expected = only(query(prometheus, f"vae_anomaly_rate_expected{{{labels}}}"))
        assert expected == pytest.approx(0.01)
        created = read_model_version_info(trained["model_root"], version).metadata["created_at"]
        from datetime import datetime

        stamp = only(query(prometheus, f"vae_current_version_created_timestamp_seconds{{{labels}}}"))
        assert stamp == pytest.approx(datetime.fromisoformat(created).timestamp())
        stages = query(prometheus, f"vae_stage_duration_seconds{{{labels}}}")
        assert {dict(s)["stage"] for s in stages} >= {"embed", "monitor", "publish"}
        assert all(v > 0 for v in stages.values())
        # the alert rules are loaded and evaluate without error
        with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=5) as response:
            groups = json.load(response)["data"]["groups"]
        assert {g["name"] for g in groups} == {"vae-latent-space", "vae-pipeline"}
        assert all(rule["health"] == "ok" for g in groups for rule in g["rules"])

        # The jobs run alone push under their own names where PUSHGATEWAY_URL is set.
        from ray_jobs import embed, publish
        from ray_jobs.config import EmbedConfig, PublishConfig

        monkeypatch.setenv("PUSHGATEWAY_URL", gateway)
        yaml_path = str(feature_repo / "feature_store.yaml")
        common = {"model_root": str(trained["model_root"]), "model_version": version}
        embed.run(
            EmbedConfig(data=str(trained["data"]), batch="by-hand", feature_store_yaml=yaml_path, **common)
        )
        publish.run(PublishConfig(feature_repo=str(feature_repo), show=0, **common))
        by_hand = query(prometheus, 'vae_rows_embedded{job="vae_embed",entity="item"}')
        assert {dict(s)["batch"]: v for s, v in by_hand.items()} == {"by-hand": 1797.0}
        published = query(prometheus, 'vae_rows_published{job="vae_publish",entity="item"}')
        assert only(published) == 1797, "the new batch's rows, written online"
        monkeypatch.delenv("PUSHGATEWAY_URL")

        # A failed step: step_success 0 for its batch, the last success's time kept.
        succeeded = only(query(prometheus, f"vae_step_last_success_timestamp_seconds{{{labels}}}"))
        broken = config.model_copy(update={"data": str(tmp_path / "missing"), "batch": "day-2"})
        with pytest.raises(InputError):
            step(broken)
        failed = query(
            prometheus,
            f"vae_step_success{{{labels}}}",
            want=lambda v: any(dict(s)["batch"] == "day-2" for s in v),
        )
        assert {dict(s)["batch"]: v for s, v in failed.items()} == {"day-2": 0.0}
        assert only(query(prometheus, f"vae_step_last_success_timestamp_seconds{{{labels}}}")) == succeeded
        alerts = query(
            prometheus, 'ALERTS{alertname="VaePipelineStepFailed"}', want=lambda v: bool(v), seconds=20
        )
        assert {dict(s)["entity"] for s in alerts} == {"item"}

    # The CLI: the same day again exits with its decision's code (4: switched to the first version)
    # and changes nothing; a step while another holds the lock exits 2 and says who holds it.
    from feast_embeddings.settings import StoreSettings

    catalog = StoreSettings.read(feature_repo / "feature_store.yaml").open_catalog()
    snapshot = catalog.table("item", version).current_snapshot().snapshot_id
    vaectl = str(Path(sys.executable).parent / "vaectl")
    arguments = [
        vaectl,
        "pipeline",
        "--data",
        str(trained["data"]),
        "--batch",
        "day-1",
        "--feature-repo",
        str(feature_repo),
        "--model-root",
        str(trained["model_root"]),
        "--monitoring",
        str(tmp_path / "monitoring"),
        "--permutations",
        "50",
    ]
    env = {**os.environ, "PUSHGATEWAY_URL": ""}
    again = subprocess.run(arguments, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 4, again.stderr[-2000:]
    assert catalog.table("item", version).current_snapshot().snapshot_id == snapshot
    with catalog.lock("pipeline-item"):
        held = subprocess.run(arguments, capture_output=True, text=True, timeout=300, env=env)
    assert held.returncode == 2
    assert (
        held.stderr.strip()
        .splitlines()[-1]
        .startswith("error: another pipeline step of 'item' is running: lock 'pipeline-item' is held by")
    )

    # The decision log as an operator reads it.
    shown = subprocess.run(
        [
            vaectl,
            "embeddings",
            "decisions",
            "item",
            "--feature-store-yaml",
            str(feature_repo / "feature_store.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    lines = shown.stdout.strip().splitlines()
    kinds = [d.kind for d in result.decisions]
    assert lines[0] == f"vae.item.decisions: {len(kinds)} decision(s)"
    assert [line.split()[2] for line in lines[1:]] == kinds
    assert all(line.split()[1] == "day-1" for line in lines[1:])
