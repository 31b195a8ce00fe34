"""Arrow -> numpy conversion: zero-copy where promised, clear errors naming column and row."""

import numpy as np
import pyarrow as pa
import pytest

from vae import FeatureSchema, FeatureStats, InputError, Normalizer, features_to_numpy, infer_feature_schema


def vector_table(values: np.ndarray, keys=None) -> pa.Table:
    rows, dim = values.shape
    keys = np.arange(rows) if keys is None else keys
    return pa.table(
        {"item_id": keys, "vec": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim)}
    )


def test_fixed_size_float32_list_converts_without_copy():
    values = np.random.default_rng(0).random((50, 8), dtype=np.float32)
    table = vector_table(values)
    features = infer_feature_schema(table.schema, "t", "item_id", vector_column="vec")
    matrix = features_to_numpy(table, features)
    assert np.array_equal(matrix, values)
    buffer = table.column("vec").chunk(0).values.buffers()[1]
    assert matrix.__array_interface__["data"][0] == buffer.address  # same memory, no copy


def test_sliced_batches_keep_their_offset():
    values = np.arange(40, dtype=np.float32).reshape(10, 4)
    table = vector_table(values).slice(3, 4)
    features = FeatureSchema("item_id", 4, vector_column="vec")
    assert np.array_equal(features_to_numpy(table, features), values[3:7])


def test_scalar_columns_and_other_dtypes():
    table = pa.table({"id": ["a", "b"], "x": [1, 2], "y": [0.5, 1.5]})
    features = infer_feature_schema(table.schema, "t", "id", feature_columns=("x", "y"))
    assert features.dim == 2
    assert np.array_equal(features_to_numpy(table, features), np.array([[1, 0.5], [2, 1.5]], np.float32))


def test_missing_column_names_it():
    table = pa.table({"item_id": [1], "other": [1.0]})
    with pytest.raises(InputError, match=r"missing column\(s\) 'vec'"):
        infer_feature_schema(table.schema, "data.parquet", "item_id", vector_column="vec")


def test_wrong_fixed_vector_length_names_column_and_lengths():
    table = vector_table(np.zeros((3, 5), np.float32))
    with pytest.raises(InputError, match=r"'vec' has vectors of length 5; the model expects length 8"):
        features_to_numpy(table, FeatureSchema("item_id", 8, vector_column="vec"))


def test_wrong_variable_vector_length_names_row():
    table = pa.table({"item_id": [10, 11], "vec": pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32()))})
    with pytest.raises(InputError, match=r"row item_id=11 has a vector of length 1"):
        features_to_numpy(table, FeatureSchema("item_id", 2, vector_column="vec"))


def test_nan_and_inf_are_refused_naming_the_row():
    values = np.ones((4, 3), np.float32)
    values[2, 1] = np.inf
    with pytest.raises(InputError, match=r"row item_id=102 has NaN or infinite"):
        features_to_numpy(
            vector_table(values, keys=np.arange(100, 104)), FeatureSchema("item_id", 3, vector_column="vec")
        )


def test_finite_values_beyond_float32_are_refused_naming_column_and_row():
    # 1e39 is finite in float64 and inf in the float32 the model computes in: a bad input, not a bad output
    scalars = pa.table({"item_id": [1, 2, 3], "x": [0.5, 1e39, -2.0], "y": [1.0, 2.0, 3.0]})
    with pytest.raises(InputError, match=r"row item_id=2 has a value in column 'x' beyond float32's range"):
        features_to_numpy(scalars, FeatureSchema("item_id", 2, feature_columns=("x", "y")))
    vectors = pa.table(
        {"item_id": [7, 8], "vec": pa.array([[1.0, 2.0], [1.0, -4e38]], pa.list_(pa.float64()))}
    )
    with pytest.raises(InputError, match=r"row item_id=8 has a vector value beyond float32's range"):
        features_to_numpy(vectors, FeatureSchema("item_id", 2, vector_column="vec"))
    fine = pa.table({"item_id": [1], "x": [3.0e38], "y": [1.0]})
    assert np.isfinite(features_to_numpy(fine, FeatureSchema("item_id", 2, feature_columns=("x", "y")))).all()


def test_null_vector_is_refused():
    table = pa.table({"item_id": [1, 2], "vec": pa.array([[1.0], None], pa.list_(pa.float32(), 1))})
    with pytest.raises(InputError, match=r"row item_id=2 has no value in column 'vec'"):
        features_to_numpy(table, FeatureSchema("item_id", 1, vector_column="vec"))


def test_non_numeric_vector_is_refused():
    table = pa.table({"item_id": [1], "vec": pa.array([["a"]], pa.list_(pa.string(), 1))})
    with pytest.raises(InputError, match="must hold numbers"):
        infer_feature_schema(table.schema, "t", "item_id", vector_column="vec")


def test_stats_merge_equals_stats_of_whole_and_fingerprint_ignores_order():
    values = np.random.default_rng(1).normal(size=(100, 6)).astype(np.float32)
    whole = FeatureStats.of(values)
    merged = FeatureStats.of(values[60:]).merge(FeatureStats.of(values[:60]))
    assert merged.count == 100
    assert np.allclose(merged.mean, values.mean(0)) and np.allclose(merged.std, values.std(0), atol=1e-5)
    assert merged.fingerprint == whole.fingerprint
    changed = values.copy()
    changed[5, 2] += 1e-3
    assert FeatureStats.of(changed).fingerprint != whole.fingerprint


def test_normalizers():
    values = np.array([[0, 16], [8, 4]], np.float32)
    bernoulli = Normalizer.fit(FeatureStats.of(values), "bernoulli")
    assert np.allclose(bernoulli(values), values / 16) and np.all(bernoulli(values * 2) <= 1.0)
    gaussian = Normalizer.fit(FeatureStats.of(values), "gaussian")
    assert np.allclose(gaussian(values).mean(0), 0) and np.allclose(gaussian(values).std(0), 1)


def test_split_bad_rows_keeps_good_rows_and_names_each_problem():
    from vae.data.features import split_bad_rows

    vectors = [[1.0, 2.0], [np.nan, 1.0], None, [1.0], [1.0, None], [3.0, 4.0], [np.inf, 0.0]]
    table = pa.table(
        {
            "item_id": [0, 1, 2, 3, 4, 5, None],
            "vec": pa.array(vectors, pa.list_(pa.float32())),
            "ts": pa.array([1, 2, 3, None, 5, 6, 7], pa.int64()),
        }
    )
    good, matrix, bad, reasons = split_bad_rows(
        table, FeatureSchema("item_id", 2, vector_column="vec"), required=("ts",)
    )
    assert good.column("item_id").to_pylist() == [0, 5]
    assert np.array_equal(matrix, np.array([[1, 2], [3, 4]], np.float32))
    assert bad.column("item_id").to_pylist() == [1, 2, 3, 4, None]
    assert "NaN or infinite" in reasons[0]
    assert reasons[1] == "has no value in column 'vec'"
    # checked first; its wrong length is not reported twice
    assert reasons[2] == "has no value in column 'ts'"
    assert "null elements" in reasons[3]
    assert reasons[4] == "has no value in column 'item_id'"


def test_split_bad_rows_on_clean_batch_is_the_zero_copy_path():
    from vae.data.features import split_bad_rows

    values = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    table = vector_table(values)
    good, matrix, bad, reasons = split_bad_rows(table, FeatureSchema("item_id", 4, vector_column="vec"))
    assert good is table and bad.num_rows == 0 and reasons == []
    assert matrix.__array_interface__["data"][0] == table.column("vec").chunk(0).values.buffers()[1].address


def test_scalar_feature_columns_with_nan_and_null():
    from vae.data.features import split_bad_rows

    table = pa.table({"id": ["a", "b", "c"], "x": [1.0, None, 3.0], "y": [0.5, 1.5, float("nan")]})
    good, matrix, _, reasons = split_bad_rows(table, FeatureSchema("id", 2, feature_columns=("x", "y")))
    assert good.column("id").to_pylist() == ["a"] and matrix.tolist() == [[1.0, 0.5]]
    assert reasons == ["has no value in column 'x'", "has NaN or infinite feature values"]
