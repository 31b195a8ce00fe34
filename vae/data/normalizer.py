"""What training fits and embedding applies to the feature matrix: mergeable per-feature statistics
(with an order-independent fingerprint of the rows) and the Normalizer fitted from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np


@dataclass
class FeatureStats:
    """Mergeable per-feature statistics of a dataset, plus an order-independent fingerprint."""

    count: int
    total: np.ndarray  # float64 sums
    total_squares: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    fingerprint: int = 0  # sum over rows of a 64-bit hash of the row's feature bits, mod 2**64

    @classmethod
    def of(cls, matrix: np.ndarray) -> FeatureStats:
        values = matrix.astype(np.float64)
        return cls(
            count=len(matrix),
            total=values.sum(axis=0),
            total_squares=np.square(values).sum(axis=0),
            minimum=values.min(axis=0) if len(matrix) else np.full(matrix.shape[1], np.inf),
            maximum=values.max(axis=0) if len(matrix) else np.full(matrix.shape[1], -np.inf),
            fingerprint=_rows_fingerprint(matrix),
        )

    def merge(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(
            count=self.count + other.count,
            total=self.total + other.total,
            total_squares=self.total_squares + other.total_squares,
            minimum=np.minimum(self.minimum, other.minimum),
            maximum=np.maximum(self.maximum, other.maximum),
            fingerprint=(self.fingerprint + other.fingerprint) % 2**64,
        )

    def to_row(self) -> dict[str, np.ndarray]:
        """One row of arrays (a leading axis of 1), as a batch of a Ray Data pass carries it."""
        row = {name: np.asarray(value)[None] for name, value in asdict(self).items() if name != "fingerprint"}
        return {**row, "fingerprint": np.array([self.fingerprint], dtype=np.uint64)}

    @classmethod
    def from_rows(cls, rows: dict[str, np.ndarray], index: int) -> FeatureStats:
        values = {name: rows[name][index] for name in ("total", "total_squares", "minimum", "maximum")}
        return cls(int(rows["count"][index]), fingerprint=int(rows["fingerprint"][index]), **values)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.total_squares / self.count - np.square(self.mean), 0.0))


def _rows_fingerprint(matrix: np.ndarray) -> int:
    # A multiply-add hash of each row's float32 bit patterns with a splitmix64 finalizer: any
    # change to a value changes the row hash; summing rows makes it independent of order and
    # of how the dataset is split into files and blocks.
    bits = np.ascontiguousarray(matrix, dtype=np.float32).view(np.uint32).astype(np.uint64)
    weights = np.random.default_rng(20261123).integers(
        1, 2**63, size=bits.shape[1], dtype=np.uint64
    ) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (bits * weights).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return int(h.sum(dtype=np.uint64))


@dataclass(frozen=True)
class Normalizer:
    """x -> (x - offset) / scale, fitted on the training data and stored in the model version.

    Bernoulli models get one global range mapping the data to [0, 1] (pixels share a scale);
    Gaussian models get per-feature standardization; mixed tables the identity (their per-column
    transforms live in FeatureSchema.table).
    """

    offset: tuple[float, ...]
    scale: tuple[float, ...]
    clip_unit_interval: bool

    @classmethod
    def fit(cls, stats: FeatureStats, likelihood: Literal["bernoulli", "gaussian", "mixed"]) -> Normalizer:
        dim = len(stats.total)
        if likelihood == "mixed":  # the table's own transforms (vae.data.tabular) already made the codes
            return cls((0.0,) * dim, (1.0,) * dim, clip_unit_interval=False)
        if likelihood == "bernoulli":
            low, high = float(stats.minimum.min()), float(stats.maximum.max())
            return cls((low,) * dim, (max(high - low, 1e-12),) * dim, clip_unit_interval=True)
        # A constant feature keeps scale 1 rather than dividing by zero.
        std = np.where(stats.std > 1e-8, stats.std, 1.0)
        return cls(tuple(map(float, stats.mean)), tuple(map(float, std)), clip_unit_interval=False)

    def __call__(self, matrix: np.ndarray) -> np.ndarray:
        normalized = (matrix - np.asarray(self.offset, np.float32)) / np.asarray(self.scale, np.float32)
        # Unseen data outside the training range must stay a valid Bernoulli target.
        return np.clip(normalized, 0.0, 1.0) if self.clip_unit_interval else normalized

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Normalizer:
        return cls(tuple(values["offset"]), tuple(values["scale"]), bool(values["clip_unit_interval"]))
