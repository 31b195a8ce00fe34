"""Training with Ray Train: 2 DDP workers on real Parquet through Ray Data."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_jobs.cli import find_input_error
from ray_jobs.config import TrainConfig
from ray_jobs.train import train
from vae import InputError, encode_matrix, features_to_numpy, load_model_version


def test_training_lowers_the_loss_and_writes_a_loadable_version(trained):
    loaded = load_model_version(trained["model_root"], trained["version"])
    history = loaded.metadata["metrics"]["history"]
    assert len(history) == 6
    assert history[-1]["val_negative_elbo"] < history[0]["val_negative_elbo"] - 2.0
    # every training row is seen each epoch, less the few the larger key shard drops to keep DDP ranks in step
    validation_rows = loaded.metadata["data"]["validation_rows"]
    assert history[-1]["val_rows"] == validation_rows and 130 < validation_rows < 230
    assert 1797 - validation_rows - 60 <= history[-1]["rows"] <= 1797 - validation_rows
    assert loaded.metadata["data"]["rows"] == 1797 and len(loaded.metadata["data"]["fingerprint"]) == 16
    table = pq.read_table(trained["data"])
    posterior_mean, score = encode_matrix(
        loaded.model, loaded.normalizer, features_to_numpy(table, loaded.features)
    )
    assert posterior_mean.shape == (1797, 8) and np.isfinite(score).all()


def test_ddp_keeps_the_replicas_identical(trained):
    metrics = load_model_version(trained["model_root"], trained["version"]).metadata["metrics"]
    # all-reduced max minus min of every weight across the 2 ranks after the last step
    assert metrics["ddp_max_param_divergence"] == 0.0


def test_model_version_holds_the_training_story(trained):
    metadata = json.loads((trained["model_root"] / trained["version"] / "model.json").read_text())
    assert metadata["training"]["num_workers"] == 2
    assert metadata["architecture"] == {
        "input_dim": 64,
        "latent_dim": 8,
        "hidden_dims": [64, 32],
        "likelihood": "bernoulli",
        "architecture": "mlp",
        "image_shape": None,
        "conv_channels": [32, 64],
    }
    assert metadata["features"]["vector_column"] == "pixels" and metadata["features"]["image_shape"] == [
        1,
        8,
        8,
    ]
    assert metadata["normalizer"]["offset"][0] == 0.0 and metadata["normalizer"]["scale"][0] == 16.0


def test_nan_row_fails_before_training_and_writes_no_version(ray_cluster, tmp_path):
    values = np.random.default_rng(0).random((64, 4), dtype=np.float32)
    values[17, 2] = np.nan
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table(
            {"item_id": np.arange(64), "vec": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 4)}
        ),
        path,
    )
    config = TrainConfig(
        data=str(path),
        vector_column="vec",
        model_root=str(tmp_path / "models"),
        epochs=1,
        storage_path=str(tmp_path / "ray_results"),
    )
    with pytest.raises(Exception) as raised:
        train(config)
    error = find_input_error(raised.value)
    assert error is not None and "row item_id=17 has NaN or infinite" in str(error)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_weights_are_finite(trained):
    loaded = load_model_version(trained["model_root"], trained["version"])
    assert all(torch.isfinite(t).all() for t in loaded.model.state_dict().values())


def test_version_holds_the_diagnostics_and_the_report(trained):
    loaded = load_model_version(trained["model_root"], trained["version"])
    metrics = loaded.metadata["metrics"]
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert (
        metrics["val_negative_elbo"]
        == best["val_negative_elbo"]
        == min(h["val_negative_elbo"] for h in metrics["history"])
    )
    assert len(best["val_kl_per_dim"]) == 8 and sum(best["val_kl_per_dim"]) == pytest.approx(
        best["val_kl"], abs=1e-3
    )
    assert best["active_units"] == sum(v > 0.01 for v in best["val_posterior_mean_variance"])
    # importance weighting (k=1000) tightens the bound: never much above the one-sample -ELBO
    assert metrics["iw_samples"] == 1000 and 0 < metrics["iw_nll"] < metrics["val_negative_elbo"] + 0.5
    assert "collapse_warning" in metrics and metrics["resumed_from"] == []
    assert loaded.metadata["report"] == ["curves.png", "kl_per_dim.png", "latent_pca.png"]
    for name in loaded.metadata["report"]:
        assert (Path(loaded.path) / "report" / name).read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_workers_same_validation_elbo(trained, tmp_path):
    # A second run of the same config (fresh storage, so nothing is resumed) on the CPU.
    # Only the optimization is compared: the final diagnostics (IW-NLL, report, reference) are skipped.
    update = {
        "storage_path": str(tmp_path / "ray_results"),
        "model_root": str(tmp_path / "models"),
        "iw_samples": 0,
        "report_rows": 0,
        "reference_rows": 0,
    }
    config = trained["config"].model_copy(update=update)
    again = load_model_version(tmp_path / "models", train(config)).metadata["metrics"]
    first = load_model_version(trained["model_root"], trained["version"]).metadata["metrics"]
    assert again["val_negative_elbo"] == pytest.approx(first["val_negative_elbo"], abs=1e-4)
    assert [h["val_negative_elbo"] for h in again["history"]] == pytest.approx(
        [h["val_negative_elbo"] for h in first["history"]], abs=1e-4
    )


def test_conv_model_trains_and_encodes(ray_cluster, digits_parquet, tmp_path):
    config = TrainConfig(
        data=str(digits_parquet),
        vector_column="pixels",
        image_shape=[1, 8, 8],
        architecture="conv",
        conv_channels=[8, 16],
        hidden_dims=[32],
        latent_dim=4,
        epochs=1,
        batch_size=32,
        iw_samples=0,
        report_rows=0,
        model_root=str(tmp_path / "models"),
        storage_path=str(tmp_path / "ray_results"),
    )
    loaded = load_model_version(tmp_path / "models", train(config))
    assert loaded.metadata["architecture"]["architecture"] == "conv"
    posterior_mean, score = encode_matrix(
        loaded.model, loaded.normalizer, features_to_numpy(pq.read_table(digits_parquet), loaded.features)
    )
    assert posterior_mean.shape == (1797, 4) and np.isfinite(score).all()


def test_streaming_from_ray_data_trains_on_the_same_split(ray_cluster, digits_parquet, tmp_path):
    config = TrainConfig(
        data=str(digits_parquet),
        vector_column="pixels",
        latent_dim=4,
        hidden_dims=[32],
        epochs=2,
        batch_size=32,
        materialize=False,
        cpus_per_worker=0.5,
        iw_samples=0,
        report_rows=0,
        model_root=str(tmp_path / "models"),
        storage_path=str(tmp_path / "ray_results"),
    )
    loaded = load_model_version(tmp_path / "models", train(config))
    history = loaded.metadata["metrics"]["history"]
    validation_rows = loaded.metadata["data"]["validation_rows"]
    assert len(history) == 2 and history[-1]["val_rows"] == validation_rows
    # the second epoch streamed the data again; Ray's equal split drops at most one row per worker
    assert 1797 - validation_rows - 2 <= history[-1]["rows"] <= 1797 - validation_rows
    assert loaded.metadata["metrics"]["iw_nll"] is None


def test_a_run_name_cannot_resume_a_different_model(ray_cluster, digits_parquet, tmp_path):
    base = {
        "data": str(digits_parquet),
        "vector_column": "pixels",
        "hidden_dims": [16],
        "epochs": 1,
        "iw_samples": 0,
        "report_rows": 0,
        "run_name": "shared",
        "storage_path": str(tmp_path / "ray_results"),
        "model_root": str(tmp_path / "models"),
    }
    train(TrainConfig(**base, latent_dim=4))
    with pytest.raises(Exception) as raised:
        train(TrainConfig(**base, latent_dim=6))
    error = find_input_error(raised.value)
    assert error is not None and "run 'shared'" in str(error) and "different model" in str(error)
    assert len(list((tmp_path / "models").iterdir())) == 1


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"architecture": "conv", "image_shape": None}, "architecture: conv needs image_shape"),
        ({"label_column": "digit"}, "label column 'digit' not found"),
        ({"binarize": True, "likelihood": "gaussian"}, "binarize: true needs likelihood: bernoulli"),
        ({"architecture": "conv", "conv_channels": [4, 8, 16, 32]}, "too small for 4 stride-2 convolutions"),
    ],
)
def test_bad_training_config_fails_before_ray(digits_parquet, tmp_path, update, message):
    config = TrainConfig(
        **{
            "data": str(digits_parquet),
            "vector_column": "pixels",
            "image_shape": [1, 8, 8],
            "model_root": str(tmp_path / "models"),
            **update,
        }
    )
    with pytest.raises(InputError, match=message):
        train(config)
    assert not (tmp_path / "models").exists()


def test_validation_split_needs_rows_on_both_sides(ray_cluster, tmp_path):
    path = tmp_path / "three.parquet"
    pq.write_table(pa.table({"item_id": [1, 2, 3], "a": [0.1, 0.2, 0.3], "b": [1.0, 2.0, 3.0]}), path)
    config = TrainConfig(
        data=str(path),
        feature_columns=["a", "b"],
        likelihood="gaussian",
        validation_fraction=0.01,
        model_root=str(tmp_path / "models"),
        storage_path=str(tmp_path / "ray_results"),
    )
    with pytest.raises(Exception) as raised:
        train(config)
    error = find_input_error(raised.value)
    assert error is not None and "puts 0 of 3 rows in the validation split" in str(error)


def test_the_session_cluster_leaves_rays_default_ports_free(ray_cluster):
    """Other clusters (a job's private one, `ray start` in test_cluster) start while this one runs."""
    import socket

    assert ray_cluster.is_initialized()
    for port in (8265, 52365):  # Ray's default dashboard and dashboard-agent ports
        with socket.socket() as probe:
            probe.bind(("", port))  # raises if a process of the session cluster listens there
