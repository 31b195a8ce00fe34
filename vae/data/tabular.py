"""Mixed-type tables: a per-column schema (numeric, binary, categorical), its transforms fitted on the
training data, and the conversion of Arrow batches to the model's per-column codes.

A table's rows become a float32 matrix with one column per table column ("codes"):

    numeric      the transformed value (robust / asinh / standard / log / quantile, fitted at training)
    binary       0 or 1
    categorical  the category's index in the fitted vocabulary; len(categories) is the "other" bucket
    any          NaN where the value is missing (null, or NaN in a float column)

The model (vae.model, likelihood "mixed") expands categorical codes to one-hot inputs, appends the
missingness mask, and scores each column with its own likelihood; missing entries are skipped. The
schema is stored in the model version, so embedding applies exactly the training transforms.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vae.data.ranges import BEYOND_FLOAT32, beyond_float32
from vae.errors import InputError

Kind = Literal["numeric", "binary", "categorical"]
Transform = Literal["auto", "robust", "asinh", "standard", "log", "quantile"]
KINDS = ("numeric", "binary", "categorical")
TRANSFORMS: tuple[str, ...] = get_args(Transform)
OTHER = "<other>"  # the bucket of categories outside the vocabulary
SAMPLE_ROWS = 20_000  # rows of the bottom-k key-hash sample that numeric transforms are fitted on
QUANTILE_KNOTS = 201
# auto: asinh for every numeric column: no skewness threshold, the signed log does for any tail what
# log1p did for a right one. Against robust scaling with log1p for skewed non-negative columns, anomaly
# ranking with the latent alive is a tie (docs/benchmarks.md, "Are the latents alive?")
AUTO = "asinh"


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a mixed table and the transform fitted for it."""

    name: str
    kind: Kind
    transform: str = "none"  # numeric: robust, asinh, standard, log or quantile (auto: asinh)
    center: float = 0.0  # numeric: subtracted after the transform's first step ...
    scale: float = 1.0  # ... then divided by
    knots: tuple[float, ...] = ()  # quantile: the training sample's quantiles, mapped to normal scores
    categories: tuple[str, ...] = ()  # categorical: the vocabulary; index len(categories) = other

    @property
    def width(self) -> int:
        """Decoder outputs for this column: one mean / logit, or one logit per category plus other."""
        return len(self.categories) + 1 if self.kind == "categorical" else 1


@dataclass(frozen=True)
class TableSchema:
    """The columns of a mixed table, in model order, with what to do about missing and unseen values."""

    columns: tuple[ColumnSpec, ...]
    missing: Literal["model", "refuse"] = "model"  # model: part of the likelihood; refuse: a bad row
    unseen: Literal["refuse", "other"] = "refuse"  # an unseen category at embed time (training: other)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def layout(self) -> tuple[tuple[str, int], ...]:
        """(kind, width) per column: what the model needs to build and score itself."""
        return tuple((c.kind, c.width) for c in self.columns)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TableSchema:
        columns = tuple(
            ColumnSpec(**{**c, "knots": tuple(c["knots"]), "categories": tuple(c["categories"])})
            for c in values["columns"]
        )
        return cls(columns, values.get("missing", "model"), values.get("unseen", "refuse"))

    def codes(self, batch: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """(codes, unseen): the (rows, columns) float32 code matrix, NaN where missing, and per row
        the index of the first column holding an unseen category (-1: none), mapped to other."""
        matrix = np.empty((batch.num_rows, len(self.columns)), dtype=np.float32)
        unseen = np.full(batch.num_rows, -1, dtype=np.int64)
        for j, spec in enumerate(self.columns):
            column = batch.column(spec.name)
            if spec.kind == "numeric":
                matrix[:, j] = _transform(spec, _floats(column))
            elif spec.kind == "binary":
                matrix[:, j] = _floats(column)
            else:
                matrix[:, j], outside = _category_codes(spec, column)
                unseen[(unseen < 0) & outside] = j
        return matrix, unseen

    def log_jacobian(self, batch: pa.Table | pa.RecordBatch) -> np.ndarray:
        """Per row, the log of |d code / d value| summed over its present numeric entries: a density of the
        codes is the raw values' density divided by this Jacobian, so raw-units -log p = codes' -log p -
        log_jacobian. Two versions' scores compare in raw units whatever transforms each fitted."""
        total = np.zeros(batch.num_rows)
        for spec in self.columns:
            if spec.kind == "numeric":
                slope = _log_slope(spec, _floats(batch.column(spec.name)))
                total += np.where(np.isfinite(slope), slope, 0.0)  # missing: no density term, no Jacobian
        return total

    def problems(self, batch: pa.Table | pa.RecordBatch) -> list[tuple[np.ndarray, str]]:
        """(row mask, reason) for every way a row cannot be encoded under this schema."""
        found: list[tuple[np.ndarray, str]] = []
        for spec in self.columns:
            column = batch.column(spec.name)
            missing = column.is_null().to_numpy(zero_copy_only=False)
            if spec.kind != "categorical" and pa.types.is_floating(column.type):
                values = column.to_numpy(zero_copy_only=False)
                found.append((np.isinf(values), f"has an infinite value in column '{spec.name}'"))
                huge = f"has a value in column '{spec.name}' {BEYOND_FLOAT32}"
                found.append((beyond_float32(values), huge))
                missing = missing | np.isnan(values)
            if self.missing == "refuse":
                found.append((missing, f"has no value in column '{spec.name}' (missing: refuse)"))
            if spec.kind == "binary":
                values = _floats(column)
                bad = ~np.isnan(values) & (values != 0) & (values != 1)
                found.append((bad, f"has a value other than 0/1 in binary column '{spec.name}'"))
            if spec.kind == "categorical" and self.unseen == "refuse":
                _, outside = _category_codes(spec, column)
                if outside.any():
                    value = _as_strings(column)[int(np.flatnonzero(outside)[0])].as_py()
                    reason = (
                        f"has category {value!r} in column '{spec.name}', which the model version never saw "
                        f"(it knows {_some(spec.categories)}); set unseen_categories: other to map such "
                        "values to the other bucket"
                    )
                    found.append((outside, reason))
        return found


def _some(categories: tuple[str, ...], limit: int = 8) -> str:
    shown = ", ".join(repr(c) for c in categories[:limit])
    return shown + (f" and {len(categories) - limit} more" if len(categories) > limit else "")


def _floats(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numbers (or booleans) as float64, NaN for nulls."""
    if pa.types.is_boolean(column.type):
        column = column.cast(pa.int8())
    return column.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False)


def _as_strings(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column if pa.types.is_string(column.type) else column.cast(pa.string())


def _category_codes(spec: ColumnSpec, column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, outside the vocabulary): NaN for nulls, len(categories) for unseen values."""
    values = _as_strings(column)
    index = pc.index_in(values, value_set=pa.array(spec.categories, pa.string()))
    missing = values.is_null().to_numpy(zero_copy_only=False)
    codes = (
        index.cast(pa.float64()).fill_null(float(len(spec.categories))).to_numpy(zero_copy_only=False).copy()
    )
    outside = index.is_null().to_numpy(zero_copy_only=False) & ~missing
    codes[missing] = math.nan
    return codes.astype(np.float32), outside


def _transform(spec: ColumnSpec, values: np.ndarray) -> np.ndarray:
    """A numeric column's fitted transform; NaN stays NaN (missing)."""
    scaled = (_first_step(spec.transform, values, spec.knots) - spec.center) / spec.scale
    # asinh: robust scaling, then a signed log past one robust scale, so that one column's heavy tail
    # (a near-constant column: IQR tiny against its rare values) cannot outweigh every other column's
    # surprise; the order of values is kept, so an extreme value is still the most surprising
    return np.arcsinh(scaled) if spec.transform == "asinh" else scaled


def _log_slope(spec: ColumnSpec, values: np.ndarray) -> np.ndarray:
    """log |d code / d value| of a numeric column's transform at each value (NaN stays NaN)."""
    log_scale = math.log(spec.scale)
    if spec.transform in ("robust", "standard"):
        return np.where(np.isnan(values), np.nan, -log_scale)
    if spec.transform == "log":  # d/dx sign(x) log1p(|x|) = 1 / (1 + |x|)
        return -np.log1p(np.abs(values)) - log_scale
    if spec.transform == "asinh":  # d/du asinh(u) = 1 / sqrt(1 + u^2), u = (x - center) / scale
        scaled = (values - spec.center) / spec.scale
        return -0.5 * np.log1p(scaled * scaled) - log_scale
    # quantile: piecewise linear, so a central difference within a segment is its slope
    step = 1e-6 * np.maximum(1.0, np.abs(values))
    above, below = (_first_step("quantile", values + side * step, spec.knots) for side in (1, -1))
    return np.log(np.abs(above - below) / (2 * step)) - log_scale


def _first_step(transform: str, values: np.ndarray, knots: tuple[float, ...]) -> np.ndarray:
    if transform == "log":
        return np.sign(values) * np.log1p(np.abs(values))
    if transform == "quantile":
        # the empirical CDF (piecewise linear between the sample's quantiles) as normal scores;
        # outside the training range the last segments extend linearly, so outliers stay outliers
        return _extrapolated_interp(values, np.asarray(knots), _normal_scores(len(knots)))
    return values


def _normal_scores(knots: int) -> np.ndarray:
    from statistics import NormalDist

    probabilities = np.linspace(0.5 / knots, 1 - 0.5 / knots, knots)
    return np.array([NormalDist().inv_cdf(float(p)) for p in probabilities])


def _extrapolated_interp(values: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    xs, keep = np.unique(xs, return_index=True)
    ys = ys[keep]
    if len(xs) < 2:
        return values - (xs[0] if len(xs) else 0.0)
    result = np.interp(values, xs, ys)
    low_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    high_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    result = np.where(values < xs[0], ys[0] + (values - xs[0]) * low_slope, result)
    return np.where(values > xs[-1], ys[-1] + (values - xs[-1]) * high_slope, result)


# ---------------------------------------------------------------------------------------------
# Inference from the Parquet schema


def infer_kinds(
    schema: pa.Schema,
    source: str,
    columns: tuple[str, ...],
    declared: dict[str, str],
) -> tuple[tuple[str, Kind], ...]:
    """Each feature column's kind from its Arrow type, unless declared: bool -> binary; string or
    dictionary -> categorical; integer or float -> numeric. Raises InputError naming the column."""
    unknown = sorted(set(declared) - set(columns))
    if unknown:
        raise InputError(f"column_types names {', '.join(map(repr, unknown))}, not among the feature columns")
    kinds = []
    for name in columns:
        arrow_type = schema.field(name).type
        inferred = _kind_of(arrow_type)
        kind = declared.get(name, inferred)
        if name in declared and kind not in KINDS:
            raise InputError(f"column_types: '{name}' is {kind!r}; use one of {', '.join(KINDS)}")
        if inferred is None or kind is None or (kind != inferred and not _convertible(arrow_type, kind)):
            what = f"which cannot be a {kind} column" if kind else "which a mixed model cannot read"
            raise InputError(
                f"{source}: feature column '{name}' is {arrow_type}, {what}; "
                "numeric needs integers or floats, binary booleans or 0/1 integers, categorical strings, "
                "dictionaries or integer codes"
            )
        kinds.append((name, kind))
    return tuple(kinds)


def _kind_of(arrow_type: pa.DataType) -> Kind | None:
    if pa.types.is_boolean(arrow_type):
        return "binary"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "categorical"
    if pa.types.is_dictionary(arrow_type):
        return "categorical" if _kind_of(arrow_type.value_type) in ("categorical", "numeric") else None
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return "numeric"
    return None


def _convertible(arrow_type: pa.DataType, kind: str) -> bool:
    """A declared kind other than the inferred one: integer codes as categorical, 0/1 as binary."""
    integer = pa.types.is_integer(arrow_type)
    return (kind == "categorical" and integer) or (
        kind == "binary" and (integer or pa.types.is_floating(arrow_type))
    )


def check_types(schema: pa.Schema, table: TableSchema, source: str) -> None:
    """A dataset to embed must give every column the kind the model version was trained on."""
    for spec in table.columns:
        if spec.name not in schema.names:
            continue  # the caller's missing-columns check names it
        arrow_type = schema.field(spec.name).type
        inferred = _kind_of(arrow_type)
        if inferred != spec.kind and not (spec.kind != "numeric" and _convertible(arrow_type, spec.kind)):
            raise InputError(
                f"{source}: column '{spec.name}' is {arrow_type}; the model version was trained on it as a "
                f"{spec.kind} column"
            )


# ---------------------------------------------------------------------------------------------
# Statistics (mergeable across Ray tasks) and fitting


@dataclass
class TableStats:
    """What fitting needs, mergeable across batches: per-column missing counts, category counts, and
    a bottom-k sample by key hash of the numeric columns (the same rows whatever the file layout)."""

    rows: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    category_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sample_hashes: list[int] = field(default_factory=list)
    sample: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def of(
        cls, batch: pa.Table | pa.RecordBatch, kinds: tuple[tuple[str, str], ...], hashes: np.ndarray
    ) -> TableStats:
        numeric = [name for name, kind in kinds if kind == "numeric"]
        keep = np.argsort(hashes, kind="stable")[:SAMPLE_ROWS]
        stats = cls(rows=batch.num_rows, sample_hashes=[int(h) for h in hashes[keep]])
        for name, kind in kinds:
            column = batch.column(name)
            if kind == "categorical":
                counts = pc.value_counts(_as_strings(column).drop_null())
                stats.category_counts[name] = {
                    str(v): int(c)
                    for v, c in zip(
                        counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
                    )
                }
            values = _floats(column) if kind != "categorical" else None  # nulls become NaN
            stats.missing[name] = column.null_count if values is None else int(np.isnan(values).sum())
            if name in numeric:
                stats.sample[name] = [float(v) for v in values[keep]]
        return stats

    def merge(self, other: TableStats) -> TableStats:
        hashes = np.array(self.sample_hashes + other.sample_hashes, dtype=np.uint64)
        keep = np.argsort(hashes, kind="stable")[:SAMPLE_ROWS]
        counts = {name: dict(values) for name, values in self.category_counts.items()}
        for name, values in other.category_counts.items():
            merged = counts.setdefault(name, {})
            for value, count in values.items():
                merged[value] = merged.get(value, 0) + count
        names = set(self.sample) | set(other.sample)
        return TableStats(
            rows=self.rows + other.rows,
            missing={
                n: self.missing.get(n, 0) + other.missing.get(n, 0) for n in {*self.missing, *other.missing}
            },
            category_counts=counts,
            sample_hashes=[int(h) for h in hashes[keep]],
            sample={n: [(self.sample.get(n, []) + other.sample.get(n, []))[i] for i in keep] for n in names},
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TableStats:
        return cls(**json.loads(text))


def fit_table(
    stats: TableStats,
    kinds: tuple[tuple[str, str], ...],
    transforms: dict[str, str],
    default_transform: str = "auto",
    max_categories: int = 64,
    min_category_count: int = 1,
    missing: Literal["model", "refuse"] = "model",
) -> TableSchema:
    """The table's schema with transforms fitted on the training statistics."""
    columns = []
    for name, kind in kinds:
        if kind == "numeric":
            transform = transforms.get(name, default_transform)
            if transform not in TRANSFORMS:
                raise InputError(
                    f"transform for '{name}' is {transform!r}; use one of {', '.join(TRANSFORMS)}"
                )
            columns.append(_fit_numeric(name, np.asarray(stats.sample.get(name, []), np.float64), transform))
        elif kind == "categorical":
            counts = stats.category_counts.get(name, {})
            ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            kept = tuple(value for value, count in ranked if count >= min_category_count)[:max_categories]
            columns.append(ColumnSpec(name, "categorical", categories=kept))
        else:
            columns.append(ColumnSpec(name, "binary"))
    return TableSchema(tuple(columns), missing=missing)


def _fit_numeric(name: str, values: np.ndarray, transform: str) -> ColumnSpec:
    values = values[np.isfinite(values)]
    if transform == "auto":
        transform = AUTO
    knots: tuple[float, ...] = ()
    if transform == "quantile" and len(values):
        knots = tuple(float(v) for v in np.quantile(values, np.linspace(0, 1, QUANTILE_KNOTS)))
    first = _first_step(transform, values, knots) if len(values) else values
    if transform == "quantile" or not len(first):
        return ColumnSpec(name, "numeric", transform, 0.0, 1.0, knots)
    if transform == "standard":
        center, scale = float(first.mean()), float(first.std())
    else:  # robust, asinh and log (after log1p): median and IQR / 1.349 (= std if normal)
        q25, center, q75 = (float(q) for q in np.quantile(first, [0.25, 0.5, 0.75]))
        scale = (q75 - q25) / 1.349
        if scale <= 1e-8 * max(1.0, abs(center)):  # mostly one value (e.g. zeros): fall back to the std
            scale = float(first.std())
    return ColumnSpec(name, "numeric", transform, center, scale if scale > 1e-12 else 1.0, knots)


def with_unseen(table: TableSchema, unseen: Literal["refuse", "other"]) -> TableSchema:
    return replace(table, unseen=unseen)
