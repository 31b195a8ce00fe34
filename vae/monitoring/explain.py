"""Why the latents moved: the input columns of a batch ranked by how far each moved from the version's
training inputs, so a drift or anomaly-rate alarm names them.

    numeric, binary  two-sample Kolmogorov-Smirnov on the key-hash samples of present values, and
                     the missing share (chi-square on counts), the smaller p of the two (x2)
    categorical      chi-square on the counts per value, values training never saw pooled as new
    vector           no columns: nothing to rank (the report says so and shows the latent
                     dimensions that moved instead)

Holm's correction over the columns keeps the chance of naming any unmoved column below alpha;
the named columns are ranked by effect (the KS statistic, the total variation distance between the
value shares, the change of the missing share). Pure functions of two profiles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from vae.monitoring.datachecks import readable
from vae.monitoring.profile import ColumnProfile, InputProfile
from vae.monitoring.statistics import holm

ALPHA = 0.01
MIN_SAMPLE = 8  # present sampled values each side for a KS test


@dataclass(frozen=True)
class ColumnShift:
    column: str
    test: str  # ks, missing or chi-square
    p_value: float  # Holm-adjusted over the columns
    effect: float  # 0..1
    phrase: str  # e.g. "amount (KS p = 1e-30, median 41 -> 39,800)"

    def to_dict(self) -> dict:
        return asdict(self)


def column_shifts(reference: InputProfile, batch: InputProfile, alpha: float = ALPHA) -> list[ColumnShift]:
    """Every column whose inputs moved (adjusted p < alpha), largest effect first."""
    found = []
    for name, trained in reference.columns.items():
        seen = batch.columns.get(name)
        if seen is None or seen.kind != trained.kind or trained.kind == "vector":
            continue
        if trained.kind == "categorical":
            found.append(_categorical_shift(name, trained, seen, reference, batch))
        else:
            found.append(_numeric_shift(name, trained, seen, reference, batch))
    found = [shift for shift in found if shift is not None]
    if not found:
        return []
    adjusted = holm(np.array([shift.p_value for shift in found]))
    moved = [
        ColumnShift(s.column, s.test, float(p), s.effect, s.phrase.replace("{p}", _p(float(p))))
        for s, p in zip(found, adjusted, strict=True)
        if p < alpha
    ]
    return sorted(moved, key=lambda shift: (-shift.effect, shift.p_value))


def explanation(shifts: list[ColumnShift], limit: int = 3) -> str:
    """The named columns as one phrase: "amount (KS p = 1e-30, median 41 -> 39,800), country (...)"."""
    return ", ".join(shift.phrase for shift in shifts[:limit])


def has_columns(profile: InputProfile) -> bool:
    return any(column.kind != "vector" for column in profile.columns.values())


def _numeric_shift(
    name: str, trained: ColumnProfile, seen: ColumnProfile, reference: InputProfile, batch: InputProfile
) -> ColumnShift | None:
    missing = _missing_shift(name, trained, seen, reference, batch)
    before, now = reference.present_sample(name), batch.present_sample(name)
    if len(before) < MIN_SAMPLE or len(now) < MIN_SAMPLE:
        return missing
    result = stats.ks_2samp(before, now, method="asymp")
    statistic, p = float(result.statistic), float(result.pvalue)
    if missing is not None and missing.effect > statistic:
        return ColumnShift(name, "missing", min(1.0, 2 * missing.p_value), missing.effect, missing.phrase)
    if trained.kind == "binary":
        where = f"share of 1 {before.mean():.0%} -> {now.mean():.0%}"
    else:
        where = f"median {readable(float(np.median(before)))} -> {readable(float(np.median(now)))}"
    return ColumnShift(name, "ks", min(1.0, 2 * p), statistic, f"{name} (KS p{{p}}, {where})")


def _missing_shift(
    name: str, trained: ColumnProfile, seen: ColumnProfile, reference: InputProfile, batch: InputProfile
) -> ColumnShift | None:
    table = np.array([[trained.missing, trained.count], [seen.missing, seen.count]], np.float64)
    if table[:, 0].sum() == 0 or table[:, 1].sum() == 0:
        return None  # never missing, or always: nothing to compare
    p = float(stats.chi2_contingency(table).pvalue)
    before, now = reference.null_rate(name), batch.null_rate(name)
    return ColumnShift(
        name, "missing", p, abs(now - before), f"{name} (missing {before:.0%} -> {now:.0%}, p{{p}})"
    )


def _categorical_shift(
    name: str, trained: ColumnProfile, seen: ColumnProfile, reference: InputProfile, batch: InputProfile
) -> ColumnShift | None:
    missing = _missing_shift(name, trained, seen, reference, batch)
    if not trained.count or not seen.count:
        return missing
    values = list(trained.values)
    new = {v: c for v, c in seen.values.items() if v not in trained.values}
    trained_counts = np.array([trained.values[v] for v in values] + [0], np.float64)
    seen_counts = np.array([seen.values.get(v, 0) for v in values] + [sum(new.values())], np.float64)
    keep = (trained_counts + seen_counts) > 0
    table = np.stack([trained_counts[keep], seen_counts[keep]])
    if table.shape[1] < 2:
        return missing
    p = float(stats.chi2_contingency(table).pvalue)
    before, now = trained_counts / trained.count, seen_counts / seen.count
    effect = float(0.5 * np.abs(before - now).sum())
    if missing is not None and missing.effect > effect:
        return ColumnShift(name, "missing", min(1.0, 2 * missing.p_value), missing.effect, missing.phrase)
    changes = _largest_changes(values, before, now, new, seen)
    return ColumnShift(name, "chi-square", min(1.0, 2 * p), effect, f"{name} ({changes}, p{{p}})")


def _largest_changes(values, before, now, new: dict[str, int], seen: ColumnProfile, limit: int = 2) -> str:
    """The values whose shares moved most: "new 'zz' 12%", "'de' 30% -> 0%"."""
    moves = [(abs(b - n), f"{v!r} {b:.0%} -> {n:.0%}") for v, b, n in zip(values, before, now, strict=False)]
    moves += [(c / seen.count, f"new {v!r} {c / seen.count:.0%}") for v, c in new.items()]
    # a value that vanished or appeared reads first at equal change: it is the news
    moves.sort(key=lambda move: (-round(move[0], 6), "new" not in move[1] and "-> 0%" not in move[1]))
    return ", ".join(text for _, text in moves[:limit])


def _p(p: float) -> str:
    """ " = 3e-12", or " < 1e-300" where the p-value underflowed."""
    return " < 1e-300" if p <= 0 else f" = {p:.1g}"


def input_explanation(
    reference: InputProfile | None, batch: InputProfile | None, drift: dict | None, limit: int = 3
) -> dict:
    """What a monitoring report says about the inputs behind a batch's latents: the columns that moved
    (ranked), a one-phrase summary for the decision line, and a plain note where there is nothing to rank."""
    if reference is None or batch is None:
        note = "no input profile for the version or the batch (saved before profiles): inputs not compared"
        return {"columns": [], "summary": "", "note": note}
    if not has_columns(reference):
        summary = moved_dimensions(drift, limit)
        note = "the inputs are one vector column: no columns to rank; shown instead: the latent dimensions "
        note += "that moved most (per-dimension KS, Holm-adjusted)" if summary else "(none moved)"
        return {"columns": [], "summary": summary, "note": note}
    shifts = column_shifts(reference, batch)
    note = "" if shifts else f"no input column moved (Holm-adjusted p >= {ALPHA:g})"
    return {"columns": [s.to_dict() for s in shifts], "summary": explanation(shifts, limit), "note": note}


def moved_dimensions(drift: dict | None, limit: int = 3) -> str:
    """ "latent z3 (KS p = 1e-09), z1 (KS p = 2e-05)": the drift test's most moved latent dimensions."""
    if not drift:
        return ""
    test = drift["tests"]["per_dimension"]
    adjusted, statistic = test["adjusted_p_values"], test["ks_statistic"]
    moved = sorted(test["drifted_dimensions"], key=lambda d: -statistic[d])[:limit]
    return "latent " + ", ".join(f"z{d} (KS p{_p(adjusted[d])})" for d in moved) if moved else ""


def anomaly_attribution(top_columns: list[list[str]], top_shares: list[list[float]]) -> dict[str, float]:
    """Each column's mean share of the anomalous rows' surprise (from their top columns), largest first."""
    totals: dict[str, float] = {}
    for columns, shares in zip(top_columns, top_shares, strict=True):
        for column, share in zip(columns or [], shares or [], strict=True):
            totals[column] = totals.get(column, 0.0) + float(share)
    rows = max(len(top_columns), 1)
    return dict(sorted(((c, t / rows) for c, t in totals.items()), key=lambda item: -item[1]))
