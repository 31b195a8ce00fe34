"""One stable 64-bit hash per entity key, and which of its bits decide what.

    bits  0-19   validation split       is_validation(hashes, fraction)
    bits 20-63   training worker shard  worker_of(hashes, num_workers)   ((hash >> 20) mod workers)
    bits 40-59   monitoring sample      in_sample(hashes, fraction)

The split, the shards and the sample depend only on the key: not on file layout, block order,
worker count or the machine. Changing any of this moves every split and sample, so the values
are pinned in tests/unit/test_keys.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

_BUCKETS = 1 << 20  # 20 bits: a fraction is resolved to about one in a million


def key_hash(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """splitmix64 of an integer key's int64 bits; the first 8 bytes of blake2b of a string key."""
    if pa.types.is_integer(keys.type):
        values = np.asarray(keys.to_numpy(zero_copy_only=False), dtype=np.int64).view(np.uint64)
        return _splitmix64(values)
    digests = (hashlib.blake2b(str(key).encode(), digest_size=8).digest() for key in keys.to_pylist())
    return np.fromiter((int.from_bytes(d, "little") for d in digests), dtype=np.uint64, count=len(keys))


def is_validation(hashes: np.ndarray, validation_fraction: float) -> np.ndarray:
    """True for rows held out for validation: the low 20 bits fall below the fraction."""
    return (hashes % np.uint64(_BUCKETS)) < np.uint64(round(validation_fraction * _BUCKETS))


def worker_of(hashes: np.ndarray, num_workers: int) -> np.ndarray:
    """Which of num_workers owns each row: bits above the split's, so shards stay balanced."""
    return ((hashes >> np.uint64(20)) % np.uint64(num_workers)).astype(np.int64)


def in_sample(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """True for rows in a monitoring sample of about `fraction`: bits 40-59, independent of the
    split and the shards, so two versions' embeddings of the same data sample the same keys."""
    if fraction >= 1.0:
        return np.ones(len(hashes), bool)
    buckets = (hashes >> np.uint64(40)) % np.uint64(_BUCKETS)
    return buckets < np.uint64(round(fraction * _BUCKETS))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = values + np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))
