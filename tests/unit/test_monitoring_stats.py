"""The statistics behind monitoring, on synthetic data (no Ray): Holm's adjustment, movement between
two versions' spaces, and the gate's checks on a LatentSample."""

import numpy as np
import pyarrow as pa
import pytest

from vae.embeddings.contract import latent_column
from vae.monitoring.gate import LatentSample, sample_mask
from vae.monitoring.statistics import holm, linear_cka, movement


def test_holm_adjustment():
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.5])), [0.04, 0.09, 0.09, 0.5])


def test_movement_ignores_rotation_and_sees_real_change():
    rng = np.random.default_rng(0)
    before = rng.standard_normal((600, 8)) * np.linspace(3, 0.5, 8)
    rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    keys = np.arange(600)
    # rotated, scaled, shifted: the same geometry
    same = movement(keys, before, 2.0 * before @ rotation + 5.0)
    assert (
        same["linear_cka"] == pytest.approx(1.0)
        and same["movement"]["max"] < 1e-9
        and same["knn_overlap"]["mean"] == 1.0
    )
    noisy = before @ rotation + 0.5 * rng.standard_normal(before.shape)
    noisy[7] += 8.0  # one entity moved far: the top mover
    changed = movement(keys, before, noisy)
    assert (
        0.5 < changed["linear_cka"] < 0.99
        and changed["top_movers"][0]["key"] == 7
        and changed["knn_overlap"]["mean"] < 0.9
    )
    unrelated = movement(keys, before, rng.standard_normal((600, 8)))
    assert unrelated["linear_cka"] < 0.1 and unrelated["knn_overlap"]["mean"] < 0.1
    # versions with different latent sizes compare too
    assert (
        movement(keys, before, before[:, :5] @ np.linalg.qr(rng.standard_normal((5, 5)))[0])["linear_cka"]
        > 0.9
    )
    assert linear_cka(before, before) == pytest.approx(1.0)


def test_a_sample_of_a_table_uses_the_key_hash_and_all_rows_for_the_variance():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((4000, 3)).astype(np.float32) * np.array([1.0, 0.5, 0.0], np.float32)
    table = pa.table(
        {
            "user": pa.array([f"u{i}" for i in range(4000)]),
            "latent": latent_column(latents),
            "anomaly_score": pa.array(rng.random(4000, dtype=np.float32)),
            "model_version": pa.array(["v1"] * 4000),
        }
    )
    sample = LatentSample.of_table(table, "t", sample_rows=1000)
    assert sample.model_version == "v1" and sample.total_rows == 4000 and 800 < len(sample.keys) < 1200
    expected = sample_mask(table.column("user"), 1000, 4000)
    assert sample.keys.tolist() == [f"u{i}" for i in np.flatnonzero(expected)]
    np.testing.assert_allclose(sample.variance, latents.astype(np.float64).var(axis=0))
    mixed = table.set_column(3, "model_version", pa.array(["v1", "v2"] * 2000))
    with pytest.raises(ValueError, match="holds vectors of 2 model versions"):
        LatentSample.of_table(mixed, "t", sample_rows=1000)
