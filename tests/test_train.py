"""Training with Ray Train: 2 DDP workers on real Parquet through Ray Data."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_jobs.common import find_input_error
from ray_jobs.train import TrainConfig, train
from vae import encode_matrix, features_to_numpy, load_model_version


def test_training_lowers_the_loss_and_writes_a_loadable_version(trained):
    loaded = load_model_version(trained["model_root"], trained["version"])
    history = loaded.metadata["metrics"]["history"]
    assert len(history) == 6
    assert history[-1]["negative_elbo"] < history[0]["negative_elbo"] - 5.0
    # every row is seen each epoch, less what Ray's equal split drops to keep DDP ranks in step
    assert 1797 - 1 <= history[-1]["rows"] <= 1797
    assert loaded.metadata["data"]["rows"] == 1797 and len(loaded.metadata["data"]["fingerprint"]) == 16
    table = pq.read_table(trained["data"])
    posterior_mean, score = encode_matrix(loaded.model, loaded.normalizer, features_to_numpy(table, loaded.features))
    assert posterior_mean.shape == (1797, 8) and np.isfinite(score).all()


def test_ddp_keeps_the_replicas_identical(trained):
    metrics = load_model_version(trained["model_root"], trained["version"]).metadata["metrics"]
    # all-reduced max minus min of every weight across the 2 ranks after the last step
    assert metrics["ddp_max_param_divergence"] == 0.0


def test_model_version_holds_the_training_story(trained):
    metadata = json.loads((trained["model_root"] / trained["version"] / "model.json").read_text())
    assert metadata["training"]["num_workers"] == 2
    assert metadata["architecture"] == {"input_dim": 64, "latent_dim": 8, "hidden_dims": [64, 32], "likelihood": "bernoulli"}
    assert metadata["features"]["vector_column"] == "pixels" and metadata["features"]["image_shape"] == [1, 8, 8]
    assert metadata["normalizer"]["offset"][0] == 0.0 and metadata["normalizer"]["scale"][0] == 16.0


def test_nan_row_fails_before_training_and_writes_no_version(ray_cluster, tmp_path):
    values = np.random.default_rng(0).random((64, 4), dtype=np.float32)
    values[17, 2] = np.nan
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"item_id": np.arange(64), "vec": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 4)}), path)
    config = TrainConfig(data=str(path), vector_column="vec", model_root=str(tmp_path / "models"), epochs=1,
                         storage_path=str(tmp_path / "ray_results"))
    with pytest.raises(Exception) as raised:
        train(config)
    error = find_input_error(raised.value)
    assert error is not None and "row item_id=17 has NaN or infinite" in str(error)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_weights_are_finite(trained):
    loaded = load_model_version(trained["model_root"], trained["version"])
    assert all(torch.isfinite(t).all() for t in loaded.model.state_dict().values())
