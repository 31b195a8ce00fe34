"""A killed embed job leaves nothing visible in the version's table, and the same command run again
resumes it (the files staged before the kill are committed as they are) and ends with exactly one row
per input row."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from helpers.cli import flags

from vae import (
    VAE,
    FeatureSchema,
    FeatureStats,
    ModelConfig,
    Normalizer,
    encode_matrix,
    features_to_numpy,
    load_model_version,
    save_model_version,
)
from vae.embeddings.catalog import EmbeddingsCatalog

REPO = Path(__file__).resolve().parents[2]
ROWS, UNIT_ROWS = 60_000, 1_000
STAGED = "warehouse/vae.item/*/data/batch_id=day-1/*/part-*.parquet"  # a run's files, in its table's location


def test_killed_driver_then_rerun_gives_exactly_one_row_per_input_row(tmp_path):
    # 28x28 uint8 images and a wide untrained MLP: about 4 s of encoding on 2 cores, time to kill mid-way
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(ROWS, 784), dtype=np.uint8)
    table = pa.table(
        {
            "item_id": np.arange(ROWS),
            "image": pa.FixedSizeListArray.from_arrays(pa.array(images.ravel()), 784),
        }
    )
    pq.write_table(table, tmp_path / "images.parquet", row_group_size=UNIT_ROWS)
    torch.manual_seed(0)
    model = VAE(ModelConfig(784, 16, (1024, 1024), "bernoulli"))
    features = FeatureSchema("item_id", 784, vector_column="image", image_shape=(1, 28, 28))
    normalizer = Normalizer.fit(FeatureStats.of(images[:1000].astype(np.float32)), "bernoulli")
    version = save_model_version(tmp_path / "models", model, normalizer, features, {}, {}, {"source": "test"})

    command = [
        sys.executable,
        "-m",
        "ray_jobs.cli",
        "embed",
        *flags(
            data=str(tmp_path / "images.parquet"),
            model_root=str(tmp_path / "models"),
            catalog=f"sqlite:///{tmp_path}/catalog.db",
            warehouse=str(tmp_path / "warehouse"),
            batch="day-1",
            rows_per_file=str(UNIT_ROWS),
        ),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    # its own session, so the driver and the local Ray cluster it started are one process group to kill
    driver = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob(STAGED))) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.poll() is None, "the job finished before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    staged = {str(p): _identity(p) for p in tmp_path.glob(STAGED)}
    done_before = len(staged)
    catalog = EmbeddingsCatalog(f"sqlite:///{tmp_path}/catalog.db", str(tmp_path / "warehouse"))
    stored = catalog.table("item", version)
    # nothing visible to readers: the table has no snapshot yet
    assert stored.current_snapshot() is None and catalog.read(stored).num_rows == 0

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Ray's worker processes are not in the driver's process group: one may finish the unit it
    # was encoding (its file lands whole) before it notices that its raylet is gone.
    resumed = re.search(r"resuming run \w+: (\d+) of (\d+) output files already written", rerun.stderr)
    assert resumed and done_before <= int(resumed[1]) < ROWS // UNIT_ROWS == int(resumed[2]), rerun.stderr[
        -3000:
    ]
    stored = catalog.table("item", version)
    output = catalog.read(stored)
    keys = output.column("item_id").to_numpy()
    # exactly one row per input row, in one batch committed once
    assert len(keys) == ROWS and np.array_equal(np.sort(keys), np.arange(ROWS))
    assert [(b.batch_id, b.rows) for b in catalog.batches(stored)] == [("day-1", ROWS)]
    assert len(stored.snapshots()) == 1
    # the files staged before the kill were kept, not encoded again: the same files (inode, mtime) were
    # committed, and every staged file is in the table
    committed = set(catalog.data_files(stored))
    assert set(staged) <= committed and {str(p) for p in tmp_path.glob(STAGED)} == committed
    assert {path: _identity(Path(path)) for path in staged} == staged

    loaded = load_model_version(tmp_path / "models", version)
    sample = output.sort_by("item_id").slice(0, 2000)
    expected, _ = encode_matrix(
        loaded.model, loaded.normalizer, features_to_numpy(table.slice(0, 2000), loaded.features)
    )
    latent = sample.column("latent").combine_chunks().flatten().to_numpy().reshape(2000, 16)
    np.testing.assert_allclose(latent, expected, atol=1e-5)


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns
