"""Runs survive a lost node and a killed driver, resuming from their last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.cli import flags

from vae import encode_matrix, features_to_numpy, load_model_version

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    """Enough rows that an epoch takes about a second on this machine: time to fail mid-run."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((24_000, 32), dtype=np.float32)
    path = tmp_path_factory.mktemp("vectors") / "vectors.parquet"
    pq.write_table(
        pa.table(
            {
                "item_id": np.arange(24_000),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 32),
            }
        ),
        path,
    )
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _registered_epoch(snapshot: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has registered (what a re-run resumes from)."""
    try:
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _check_version(model_root: Path, data: Path, epochs: int) -> dict:
    loaded = load_model_version(model_root)
    metrics = loaded.metadata["metrics"]
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, epochs + 1))
    posterior_mean, score = encode_matrix(
        loaded.model, loaded.normalizer, features_to_numpy(pq.read_table(data), loaded.features)[:100]
    )
    assert posterior_mean.shape == (100, 4) and np.isfinite(score).all()
    return metrics


def test_losing_a_node_mid_training_resumes_from_the_last_checkpoint(vectors, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "helpers" / "node_failure_scenario.py"),
            str(tmp_path),
            str(vectors),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=560,
        env=_env(),
        start_new_session=True,
    )
    outcome = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    assert outcome.get("finished") and "version" in outcome, result.stderr[-3000:]
    assert outcome["registered_epoch_before_failure"] >= 2
    metrics = _check_version(tmp_path / "models", vectors, epochs=6)
    # one restart, from a checkpoint written before the node went away (epoch 2 or later, not from scratch)
    assert len(metrics["resumed_from"]) == 1 and 2 <= metrics["resumed_from"][0] < 6, metrics["resumed_from"]


def test_rerunning_after_the_driver_was_killed_resumes(vectors, tmp_path):
    command = [
        sys.executable,
        "-m",
        "ray_jobs.cli",
        "train",
        *flags(
            data=str(vectors),
            vector_column="vec",
            likelihood="gaussian",
            latent_dim="4",
            hidden_dims="[256, 256]",
            epochs="6",
            batch_size="64",
            kl_warmup_epochs="0",
            iw_samples="0",
            report_rows="0",
            checkpoint_every="1",
            model_root=str(tmp_path / "models"),
            storage_path=str(tmp_path / "ray_results"),
            run_name="killed",
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        ),
    ]
    # its own session, so the driver and the local Ray cluster it started are one process group to kill
    driver = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    snapshot = tmp_path / "ray_results" / "killed" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while _registered_epoch(snapshot) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, "training finished before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())

    again = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=400, env=_env(), start_new_session=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from its latest checkpoint" in again.stderr
    metrics = _check_version(tmp_path / "models", vectors, epochs=6)
    assert len(metrics["resumed_from"]) == 1 and 2 <= metrics["resumed_from"][0] < 6, metrics["resumed_from"]
    _check_one_mlflow_run(f"sqlite:///{tmp_path}/mlflow.db", load_model_version(tmp_path / "models").version)


def _check_one_mlflow_run(uri: str, version: str) -> None:
    """The resumed run continued its MLflow run: one run, finished, every epoch logged, the version
    registered from it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("vae-item").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "val_negative_elbo")}
    assert steps == set(range(1, 7)) and runs[0].data.tags["vae.model_version"] == version
    (registered,) = client.search_model_versions("name = 'vae-item'")
    assert registered.run_id == runs[0].info.run_id and registered.tags["vae.model_version"] == version
