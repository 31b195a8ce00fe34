"""Which columns of a dataset feed the model (FeatureSchema), and Arrow batches -> float32 matrices,
validated row by row. The statistics that normalize the matrices are vae.data.normalizer.

A dataset holds its features either as one list column (a vector or a flattened image) or as
several numeric scalar columns. Fixed-size list columns of float32 convert without a copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vae.data.ranges import BEYOND_FLOAT32, beyond_float32
from vae.data.tabular import TableSchema, check_types
from vae.errors import InputError


@dataclass(frozen=True)
class FeatureSchema:
    """Which columns of a dataset the model reads, and how many features they make."""

    key_column: str
    dim: int
    vector_column: str | None = None  # one list column of length dim ...
    feature_columns: tuple[str, ...] = ()  # ... or dim numeric scalar columns
    image_shape: tuple[int, ...] | None = None  # declared shape of the vector, e.g. (1, 8, 8)
    # a mixed table (likelihood mixed): each feature column's kind and fitted transform
    table: TableSchema | None = None

    def __post_init__(self) -> None:
        if (self.vector_column is None) == (not self.feature_columns):
            raise InputError(
                "name either one vector column or a list of feature columns, not both or neither"
            )
        if self.image_shape is not None and int(np.prod(self.image_shape)) != self.dim:
            raise InputError(
                f"image shape {self.image_shape} has {int(np.prod(self.image_shape))} values, not {self.dim}"
            )

    @property
    def columns(self) -> list[str]:
        return [self.key_column, *([self.vector_column] if self.vector_column else self.feature_columns)]

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.table is None:
            del values["table"]  # versions without a mixed table read as before
        return values

    @classmethod
    def from_dict(cls, values: dict) -> FeatureSchema:
        shape, table = values.get("image_shape"), values.get("table")
        return cls(
            **{
                **values,
                "feature_columns": tuple(values.get("feature_columns", ())),
                "image_shape": tuple(shape) if shape else None,
                "table": TableSchema.from_dict(table) if table else None,
            }
        )


def infer_feature_schema(
    schema: pa.Schema,
    source: str,
    key_column: str,
    vector_column: str | None = None,
    feature_columns: tuple[str, ...] = (),
    image_shape: tuple[int, ...] | None = None,
) -> FeatureSchema:
    """Check a dataset's Arrow schema and derive the feature dimension from it.

    The vector length comes from a declared image_shape, else from a fixed_size_list column's
    type. Variable-length list columns need image_shape; their rows are checked as batches arrive.
    """
    if vector_column and image_shape is not None:
        # the declared shape sets the length; the column is checked against it
        dim = int(np.prod(image_shape))
    elif vector_column:
        dim = _list_size(schema, source, vector_column)
        if dim is None:
            raise InputError(
                f"{source}: column '{vector_column}' is a variable-length list; write it as "
                "fixed_size_list or declare image_shape so its length is known"
            )
    else:
        dim = len(feature_columns)
    features = FeatureSchema(key_column, dim, vector_column, tuple(feature_columns), image_shape)
    check_arrow_schema(schema, features, source)
    return features


def _list_size(schema: pa.Schema, source: str, column: str) -> int | None:
    _require_columns(schema, [column], source)
    column_type = schema.field(column).type
    if pa.types.is_fixed_size_list(column_type):
        return column_type.list_size
    return None


def _require_columns(schema: pa.Schema, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"the dataset has {', '.join(schema.names)}"
        )


def check_arrow_schema(schema: pa.Schema, features: FeatureSchema, source: str) -> None:
    """Raise InputError naming the column if a dataset cannot feed a model with `features`."""
    _require_columns(schema, features.columns, source)
    key_type = schema.field(features.key_column).type
    if not (
        pa.types.is_integer(key_type) or pa.types.is_string(key_type) or pa.types.is_large_string(key_type)
    ):
        raise InputError(
            f"{source}: key column '{features.key_column}' is {key_type}; it must be a string or an integer"
        )
    if features.vector_column:
        column_type = schema.field(features.vector_column).type
        if not (
            pa.types.is_list(column_type)
            or pa.types.is_large_list(column_type)
            or pa.types.is_fixed_size_list(column_type)
        ):
            raise InputError(
                f"{source}: column '{features.vector_column}' is {column_type}; it must be a list of numbers"
            )
        if not _is_numeric(column_type.value_type):
            raise InputError(
                f"{source}: column '{features.vector_column}' holds {column_type.value_type}; it must hold "
                "numbers"
            )
        if pa.types.is_fixed_size_list(column_type) and column_type.list_size != features.dim:
            raise InputError(
                f"{source}: column '{features.vector_column}' has vectors of length {column_type.list_size}; "
                f"the model expects length {features.dim}"
            )
    if features.table is not None:
        check_types(schema, features.table, source)
        return
    for name in features.feature_columns:
        if not _is_numeric(schema.field(name).type):
            raise InputError(
                f"{source}: feature column '{name}' is {schema.field(name).type}; it must be numeric "
                "(likelihood: mixed models string, boolean and missing values)"
            )


def _is_numeric(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def features_to_numpy(
    batch: pa.Table | pa.RecordBatch,
    features: FeatureSchema,
    required: tuple[str, ...] = (),
    validated: bool = False,
) -> np.ndarray:
    """The batch's features as a float32 (rows, dim) matrix, validated.

    Zero-copy for a float32 fixed_size_list column without nulls held in one chunk; any other
    layout is copied once. Raises InputError naming the column and the row's key on nulls,
    wrong vector lengths and NaN/inf, and on nulls in the `required` columns. validated=True:
    the rows were checked already (training's statistics pass), only convert them.
    """
    if validated:
        return _to_matrix(batch, features)
    if features.vector_column:
        column = _single_chunk(batch.column(features.vector_column))
        if pa.types.is_fixed_size_list(column.type) and column.type.list_size != features.dim:
            raise InputError(
                f"column '{features.vector_column}' has vectors of length {column.type.list_size}; "
                f"the model expects length {features.dim}"
            )
    problems = row_problems(batch, features, required)
    if problems is not None:
        bad = np.flatnonzero(np.not_equal(problems, None))
        row = int(bad[0])
        more = f" ({bad.size} bad rows in this batch)" if bad.size > 1 else ""
        raise InputError(
            f"{_describe_row(batch, features, row)} {problems[row]}{more}; fix or drop such rows, or "
            "quarantine them"
        )
    return _to_matrix(batch, features)


def split_bad_rows(
    batch: pa.Table | pa.RecordBatch, features: FeatureSchema, required: tuple[str, ...] = ()
) -> tuple[pa.Table | pa.RecordBatch, np.ndarray, pa.Table | pa.RecordBatch, list[str]]:
    """(good rows, their feature matrix, bad rows, one reason per bad row), for quarantining."""
    problems = row_problems(batch, features, required)
    if problems is None:
        return batch, _to_matrix(batch, features), batch.slice(0, 0), []
    is_bad = np.not_equal(problems, None)
    good = batch.filter(pa.array(~is_bad))
    return (
        good,
        _to_matrix(good, features),
        batch.filter(pa.array(is_bad)),
        [str(r) for r in problems[is_bad]],
    )


def row_problems(
    batch: pa.Table | pa.RecordBatch, features: FeatureSchema, required: tuple[str, ...] = ()
) -> np.ndarray | None:
    """Per row, why it cannot be encoded (None where it can); None if every row is fine.

    Checks: a null key, a missing vector or feature value, a wrong vector length, null elements,
    NaN or infinite values, a null in a `required` column (e.g. the event timestamp). The common
    all-good case costs one pass over the values.
    """
    problems = _Problems(batch.num_rows)
    for name in (features.key_column, *required):
        problems.nulls(batch.column(name), name)
    if features.vector_column:
        _vector_problems(problems, _single_chunk(batch.column(features.vector_column)), features)
    if features.table is not None:
        for mask, reason in features.table.problems(batch):
            problems.mark(mask, reason)
        return problems.reasons
    for name in features.feature_columns:
        column = batch.column(name)
        problems.nulls(column, name)
        if pa.types.is_floating(column.type):
            values = column.to_numpy(zero_copy_only=False)
            problems.mark(~np.isfinite(values), "has NaN or infinite feature values")
            problems.mark(beyond_float32(values), f"has a value in column '{name}' {BEYOND_FLOAT32}")
    return problems.reasons


class _Problems:
    """Per row, the first reason found why it cannot be encoded; allocated only once there is one."""

    def __init__(self, rows: int):
        self.rows = rows
        self.reasons: np.ndarray | None = None

    def mark(self, mask: np.ndarray, reason: str) -> None:
        if not mask.any():
            return
        if self.reasons is None:
            self.reasons = np.full(self.rows, None, dtype=object)
        self.reasons[mask & np.equal(self.reasons, None)] = reason  # the first problem found per row wins

    def nulls(self, column: pa.Array | pa.ChunkedArray, name: str) -> None:
        if column.null_count:
            self.mark(_nulls(column), f"has no value in column '{name}'")


def _vector_problems(problems: _Problems, column: pa.Array, features: FeatureSchema) -> None:
    name = features.vector_column
    problems.nulls(column, name)
    if not pa.types.is_fixed_size_list(column.type):
        lengths = pc.fill_null(pc.list_value_length(column), features.dim).to_numpy(zero_copy_only=False)
        wrong = lengths != features.dim
        for length in np.unique(lengths[wrong])[:20]:
            reason = (
                f"has a vector of length {length} in column '{name}'; the model expects length {features.dim}"
            )
            problems.mark(wrong & (lengths == length), reason)
    values = pc.list_flatten(column)
    if values.null_count:
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        reason = f"has null elements inside its vector in column '{name}'"
        problems.mark(_rows_of(parents, _nulls(values), problems.rows), reason)
    if pa.types.is_floating(values.type):
        flat = values.to_numpy(zero_copy_only=False)
        finite, huge = np.isfinite(flat), beyond_float32(flat)
        if not finite.all() or huge.any():
            parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            problems.mark(_rows_of(parents, ~finite, problems.rows), "has NaN or infinite feature values")
            problems.mark(_rows_of(parents, huge, problems.rows), f"has a vector value {BEYOND_FLOAT32}")


def _single_chunk(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _nulls(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return column.is_null().to_numpy(zero_copy_only=False)


def _rows_of(parents: np.ndarray, element_mask: np.ndarray, rows: int) -> np.ndarray:
    mask = np.zeros(rows, dtype=bool)
    mask[parents[element_mask]] = True
    return mask


def _to_matrix(batch: pa.Table | pa.RecordBatch, features: FeatureSchema) -> np.ndarray:
    """The float32 matrix of rows already known to be valid."""
    if features.vector_column:
        values = _single_chunk(batch.column(features.vector_column)).flatten()  # respects slices' offsets
        if values.type == pa.float32():
            flat = values.to_numpy(zero_copy_only=True)
        else:
            flat = values.to_numpy(zero_copy_only=False).astype(np.float32)
        return flat.reshape(-1, features.dim)
    if features.table is not None:
        return features.table.codes(batch)[0]
    matrix = np.empty((batch.num_rows, features.dim), dtype=np.float32)
    for j, name in enumerate(features.feature_columns):
        matrix[:, j] = batch.column(name).to_numpy()
    return matrix


def _describe_row(batch: pa.Table | pa.RecordBatch, features: FeatureSchema, row: int) -> str:
    key = batch.column(features.key_column)[row].as_py() if features.key_column in batch.schema.names else row
    return f"row {features.key_column}={key!r}"
