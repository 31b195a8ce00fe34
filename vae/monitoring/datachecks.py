"""Checks of a batch's inputs against the inputs its model version was trained on, before the batch
counts for anything: a broken upstream (a unit change, a column gone null, a vocabulary that
collapsed, a join that duplicated rows) is told apart from a changed world.

    null_rate            a column's missing share rose by more than null_rate_jump
    scale                a numeric column's spread (IQR, else sd) changed by more than scale_factor
    range                more than out_of_range_share of a numeric column's values lie outside the
                         training data's [min, max]
    new_categories       rows with values training never saw, above training's share by new_category_share
    vanished_categories  a category holding >= vanished_min_share of training rows is (nearly) gone
    duplicate_keys       more than duplicate_key_share of the rows repeat a key
    row_count            rows far from training's rows per batch (a factor of row_count_factor)

Each check has a severity: off, warn (recorded), block-retrain (the batch is embedded and served,
never trains a challenger and cannot fire the retrain trigger) or refuse (the batch is not embedded).
Pure functions of two profiles (vae.monitoring.profile).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # the configs import the settings below without pyarrow
    from vae.monitoring.profile import ColumnProfile, InputProfile

Severity = Literal["off", "warn", "block-retrain", "refuse"]
SEVERITIES: tuple[Severity, ...] = ("off", "warn", "block-retrain", "refuse")
CHECKS = (
    "null_rate",
    "scale",
    "range",
    "new_categories",
    "vanished_categories",
    "duplicate_keys",
    "row_count",
)
MIN_ROWS = 20  # below this a batch's shares say too little to check (row_count and duplicates still do)


@dataclass(frozen=True)
class CheckSettings:
    """Severity and limit of each check (the embed block's `data_checks`)."""

    severity: dict[str, Severity] = field(
        default_factory=lambda: {
            "null_rate": "block-retrain",
            "scale": "block-retrain",
            "range": "block-retrain",
            "new_categories": "block-retrain",
            "vanished_categories": "block-retrain",
            "duplicate_keys": "block-retrain",
            "row_count": "warn",
        }
    )
    null_rate_jump: float = 0.2
    scale_factor: float = 10.0
    out_of_range_share: float = 0.5
    new_category_share: float = 0.1
    vanished_min_share: float = 0.05
    duplicate_key_share: float = 0.01
    row_count_factor: float = 10.0

    def of(self, check: str) -> Severity:
        return self.severity.get(check, "warn")

    @property
    def enabled(self) -> bool:
        """Whether any check runs (all off: the embed pass gathers no profile)."""
        return any(self.of(check) != "off" for check in CHECKS)


@dataclass(frozen=True)
class DataCheck:
    """One check of one column (or of the batch), passed or not."""

    name: str
    column: str | None
    severity: Severity
    passed: bool
    value: float  # what was measured (a share, a factor)
    limit: float
    detail: str  # one phrase, e.g. "amount: spread x1,000 (IQR 12.4 -> 12,400)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DataCheck:
        return cls(**values)


def worst(checks: list[DataCheck]) -> Severity | None:
    """The most severe failed check's severity; None when every check passed (or is off)."""
    failed = [SEVERITIES.index(c.severity) for c in checks if not c.passed and c.severity != "off"]
    return SEVERITIES[max(failed)] if failed else None


def failed(checks: list[DataCheck], severity: Severity | None = None) -> list[DataCheck]:
    return [c for c in checks if not c.passed and c.severity != "off" and severity in (None, c.severity)]


def check_batch(
    reference: InputProfile, batch: InputProfile, duplicate_rows: int, settings: CheckSettings
) -> list[DataCheck]:
    """Every check that is not off, of every column both profiles describe."""
    checks = [_duplicates(batch, duplicate_rows, settings), _row_count(reference, batch, settings)]
    if batch.rows >= MIN_ROWS:
        for name, trained in reference.columns.items():
            seen = batch.columns.get(name)
            if seen is None or seen.kind != trained.kind:
                continue
            checks.append(_null_rate(name, reference, batch, settings))
            if trained.kind in ("numeric", "vector"):
                checks += _scale_and_range(name, trained, seen, reference, batch, settings)
            if trained.kind == "categorical":
                checks += _categories(name, trained, seen, settings)
    return [c for c in checks if c.severity != "off"]


def _check(settings: CheckSettings, name: str, column: str | None, passed: bool, value, limit, detail):
    return DataCheck(name, column, settings.of(name), bool(passed), float(value), float(limit), detail)


def _duplicates(batch: InputProfile, duplicate_rows: int, settings: CheckSettings) -> DataCheck:
    share = duplicate_rows / batch.rows if batch.rows else 0.0
    detail = f"{share:.1%} of rows repeat a key ({duplicate_rows:,} of {batch.rows:,})"
    limit = settings.duplicate_key_share
    return _check(settings, "duplicate_keys", None, share <= limit, share, limit, detail)


def _row_count(reference: InputProfile, batch: InputProfile, settings: CheckSettings) -> DataCheck:
    usual = reference.rows_per_batch
    factor = max(batch.rows / usual, usual / batch.rows) if usual and batch.rows else float("inf")
    detail = f"{batch.rows:,} rows, against {usual:,.0f} per batch in training"
    limit = settings.row_count_factor
    return _check(settings, "row_count", None, factor <= limit, min(factor, 1e12), limit, detail)


def _null_rate(name: str, reference: InputProfile, batch: InputProfile, settings: CheckSettings) -> DataCheck:
    before, now = reference.null_rate(name), batch.null_rate(name)
    detail = f"{name}: missing {before:.0%} -> {now:.0%}"
    limit = settings.null_rate_jump
    return _check(settings, "null_rate", name, now - before <= limit, now - before, limit, detail)


def _scale_and_range(
    name: str,
    trained: ColumnProfile,
    seen: ColumnProfile,
    reference: InputProfile,
    batch: InputProfile,
    settings: CheckSettings,
) -> list[DataCheck]:
    if not seen.count or not trained.count:
        return []
    before, now = _spread(name, trained, reference), _spread(name, seen, batch)
    checks = []
    if before > 0 and now > 0:
        factor = now / before
        change = max(factor, 1 / factor)
        detail = f"{name}: spread x{readable(factor)} ({readable(before)} -> {readable(now)})"
        limit = settings.scale_factor
        checks.append(_check(settings, "scale", name, change <= limit, change, limit, detail))
    values = batch.present_sample(name)
    if trained.kind == "numeric" and len(values) and trained.minimum is not None:
        outside = float(np.mean((values < trained.minimum) | (values > trained.maximum)))
        detail = (
            f"{name}: {outside:.0%} of values outside training's [{readable(trained.minimum)}, "
            f"{readable(trained.maximum)}] (median {readable(reference.quantile(name, 0.5))} -> "
            f"{readable(float(np.median(values)))})"
        )
        limit = settings.out_of_range_share
        checks.append(_check(settings, "range", name, outside <= limit, outside, limit, detail))
    return checks


def _spread(name: str, column: ColumnProfile, profile: InputProfile) -> float:
    """The interquartile range of the sampled values (robust to a few outliers); the standard
    deviation where the IQR is zero (mostly one value) or for a vector's elements."""
    values = profile.present_sample(name)
    if len(values) >= 4:
        q25, q75 = np.quantile(values, [0.25, 0.75])
        if q75 > q25:
            return float(q75 - q25)
    return column.std() or 0.0


def _categories(name: str, trained: ColumnProfile, seen: ColumnProfile, settings: CheckSettings):
    if not seen.count or not trained.count:
        return []
    new = {v: c for v, c in seen.values.items() if v not in trained.values}
    # training's own share of values outside its kept list (rare values beyond MAX_VALUES)
    baseline = 1 - sum(trained.values.values()) / trained.count
    share = sum(new.values()) / seen.count
    top = ", ".join(f"{v!r} {c / seen.count:.0%}" for v, c in sorted(new.items(), key=lambda i: -i[1])[:3])
    detail = f"{name}: {share:.0%} of rows hold new values" + (f" ({top})" if top else "")
    limit = settings.new_category_share
    checks = [_check(settings, "new_categories", name, share - baseline <= limit, share, limit, detail)]
    gone = []
    for value, count in trained.values.items():
        before = count / trained.count
        if before < settings.vanished_min_share or before * seen.count < MIN_ROWS:
            continue
        now = seen.values.get(value, 0) / seen.count
        if now < before / 10:
            gone.append((value, before, now))
    vanished = max((before for _, before, _ in gone), default=0.0)
    detail = f"{name}: " + (
        ", ".join(f"{v!r} {b:.0%} -> {n:.0%}" for v, b, n in gone) if gone else "every frequent value present"
    )
    limit = settings.vanished_min_share
    checks.append(_check(settings, "vanished_categories", name, not gone, vanished, limit, detail))
    return checks


def readable(value: float | None) -> str:
    """A number as a person reads it: 41, 0.034, 39,800, 1.2e+07."""
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude == 0 or 0.01 <= magnitude < 1e6:
        return f"{value:,.3g}" if magnitude < 1000 else f"{value:,.0f}"
    return f"{value:.2g}"
