"""Model outputs that are not finite never reach the table: refused with the row's key, or quarantined
with a reason (the encoder's check, on the arrays a model returned)."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from vae.embeddings.runs import UnitEncoder
from vae.errors import InputError


def encoder(on_bad_rows: str) -> SimpleNamespace:
    features = SimpleNamespace(key_column="item_id")
    return SimpleNamespace(
        options=SimpleNamespace(on_bad_rows=on_bad_rows), model_version=SimpleNamespace(features=features)
    )


def outputs():
    rows = pa.record_batch({"item_id": pa.array([10, 11, 12, 13], pa.int64()), "x": pa.array([1.0, 2, 3, 4])})
    posterior_mean = np.zeros((4, 2), np.float32)
    posterior_mean[2, 1] = np.nan
    anomaly_score = np.array([1.0, np.inf, 3.0, 4.0], np.float32)
    return rows, posterior_mean, anomaly_score


def test_a_non_finite_output_is_refused_naming_the_row():
    with pytest.raises(InputError, match=r"row item_id=11 has a model output .* not finite"):
        UnitEncoder._finite(encoder("fail"), *outputs(), "part-0.parquet")


def test_non_finite_outputs_are_quarantined_and_the_rest_kept():
    good, posterior_mean, anomaly_score, quarantine = UnitEncoder._finite(
        encoder("quarantine"), *outputs(), "part-0.parquet"
    )
    assert good.column("item_id").to_pylist() == [10, 13] and np.isfinite(anomaly_score).all()
    assert posterior_mean.shape == (2, 2) and np.isfinite(posterior_mean).all()
    assert quarantine.column("item_id").to_pylist() == [11, 12]
    assert all("not finite" in reason for reason in quarantine.column("quarantine_reason").to_pylist())


def test_finite_outputs_pass_unchanged():
    rows, posterior_mean, anomaly_score = outputs()
    posterior_mean[:] = 0.5
    anomaly_score[:] = 2.0
    good, _, _, quarantine = UnitEncoder._finite(encoder("fail"), rows, posterior_mean, anomaly_score, "p")
    assert good.num_rows == 4 and quarantine is None
