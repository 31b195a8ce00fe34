"""Mixed tables without Ray: the schema's JSON round trip, mergeable statistics, the fitted transforms,
codes for missing and unseen values, per-column likelihoods that are normalized and skip missing
entries, and the attribution columns."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from vae.data.features import FeatureSchema, features_to_numpy, row_problems
from vae.data.keys import key_hash
from vae.data.tabular import TableStats, fit_table, infer_kinds, with_unseen
from vae.embeddings.contract import attribution_columns
from vae.losses import column_nll, reconstruction_nll
from vae.model import VAE, ModelConfig

KINDS = (("city", "categorical"), ("amount", "numeric"), ("member", "binary"))


def table(rows: int = 1000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3.0, 1.0, rows)
    return pa.table(
        {
            "id": np.arange(rows),
            "city": rng.choice(["oslo", "lima", "pune"], rows, p=[0.6, 0.3, 0.1]),
            "amount": pa.array(amount, mask=rng.random(rows) < 0.1),
            "member": rng.random(rows) < 0.3,
        }
    )


def fitted(data: pa.Table, **options):
    stats = TableStats.of(data, KINDS, key_hash(data.column("id")))
    schema = fit_table(stats, KINDS, {}, **options)
    return schema, FeatureSchema("id", 3, feature_columns=("city", "amount", "member"), table=schema)


def test_kinds_come_from_parquet_types_and_declarations():
    schema = table().schema
    assert infer_kinds(schema, "t", ("city", "amount", "member"), {}) == KINDS
    declared = infer_kinds(schema.append(pa.field("zip", pa.int32())), "t", ("zip",), {"zip": "categorical"})
    assert declared == (("zip", "categorical"),)
    with pytest.raises(Exception, match="'city' is string, which cannot be a numeric column"):
        infer_kinds(schema, "t", ("city",), {"city": "numeric"})


def test_the_schema_survives_model_json_and_gives_the_same_codes():
    data = table()
    schema, features = fitted(data)
    again = FeatureSchema.from_dict(json.loads(json.dumps(features.to_dict())))
    assert again == features
    np.testing.assert_array_equal(features_to_numpy(data, again), features_to_numpy(data, features))
    city, amount, _ = schema.columns
    assert city.categories == ("oslo", "lima", "pune") and city.width == 4
    assert amount.transform == "asinh"  # auto: robust scaling, then a signed log of the tails


def test_statistics_merge_the_same_in_any_order_and_split():
    data = table(3000)
    hashes = key_hash(data.column("id"))
    whole = TableStats.of(data, KINDS, hashes)
    first, second = (
        TableStats.of(data.slice(a, b), KINDS, hashes[a : a + b]) for a, b in ((0, 1200), (1200, 1800))
    )
    for merged in (first.merge(second), second.merge(first)):
        assert merged.rows == whole.rows and merged.missing == whole.missing
        assert merged.category_counts == whole.category_counts
        assert merged.sample_hashes == whole.sample_hashes
        np.testing.assert_array_equal(merged.sample["amount"], whole.sample["amount"])


def test_robust_scaling_ignores_outliers_and_quantile_extrapolates():
    data = table(2000)
    values = data.column("amount").to_numpy(zero_copy_only=False).copy()
    values[:20] = 1e6  # 1% wild values
    data = data.set_column(2, "amount", pa.array(values))
    schema, _ = fitted(data, default_transform="robust")
    clean, _ = fitted(table(2000), default_transform="robust")
    assert schema.columns[1].scale == pytest.approx(clean.columns[1].scale, rel=0.1)  # a std would be 50x
    quantile, features = fitted(data, default_transform="quantile")
    probe = pa.table(
        {"id": [0, 1, 2], "city": ["oslo"] * 3, "amount": [1.0, 30.0, 1e9], "member": [True] * 3}
    )
    codes = features_to_numpy(probe, features)[:, 1]
    assert codes[0] < codes[1] < codes[2] and codes[2] > 3.0  # monotone; far outside stays far out


def test_asinh_keeps_the_order_tames_the_tail_and_decodes_back():
    """asinh: the robust scaling, then a signed log past one robust scale. A value 1000 robust scales
    out is about 7.6 out, not 1000 (one near-constant column cannot drown the others' surprise);
    within the bulk it stays close to the robust code; decoding returns the input's units."""
    from vae.impute import decode_column

    data = table(2000)
    robust, robust_features = fitted(data, default_transform="robust")
    asinh, asinh_features = fitted(data, default_transform="asinh")
    spec, linear = asinh.columns[1], robust.columns[1]
    assert spec.transform == "asinh" and (spec.center, spec.scale) == (linear.center, linear.scale)
    amounts = [linear.center, linear.center + 0.5 * linear.scale, linear.center + 1000 * linear.scale, 1e9]
    probe = pa.table({"id": range(4), "city": ["oslo"] * 4, "amount": amounts, "member": [True] * 4})
    codes = features_to_numpy(probe, asinh_features)[:, 1]
    plain = features_to_numpy(probe, robust_features)[:, 1]
    assert codes[0] == 0.0 and codes[1] == pytest.approx(plain[1], rel=0.05)
    assert codes[2] == pytest.approx(math.asinh(1000), rel=1e-5) and plain[2] == pytest.approx(1000, rel=1e-5)
    assert list(codes) == sorted(codes) and codes[3] > codes[2]  # monotone: the extreme still ranks first
    decoded = decode_column(spec, codes[:3]).to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(decoded, amounts[:3], rtol=1e-5)


@pytest.mark.parametrize("transform", ["robust", "standard", "log", "asinh", "quantile"])
def test_the_log_jacobian_is_the_slope_of_each_transform_and_skips_missing_values(transform):
    """Raw-units -log p = codes' -log p - log_jacobian: the slope of each transform at each value, checked
    against a finite difference of the codes themselves; a missing value adds nothing."""
    data = table(2000)
    schema, features = fitted(data, default_transform=transform)
    amounts = np.array([0.5, 5.0, 25.0, 80.0, 3e3, 1e5, math.nan])
    step = 1e-4 * np.maximum(np.nan_to_num(amounts, nan=1.0), 1.0)  # within one quantile segment

    def probe(values):
        n = len(values)
        return pa.table({"id": range(n), "city": ["oslo"] * n, "amount": values, "member": [True] * n})

    def codes(values):
        return features_to_numpy(probe(values), features)[:, 1].astype(np.float64)

    slope = np.log(np.abs(codes(amounts + step) - codes(amounts - step)) / (2 * step))
    found = schema.log_jacobian(probe(amounts))
    np.testing.assert_allclose(found[:-1], slope[:-1], atol=2e-2)
    assert found[-1] == 0.0
    distinct = len(set(np.round(found[:-1], 3)))  # affine: one slope; the others: one per value
    assert distinct == 1 if transform in ("robust", "standard") else distinct > 4


def test_missing_values_are_nan_codes_and_unseen_categories_other_or_refused():
    data = table()
    schema, features = fitted(data)
    probe = pa.table(
        {
            "id": [1, 2],
            "city": ["lima", "paris"],
            "amount": pa.array([None, 5.0], pa.float64()),
            "member": [None, True],
        }
    )
    assert row_problems(probe, features)[1].startswith("has category 'paris' in column 'city'")
    other = FeatureSchema(
        "id", 3, feature_columns=features.feature_columns, table=with_unseen(schema, "other")
    )
    assert row_problems(probe, other) is None
    codes = features_to_numpy(probe, other)
    assert codes[0, 0] == 1 and codes[1, 0] == 3  # lima; paris -> the other bucket
    assert math.isnan(codes[0, 1]) and math.isnan(codes[0, 2])
    refuse = FeatureSchema(
        "id", 3, feature_columns=features.feature_columns, table=fitted(data, missing="refuse")[0]
    )
    assert "has no value in column 'amount' (missing: refuse)" in row_problems(probe, refuse)[0]
    huge = probe.set_column(2, "amount", pa.array([1e39, 5.0], pa.float64()))
    assert row_problems(huge, other)[0] == (
        "has a value in column 'amount' beyond float32's range (|x| > 3.4e+38), which the model computes in"
    )


def model(layout=(("categorical", 4), ("numeric", 1), ("binary", 1))) -> VAE:
    torch.manual_seed(0)
    return VAE(
        ModelConfig(len(layout), latent_dim=2, hidden_dims=(8,), likelihood="mixed", column_layout=layout)
    )


def test_column_likelihoods_are_normalized_and_skip_missing_entries():
    vae = model()
    decoded = torch.zeros(1, 6)
    # zero logits: the categorical is uniform over 3 categories + other, the binary is a fair coin
    x = torch.tensor([[2.0, 0.0, 1.0]])
    nll = column_nll(vae, decoded, x)[0]
    assert nll[0].item() == pytest.approx(math.log(4)) and nll[2].item() == pytest.approx(math.log(2))
    assert nll[1].item() == pytest.approx(0.5 * math.log(2 * math.pi))  # N(0; 0, 1)
    # a missing entry adds nothing, whatever the decoder says about it
    missing = torch.tensor([[2.0, math.nan, 1.0]])
    for value in (0.0, 5.0):
        shifted = decoded.clone()
        shifted[0, 4] = value
        assert reconstruction_nll(vae, shifted, missing).item() == pytest.approx((nll[0] + nll[2]).item())
    # probabilities over every category sum to one: a real likelihood
    logits = torch.randn(1, 6)
    total = sum(
        math.exp(-column_nll(vae, logits, torch.tensor([[float(c), 0.0, 0.0]]))[0, 0].item())
        for c in range(4)
    )
    assert total == pytest.approx(1.0)


def test_the_encoder_tells_missing_from_zero():
    vae = model()
    zero, missing = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, math.nan, 0.0]])
    assert not torch.allclose(vae.encode(zero).mean, vae.encode(missing).mean)


def test_attribution_names_the_top_columns_with_their_shares():
    surprise = np.array([[0.1, 5.0, 0.4, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    columns, shares = attribution_columns(surprise, ("a", "b", "c", "d"))
    assert columns.to_pylist() == [["b", "c", "a"], ["a", "b", "c"]]
    np.testing.assert_allclose(shares.to_pylist()[0], [5.0 / 5.5, 0.4 / 5.5, 0.1 / 5.5], rtol=1e-6)
    assert shares.to_pylist()[1] == [0.0, 0.0, 0.0]
