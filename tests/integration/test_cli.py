"""The console script as a user runs it: bad input exits 2 with one line (in this process: the
checks run before Ray starts), usage and help, and the demo end to end as a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.cli import flags

from feast_embeddings.settings import StoreSettings
from ray_jobs import cli
from ray_jobs.config import PublishConfig
from ray_jobs.publish import publish

REPO = Path(__file__).resolve().parents[2]


def vaectl(capsys, *args: str) -> tuple[int, str, str]:
    """`vaectl ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def assert_one_line_error(capsys, args: list[str], *fragments: str) -> None:
    code, _, stderr = vaectl(capsys, *args)
    assert code == 2, stderr[-2000:]
    error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_embed_missing_feature_column(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    renamed = pq.read_table(trained["data"]).rename_columns(["item_id", "image", "label"])
    pq.write_table(renamed, tmp_path / "renamed.parquet")
    args = [
        "embed",
        *flags(data="renamed.parquet", model_root=str(trained["model_root"])),
    ]
    assert_one_line_error(capsys, args, "renamed.parquet", "missing column(s) 'pixels'")
    assert list(tmp_path.iterdir()) == [tmp_path / "renamed.parquet"]  # no catalog, no warehouse


def test_embed_wrong_vector_length(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    values = np.zeros((10, 32), np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 32)
    pq.write_table(pa.table({"item_id": np.arange(10), "pixels": vectors}), tmp_path / "short.parquet")
    args = ["embed", "--data", "short.parquet", "--model-root", str(trained["model_root"])]
    assert_one_line_error(capsys, args, "'pixels' has vectors of length 32; the model expects length 64")
    assert list(tmp_path.iterdir()) == [tmp_path / "short.parquet"]


def test_train_missing_feature_column(digits_parquet, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", str(digits_parquet), "--vector-column", "embedding", "--model-root", "models"]
    assert_one_line_error(capsys, args, "missing column(s) 'embedding'", "pixels")
    assert not (tmp_path / "models").exists()


def test_train_wrong_vector_length_for_declared_image_shape(digits_parquet, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        *flags(
            data=str(digits_parquet), vector_column="pixels", image_shape="[1, 28, 28]", model_root="models"
        ),
    ]
    assert_one_line_error(capsys, args, "'pixels' has vectors of length 64; the model expects length 784")
    assert not (tmp_path / "models").exists()


def test_bad_config_values_and_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("data: x.parquet\nepochs: -1\nlatent_size: 3\n")
    assert_one_line_error(capsys, ["train", "--config", "c.yaml"], "epochs", "latent_size")
    assert_one_line_error(
        capsys, ["train", "--data", "nowhere.parquet"], "nowhere.parquet: no such file or directory"
    )
    assert_one_line_error(capsys, ["train", "--config", "missing.yaml"], "config missing.yaml")


def test_usage_and_help_list_jobs_and_options(capsys):
    code, _, stderr = vaectl(capsys)
    assert code == 2 and all(
        job in stderr
        for job in ("train", "embed", "publish", "monitor", "embeddings", "pipeline", "demo", "submit")
    )
    code, stdout, _ = vaectl(capsys, "embed", "--help")
    assert code == 0 and "--model-version" in stdout and "--num-encoders" in stdout


def test_usage_and_help_do_not_import_torch_ray_or_feast():
    """What makes `vaectl` and `vaectl <job> --help` answer in a fraction of a second."""
    script = (
        "import sys\nfrom ray_jobs import cli\ntry:\n    cli.main(['train', '--help'])\nexcept SystemExit:\n "
        "   pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'feast', 'pyarrow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=REPO
    )
    assert "--epochs" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


def documented_python_blocks() -> list[tuple[str, str]]:
    """(page, block) for every ```python block of README.md and of the documentation's pages, in the
    order of the site's navigation."""
    import yaml

    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages = ["README.md", *(f"docs/{page}" for entry in nav for page in entry.values())]
    return [
        (page, block.split("```", 1)[0])
        for page in pages
        for block in (REPO / page).read_text().split("```python\n")[1:]
    ]


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end_and_the_documented_snippets_run_as_written(feature_repo, tmp_path, monkeypatch):
    """`vaectl demo` with its defaults in a directory holding a copy of the repo's feature_repo, as
    `make demo` runs it; then every ```python block of README.md and docs/, as written, in that
    directory."""
    # a private local cluster, as `make demo`
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    # 5 epochs on day 1 (1,200 rows) without the default KL warm-up, 8 latent units: enough of them
    # active for the publish gate, which refuses a collapsed space
    command = [
        sys.executable,
        "-m",
        "ray_jobs.cli",
        "demo",
        *flags(epochs="5", kl_warmup_epochs="0", learning_rate="0.003", latent_dim="8"),
    ]
    result = subprocess.run(
        command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Demo finished." in result.stdout and "stage timings" in result.stdout
    versions = list((tmp_path / "demo_output" / "models").iterdir())
    assert len(versions) == 1
    catalog = StoreSettings.read(feature_repo / "feature_store.yaml").open_catalog()
    table = catalog.table("item", versions[0].name)
    assert [(b.batch_id, b.rows) for b in catalog.batches(table)] == [("day-1", 1200), ("day-2", 597)]
    assert catalog.read(table).num_rows == 1797 and "vaectl embeddings history item" in result.stdout
    assert (feature_repo / "data" / "online_store.db").is_file()
    assert result.stdout.count(f"model_version={versions[0].name}") == 3
    # the daily step ran each day: day 1 made the version current (through the publish gate)
    assert f"day-1 switched {versions[0].name}: the entity set's first version" in result.stdout
    assert f"day-2 published {versions[0].name}: 597 rows written online" in result.stdout
    # tracked in the embedded MLflow store under the work directory; the step made it vae-item@champion
    assert (tmp_path / "demo_output" / "mlflow.db").is_file()
    assert (
        f"vae-item@champion -> {versions[0].name}" in result.stdout
        and "vae-item version 1 (run " in result.stdout
    )

    # the vector-search snippet needs the version indexed: `vaectl publish --model-version latest
    # --vector-search`
    monkeypatch.chdir(tmp_path)
    vector_yaml = feature_repo / "vector_search" / "feature_store.yaml"
    vector_yaml.write_text(vector_yaml.read_text().replace("embedding_dim: 16", "embedding_dim: 8"))
    indexed = publish(
        PublishConfig(
            model_root="demo_output/models", monitoring="demo_output/monitoring", vector_search=True
        )
    )
    assert indexed["model_version"] == versions[0].name
    blocks = documented_python_blocks()
    assert {page for page, _ in blocks} >= {"README.md", "docs/serving.md", "docs/registry.md"}
    # the registry block sets MLFLOW_TRACKING_URI, as a user would: undone after the test (monkeypatch
    # records the variable's state on its first change), or every later job would use the demo's store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for page, block in blocks:
        # noqa: S102 (the documentation's own code)
        exec(compile(block, page, "exec"), {"__name__": "documented"})
