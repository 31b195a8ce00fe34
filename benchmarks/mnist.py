"""The shared MNIST test split (10k images, IDX format) as Parquet: item_id, pixels (784 uint8), label."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# the shared copy beside the checkout, or MNIST_DIR (a machine where it lies elsewhere)
MNIST_DIR = Path(
    os.environ.get("MNIST_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_mnist_parquet(path: Path, mnist_dir: Path = MNIST_DIR) -> Path:
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    table = pa.table(
        {
            "item_id": pa.array(np.arange(len(images)), pa.int64()),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(images.ravel()), 784),
            "label": pa.array(labels.astype(np.int64)),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2500)
    return path
