"""The key hash decides the validation split, the worker shards and the monitoring sample. Its
values are pinned here: a changed hash would silently move every split and sample."""

import numpy as np
import pyarrow as pa
import pytest

from vae.data.keys import in_sample, is_validation, key_hash, worker_of

INT_KEYS = [0, 1, -5, 7919, 2**40, -(2**63)]
# splitmix64 of the int64 bits (of 0: the generator's well-known first output, 0xE220A8397B1DCDAF)
INT_HASHES = [
    0xE220A8397B1DCDAF,
    0x910A2DEC89025CC1,
    0x16B1CBA95FC60262,
    0x436D6B84A3314152,
    0x1FDD7128F310C389,
    0x481EC0A212A9F3DB,
]
STRING_KEYS = ["", "a", "item-42", "ünïcødé"]
# the first 8 bytes of blake2b of the UTF-8 key, little-endian
STRING_HASHES = [0xB4B2797457A0A6E4, 0x2F42665B399EF840, 0x0D358A34F7FC17EA, 0x394EA6676CD6AE59]


def test_hash_values_are_pinned_for_integer_and_string_keys():
    assert key_hash(pa.array(INT_KEYS, pa.int64())).tolist() == INT_HASHES
    assert key_hash(pa.array(INT_KEYS, pa.int64())).dtype == np.uint64
    assert key_hash(pa.array(STRING_KEYS)).tolist() == STRING_HASHES
    assert key_hash(pa.array(STRING_KEYS, pa.large_string())).tolist() == STRING_HASHES
    # other integer widths are the same key
    assert key_hash(pa.array([1, 7919], pa.int32())).tolist() == [INT_HASHES[1], INT_HASHES[3]]


def test_split_shards_and_sample_use_their_own_bits():
    hashes = np.array(INT_HASHES + STRING_HASHES, dtype=np.uint64)
    assert is_validation(hashes, 0.5).tolist() == [
        False,
        True,
        True,
        True,
        True,
        False,
        True,
        False,
        False,
        True,
    ]
    assert worker_of(hashes, 3).tolist() == [1, 0, 0, 2, 1, 1, 2, 0, 2, 0]
    buckets = ((hashes >> np.uint64(40)) % np.uint64(1 << 20)).tolist()
    assert buckets == [139432, 68141, 438731, 224619, 1039729, 532160, 307833, 1000038, 865674, 609958]
    assert in_sample(hashes, 0.5).tolist() == [bucket < (1 << 19) for bucket in buckets]
    assert in_sample(hashes, 1.0).all() and not in_sample(hashes, 0.0).any()


def test_split_is_stable_balanced_and_independent_of_order_and_chunking():
    keys = pa.array(np.arange(20_000), pa.int64())
    hashes = key_hash(keys)
    assert np.array_equal(hashes, key_hash(pa.chunked_array([keys[:7_000], keys[7_000:]])))
    held_out = is_validation(hashes, 0.2)
    assert 0.19 < held_out.mean() < 0.21
    order = np.random.default_rng(0).permutation(20_000)
    assert np.array_equal(is_validation(key_hash(keys.take(pa.array(order))), 0.2), held_out[order])
    assert np.bincount(worker_of(hashes, 3), minlength=3).min() > 6_300
    strings = key_hash(pa.array([f"user-{i}" for i in range(10_000)]))
    assert is_validation(strings, 0.1).mean() == pytest.approx(0.1, abs=0.01)
    # the sample's bits are independent of the split's: about the same share of each side is sampled
    sampled = in_sample(hashes, 0.25)
    assert sampled[held_out].mean() == pytest.approx(0.25, abs=0.03)
    assert sampled[~held_out].mean() == pytest.approx(0.25, abs=0.02)
