"""Training with Ray Train: 2 DDP workers on real Parquet through Ray Data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_jobs.cli import find_input_error
from ray_jobs.config import TrainConfig
from ray_jobs.train import _rank_shards, train
from vae import VAE, FeatureSchema, InputError, encode_matrix, features_to_numpy, load_model_version
from vae.data.keys import is_validation, key_hash, worker_of
from vae.versions.artifacts import load_reference


def test_training_lowers_the_loss_and_writes_a_loadable_version(trained):
    loaded = load_model_version(trained["model_root"], trained["version"])
    history = loaded.metadata["metrics"]["history"]
    assert len(history) == 6
    assert history[-1]["val_negative_elbo"] < history[0]["val_negative_elbo"]
    # far below where the same seed's untrained weights start
    torch.manual_seed(trained["config"].seed)
    untrained = VAE(loaded.model.config)
    matrix = features_to_numpy(pq.read_table(trained["data"]), loaded.features)
    _, untrained_scores = encode_matrix(untrained, loaded.normalizer, matrix)
    assert history[-1]["val_negative_elbo"] < float(untrained_scores.mean()) - 10.0
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
    """Other clusters (a job's private one, `ray start` in test_cluster) start while this one runs. Another
    test worker's private cluster may hold a default port meanwhile: only this session's processes (this
    process's descendants) must not."""
    import os

    import psutil

    assert ray_cluster.is_initialized()
    ours = {child.pid for child in psutil.Process(os.getpid()).children(recursive=True)} | {os.getpid()}
    assert len(ours) > 2, "the session cluster's processes are this process's children"
    for port in (8265, 52365):  # Ray's default dashboard and dashboard-agent ports
        listening = {
            c.pid for c in psutil.net_connections(kind="tcp") if c.laddr.port == port and c.status == "LISTEN"
        }
        assert not listening & ours, f"the session cluster listens on {port}"


def test_default_run_reports_to_ray_train_once_and_keeps_every_epoch(trained):
    # checkpoint_seconds (60) never passed in this short run: the final checkpoint is the only report,
    # and the history it carries still has every epoch, the best one picked from them
    run_dir = (
        Path(trained["config"].storage_path)
        / load_model_version(trained["model_root"], trained["version"]).metadata["training"]["run_name"]
    )
    assert len([c for c in run_dir.glob("checkpoint_*") if c.is_dir()]) == 1
    metrics = load_model_version(trained["model_root"], trained["version"]).metadata["metrics"]
    history = [h["val_negative_elbo"] for h in metrics["history"]]
    assert len(history) == 6 and metrics["best_epoch"] == 1 + int(np.argmin(history))


@pytest.fixture(scope="module")
def beta_run(ray_cluster, digits_parquet, tmp_path_factory) -> dict:
    """One named run, shared by three tests (each training run costs half a minute of Ray Train start-up):
    beta 8 warmed up over the run (the anomaly recipe), a checkpoint every 2 epochs and at the end."""
    work = tmp_path_factory.mktemp("beta_run")
    config = TrainConfig(
        data=str(digits_parquet),
        vector_column="pixels",
        latent_dim=4,
        hidden_dims=[32],
        epochs=7,
        batch_size=32,
        learning_rate=1e-2,
        beta=8.0,
        kl_warmup_epochs=6,
        lr_schedule="constant",
        early_stopping_patience=0,
        checkpoint_every=2,
        keep_checkpoints=10,
        iw_samples=0,
        report_rows=0,
        model_root=str(work / "models"),
        storage_path=str(work / "ray_results"),
        run_name="every-2",
    )
    return {"config": config, "work": work, "version": train(config)}


def test_a_run_with_another_beta_keeps_the_best_epoch_of_the_loss_it_trains_on(beta_run):
    """The -ELBO prefers an early epoch, before the KL weight reached 8; the version keeps the epoch
    with the best reconstruction + 8 * KL."""
    metrics = load_model_version(beta_run["work"] / "models", beta_run["version"]).metadata["metrics"]
    history = metrics["history"]
    loss = [h["val_reconstruction"] + 8.0 * h["val_kl"] for h in history]
    elbo = [h["val_negative_elbo"] for h in history]
    assert metrics["best_epoch"] == 1 + int(np.argmin(loss))
    assert np.argmin(elbo) < np.argmin(loss)  # the two criteria disagree here, so the test tells them apart


def test_checkpoints_at_checkpoint_epochs_and_at_the_end(beta_run):
    states = [
        json.loads((c / "state.json").read_text())
        for c in (beta_run["work"] / "ray_results" / "every-2").glob("checkpoint_*")
        if c.is_dir()
    ]
    assert sorted(s["epoch"] for s in states) == [2, 4, 6, 7]
    # each checkpoint holds the history up to its epoch; the final one is marked final
    assert sorted(len(s["history"]) for s in states) == [2, 4, 6, 7]
    assert [s["final"] is not None for s in sorted(states, key=lambda s: s["epoch"])] == [
        False,
        False,
        False,
        True,
    ]


def test_a_run_name_cannot_resume_a_different_model(beta_run):
    other_model = beta_run["config"].model_copy(update={"latent_dim": 6})
    with pytest.raises(Exception) as raised:
        train(other_model)
    error = find_input_error(raised.value)
    assert error is not None and "run 'every-2'" in str(error) and "different model" in str(error)
    assert len(list((beta_run["work"] / "models").iterdir())) == 1


def test_the_workers_reference_is_the_validation_rows_encoded_by_the_best_weights(trained):
    loaded = load_model_version(trained["model_root"], trained["version"])
    reference = load_reference(loaded)
    table = pq.read_table(trained["data"])
    table = table.filter(
        is_validation(key_hash(table.column("item_id")), trained["config"].validation_fraction)
    )
    latents, scores = encode_matrix(
        loaded.model, loaded.normalizer, features_to_numpy(table, loaded.features)
    )
    # all 175 validation rows (fewer than reference_rows), gathered from both ranks
    assert len(reference["anomaly_score"]) == table.num_rows
    np.testing.assert_allclose(np.sort(reference["anomaly_score"]), np.sort(scores), rtol=1e-5)
    order = np.argsort(reference["anomaly_score"])
    np.testing.assert_allclose(reference["posterior_mean"][order], latents[np.argsort(scores)], atol=1e-5)


def test_each_rank_gets_only_the_keys_that_hash_to_it(ray_cluster):
    keys = np.arange(5_000, dtype=np.int64) * 7919
    table = pa.table({"item_id": keys, "x": np.ones(len(keys), np.float32)})
    dataset = ray_cluster.data.from_arrow([table.slice(0, 2_000), table.slice(2_000)]).materialize()
    features = FeatureSchema("item_id", 1, feature_columns=("x",))
    shards = _rank_shards(dataset, features, 3)
    seen = []
    for rank, blocks in enumerate(shards):
        own = np.concatenate([ray_cluster.get(block).column("item_id").to_numpy() for block in blocks])
        assert (worker_of(key_hash(pa.array(own)), 3) == rank).all()
        seen.append(own)
    assert len(shards[0]) == 2  # one block per input block, for every rank
    assert sorted(np.concatenate(seen).tolist()) == sorted(keys.tolist())


def test_one_worker_takes_the_same_steps_and_reaches_the_same_elbo_with_a_readable_log(trained, tmp_path):
    # batch_size is the global batch: one worker takes as many steps as two. Run as a job (not a terminal).
    config = trained["config"]
    flags = {
        "data": str(trained["data"]),
        "vector-column": "pixels",
        "image-shape": "[1,8,8]",
        "label-column": "label",
        "latent-dim": "8",
        "hidden-dims": "[64,32]",
        "epochs": str(config.epochs),
        "batch-size": str(config.batch_size),
        "kl-warmup-epochs": "0",
        "learning-rate": str(config.learning_rate),
        "num-workers": "1",
        "cpus-per-worker": "2",
        "iw-samples": "0",
        "model-root": str(tmp_path / "models"),
        "storage-path": str(tmp_path / "ray_results"),
    }
    command = [
        sys.executable,
        "-m",
        "ray_jobs.cli",
        "train",
        *[f for k, v in flags.items() for f in (f"--{k}", v)],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_model_version(tmp_path / "models", sorted(os.listdir(tmp_path / "models"))[0]).metadata[
        "metrics"
    ]
    two = load_model_version(trained["model_root"], trained["version"]).metadata["metrics"]
    steps_one, steps_two = one["history"][-1]["step"], two["history"][-1]["step"]
    assert abs(steps_one - steps_two) <= 0.03 * steps_two, (steps_one, steps_two)
    assert one["val_negative_elbo"] == pytest.approx(two["val_negative_elbo"], abs=1.0)
    # the log: one line per epoch, no escape codes, no Ray Data progress bars, no checkpoint chatter
    output = done.stdout + done.stderr
    assert [int(n) for n in re.findall(r"epoch (\d+): -ELBO", output)] == list(range(1, config.epochs + 1))
    escaped = [line for line in output.splitlines() if "\x1b[" in line]
    assert not escaped, escaped[:3]
    # the driver's one statistics pass may log its progress; nothing from the workers' datasets
    from_workers = [
        line
        for line in output.splitlines()
        if "(RayTrainWorker" in line and "Setting up process group" not in line
    ]
    assert len(from_workers) == config.epochs and all("-ELBO" in line for line in from_workers), from_workers
    assert "Checkpoint successfully created" not in output and "model version" in output
    # nor Ray's notices: token auth on by default, Ray Data's per-dataset lines and progress bars
    for notice in ("Token authentication is enabled", "Starting execution of Dataset", "dataset sampling"):
        assert notice not in output, notice


STREAMING_SCRIPT = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, ray
from ray_jobs.config import TrainConfig
from ray_jobs.train import train
from vae import load_model_version

work = sys.argv[1]
# 164 MB of float32 features against a 100 MB object store, in few wide rows: Ray Data's cost is per row
rows, dim = 20_000, 2048
generator = np.random.default_rng(0)
for part in range(8):
    vectors = generator.standard_normal((rows // 8, dim), dtype=np.float32)
    keys = np.arange(part * rows // 8, (part + 1) * rows // 8)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    table = pa.table({"item_id": keys, "vec": column})
    pq.write_table(table, f"{work}/data/part-{part}.parquet")
ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False)
config = TrainConfig(
    data=f"{work}/data", vector_column="vec", likelihood="gaussian", latent_dim=4, hidden_dims=[16],
    epochs=2, batch_size=256, materialize=False, cpus_per_worker=0.5, iw_samples=0, report_rows=0,
    reference_rows=1000, model_root=f"{work}/models", storage_path=f"{work}/ray_results",
)
metrics = load_model_version(f"{work}/models", train(config)).metadata["metrics"]
print("STREAMED", [h["rows"] for h in metrics["history"]], metrics["history"][-1]["val_rows"])
"""


def test_streaming_trains_on_a_dataset_larger_than_the_object_store(tmp_path):
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", STREAMING_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        check=False,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows, validation_rows = (
        json.loads(done.stdout.split("STREAMED", 1)[1].split("] ")[0] + "]"),
        int(done.stdout.rsplit(" ", 1)[1]),
    )
    # both epochs streamed every training row (Ray's equal split drops at most one per worker)
    assert len(rows) == 2 and all(20_000 - validation_rows - 2 <= r <= 20_000 - validation_rows for r in rows)
    assert 1_700 < validation_rows < 2_300
