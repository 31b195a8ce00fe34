"""Input profiles: what a model version's training inputs looked like, column by column, and the same
for every batch it embeds. Gathered in the passes that already read the rows (training's statistics
pass, the embed job's encode pass), merged across Ray tasks and work units, stored as JSON.

    numeric, binary  missing count; count, sum, sum of squares, min and max of the present values;
                     the values of a bottom-k key-hash sample of rows (the same rows in any layout)
    categorical      missing count; rows per value (the MAX_VALUES most frequent)
    vector           missing rows; count, sum, squares, min, max of all elements (no per-column view)

The checks (vae.monitoring.datachecks) and the explanations of latent alarms
(vae.monitoring.explain) read two profiles: the version's and the batch's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vae.data.features import FeatureSchema
from vae.storage import filesystem, storage_errors

SAMPLE_ROWS = 2_000  # rows of the key-hash sample: a two-sample KS test resolves a 0.05 shift in the CDF
MAX_VALUES = 200  # distinct values a categorical column's profile keeps (the most frequent)
FORMAT = "vae-input-profile/1"


@dataclass
class ColumnProfile:
    kind: str  # numeric, binary, categorical or vector
    missing: int = 0  # rows without a value (null, NaN)
    count: int = 0  # present values (vector: elements of present rows)
    total: float = 0.0
    squares: float = 0.0
    minimum: float | None = None
    maximum: float | None = None
    values: dict[str, int] = field(default_factory=dict)  # categorical: rows per value

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def std(self) -> float | None:
        if not self.count:
            return None
        mean = self.total / self.count
        return math.sqrt(max(self.squares / self.count - mean * mean, 0.0))

    def merge(self, other: ColumnProfile) -> ColumnProfile:
        values = dict(self.values)
        for value, count in other.values.items():
            values[value] = values.get(value, 0) + count
        return ColumnProfile(
            self.kind,
            self.missing + other.missing,
            self.count + other.count,
            self.total + other.total,
            self.squares + other.squares,
            _either(min, self.minimum, other.minimum),
            _either(max, self.maximum, other.maximum),
            _most_frequent(values),
        )


@dataclass
class InputProfile:
    """One dataset's inputs: rows, batches (training: the input datasets of the window), per column."""

    rows: int = 0
    batches: int = 1
    columns: dict[str, ColumnProfile] = field(default_factory=dict)
    # the bottom-k key-hash sample: its rows' hashes, and their values per numeric and binary column
    # (NaN: missing); numpy arrays in memory, lists in JSON
    sample_hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    sample: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(
        cls, batch: pa.Table | pa.RecordBatch, features: FeatureSchema, hashes: np.ndarray
    ) -> InputProfile:
        """The profile of one batch of rows (any of the feature schema's column layouts)."""
        keep = np.argsort(hashes, kind="stable")[:SAMPLE_ROWS]
        profile = cls(rows=batch.num_rows, sample_hashes=hashes[keep])
        for name, kind in column_kinds(features):
            column = batch.column(name)
            if kind == "categorical":
                profile.columns[name] = _categorical(column)
            elif kind == "vector":
                profile.columns[name] = _vector(column)
            else:
                values = _floats(column)
                profile.columns[name] = _numeric(kind, values)
                profile.sample[name] = values[keep]
        return profile

    def merge(self, other: InputProfile) -> InputProfile:
        if not self.rows and not self.columns:
            return other
        hashes = np.concatenate([self.sample_hashes, other.sample_hashes])
        keep = np.argsort(hashes, kind="stable")[:SAMPLE_ROWS]
        return InputProfile(
            self.rows + other.rows,
            self.batches,
            {name: column.merge(other.columns[name]) for name, column in self.columns.items()},
            hashes[keep],
            {
                name: np.concatenate([values, other.sample[name]])[keep]
                for name, values in self.sample.items()
            },
        )

    def present_sample(self, name: str) -> np.ndarray:
        """The sampled rows' present values of a numeric or binary column."""
        values = self.sample.get(name, np.empty(0))
        return values[~np.isnan(values)]

    def quantile(self, name: str, q: float) -> float | None:
        values = self.present_sample(name)
        return float(np.quantile(values, q)) if len(values) else None

    def null_rate(self, name: str) -> float:
        column = self.columns[name]
        return column.missing / self.rows if self.rows else 0.0

    @property
    def rows_per_batch(self) -> float:
        return self.rows / max(self.batches, 1)

    def to_json(self) -> str:
        values = {
            "format": FORMAT,
            "rows": self.rows,
            "batches": self.batches,
            "columns": {name: asdict(column) for name, column in self.columns.items()},
            "sample_hashes": [int(h) for h in self.sample_hashes],
            "sample": {
                name: [None if v != v else float(v) for v in values] for name, values in self.sample.items()
            },
        }
        return json.dumps(values, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> InputProfile:
        values = json.loads(text)
        return cls(
            values["rows"],
            values["batches"],
            {name: ColumnProfile(**column) for name, column in values["columns"].items()},
            np.array(values["sample_hashes"], np.uint64),
            {name: np.array(v, np.float64) for name, v in values["sample"].items()},  # None -> NaN
        )


def read_profile(url: str) -> InputProfile:
    """A profile written by an embed run (its batch's) or saved with a model version."""
    fs, path = filesystem(url)
    with storage_errors(url):
        return InputProfile.from_json(fs.cat_file(path).decode())


def column_kinds(features: FeatureSchema) -> list[tuple[str, str]]:
    """(column, kind) of every input column a profile describes, in the model's order."""
    if features.table is not None:
        return [(c.name, c.kind) for c in features.table.columns]
    if features.vector_column:
        return [(features.vector_column, "vector")]
    return [(name, "numeric") for name in features.feature_columns]


def _floats(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_boolean(column.type):
        column = column.cast(pa.int8())
    return column.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False)


def _numeric(kind: str, values: np.ndarray) -> ColumnProfile:
    present = values[np.isfinite(values)]
    if not len(present):
        return ColumnProfile(kind, missing=len(values))
    return ColumnProfile(
        kind,
        missing=len(values) - len(present),
        count=len(present),
        total=float(present.sum()),
        squares=float(np.square(present).sum()),
        minimum=float(present.min()),
        maximum=float(present.max()),
    )


def _categorical(column: pa.Array | pa.ChunkedArray) -> ColumnProfile:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    counts = pc.value_counts(column.drop_null())
    values = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
    present = sum(values.values())
    return ColumnProfile(
        "categorical", missing=len(column) - present, count=present, values=_most_frequent(values)
    )


def _vector(column: pa.Array | pa.ChunkedArray) -> ColumnProfile:
    missing = column.null_count
    flat = pc.list_flatten(column.drop_null())
    values = _floats(flat)
    values = values[np.isfinite(values)]
    if not len(values):
        return ColumnProfile("vector", missing=missing)
    return ColumnProfile(
        "vector",
        missing,
        len(values),
        float(values.sum()),
        float(np.square(values).sum()),
        float(values.min()),
        float(values.max()),
    )


def _most_frequent(values: dict[str, int]) -> dict[str, int]:
    if len(values) <= MAX_VALUES:
        return values
    ranked = sorted(values.items(), key=lambda item: (-item[1], item[0]))[:MAX_VALUES]
    return dict(ranked)


def _either(pick, a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return b if a is None else a
    return pick(a, b)
