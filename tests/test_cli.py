"""The console script as a user runs it: bad input exits non-zero with one line; the demo runs end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

VAECTL = [sys.executable, "-m", "ray_jobs.cli"]


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # No RAY_ADDRESS: each command starts and stops a private local cluster, as `make demo` does.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return subprocess.run([*VAECTL, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_embed_missing_feature_column(trained, tmp_path):
    renamed = pq.read_table(trained["data"]).rename_columns(["item_id", "image", "label"])
    pq.write_table(renamed, tmp_path / "renamed.parquet")
    result = run(["embed", "--data", "renamed.parquet", "--model-root", str(trained["model_root"]), "--output", "out"], tmp_path)
    assert_one_line_error(result, "renamed.parquet", "missing column(s) 'pixels'")
    assert not (tmp_path / "out").exists()


def test_embed_wrong_vector_length(trained, tmp_path):
    values = np.zeros((10, 32), np.float32)
    pq.write_table(pa.table({"item_id": np.arange(10), "pixels": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 32)}),
                   tmp_path / "short.parquet")
    result = run(["embed", "--data", "short.parquet", "--model-root", str(trained["model_root"]), "--output", "out"], tmp_path)
    assert_one_line_error(result, "'pixels' has vectors of length 32; the model expects length 64")
    assert not (tmp_path / "out").exists()


def test_train_missing_feature_column(digits_parquet, tmp_path):
    result = run(["train", "--data", str(digits_parquet), "--vector-column", "embedding", "--model-root", "models"], tmp_path)
    assert_one_line_error(result, "missing column(s) 'embedding'", "pixels")
    assert not (tmp_path / "models").exists()


def test_train_wrong_vector_length_for_declared_image_shape(digits_parquet, tmp_path):
    result = run(["train", "--data", str(digits_parquet), "--vector-column", "pixels", "--image-shape", "[1, 28, 28]",
                  "--model-root", "models"], tmp_path)
    assert_one_line_error(result, "'pixels' has vectors of length 64; the model expects length 784")
    assert not (tmp_path / "models").exists()


def test_bad_config_values_and_files(tmp_path):
    (tmp_path / "c.yaml").write_text("data: x.parquet\nepochs: -1\nlatent_size: 3\n")
    result = run(["train", "--config", "c.yaml"], tmp_path)
    assert_one_line_error(result, "epochs", "latent_size")
    result = run(["train", "--data", "nowhere.parquet"], tmp_path)
    assert_one_line_error(result, "nowhere.parquet: no such file or directory")


def test_help_lists_jobs_and_options(tmp_path):
    result = run([], tmp_path)
    assert result.returncode == 2 and all(job in result.stderr for job in ("train", "embed", "publish", "demo"))
    result = run(["embed", "--help"], tmp_path)
    assert result.returncode == 0 and "--model-version" in result.stdout and "--num-encoders" in result.stdout


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end(feature_repo, tmp_path):
    # 3 epochs with the default 5-epoch KL warm-up leave every unit inactive, and the publish gate refuses a collapsed space
    result = run(["demo", "--work-dir", "work", "--feature-repo", str(feature_repo), "--epochs", "3", "--kl-warmup-epochs", "0",
                  "--learning-rate", "0.003"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Demo finished." in result.stdout and "stage timings" in result.stdout
    versions = list((tmp_path / "work" / "models").iterdir())
    assert len(versions) == 1
    embeddings = feature_repo / "data" / "embeddings" / versions[0].name
    assert pq.read_table(embeddings).num_rows == 1797
    assert (feature_repo / "data" / "online_store.db").is_file()
    assert result.stdout.count(f"model_version={versions[0].name}") == 3 and "(gate passed)" in result.stdout
