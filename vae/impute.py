"""Missing values filled from the model (posterior-mean reconstruction), and how good that is on
entries hidden on purpose, against mean/mode imputation. Mixed tables only (vae.data.tabular)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from vae.data.tabular import ColumnSpec, TableSchema, _extrapolated_interp, _normal_scores
from vae.model import VAE


@torch.inference_mode()
def reconstruct_codes(model: VAE, codes: np.ndarray) -> np.ndarray:
    """Each entry's most likely code given the row's observed entries: the decoder at the posterior
    mean (numeric: the Gaussian mean; binary: p > 0.5; categorical: the most likely category)."""
    assert model.layout is not None, "imputation needs a mixed model"
    x = torch.from_numpy(codes)
    decoded = model.decode(model.encode(x).mean).float()
    layout = model.layout
    result = np.empty_like(codes)
    result[:, layout.numeric] = decoded[:, layout.numeric_outputs].numpy()
    result[:, layout.binary] = (decoded[:, layout.binary_outputs] > 0).float().numpy()
    for j, start, width in layout.categorical:
        result[:, j] = decoded[:, start : start + width].argmax(dim=-1).float().numpy()
    return result


def impute_codes(model: VAE, codes: np.ndarray) -> np.ndarray:
    """The codes with their missing (NaN) entries filled from the model; observed entries kept."""
    return np.where(np.isnan(codes), reconstruct_codes(model, codes), codes)


def decode_column(spec: ColumnSpec, codes: np.ndarray) -> pa.Array:
    """Codes back to the column's values: the transform inverted, category names (other -> null)."""
    if spec.kind == "categorical":
        names = np.array([*spec.categories, None], dtype=object)
        index = np.nan_to_num(codes, nan=len(spec.categories)).astype(int)
        return pa.array(names[index], pa.string())
    if spec.kind == "binary":
        return pa.array(codes == 1, mask=np.isnan(codes))
    scaled = codes.astype(np.float64)
    first = (np.sinh(scaled) if spec.transform == "asinh" else scaled) * spec.scale + spec.center
    if spec.transform == "log":
        first = np.sign(first) * np.expm1(np.abs(first))
    elif spec.transform == "quantile":
        scores = _normal_scores(len(spec.knots))
        first = _extrapolated_interp(first, scores, np.asarray(spec.knots))
    return pa.array(first, mask=np.isnan(first))


def imputed_table(
    table: TableSchema, keys: pa.Array, codes: np.ndarray, model: VAE, key_column: str
) -> pa.Table:
    """The rows with every missing value filled, in the input's units, plus one `imputed` list of
    the column names filled per row."""
    filled = impute_codes(model, codes)
    missing = np.isnan(codes)
    names = np.array(table.names, dtype=object)
    columns = {key_column: keys}
    columns |= {spec.name: decode_column(spec, filled[:, j]) for j, spec in enumerate(table.columns)}
    columns["imputed"] = pa.array([list(names[row]) for row in missing], pa.list_(pa.string()))
    return pa.table(columns)


def imputation_quality(
    model: VAE, table: TableSchema, codes: np.ndarray, fraction: float = 0.1, seed: int = 0
) -> dict:
    """Hide `fraction` of the observed entries, impute them, and score against the truth, next to
    filling with the column's mean (numeric, RMSE in the model's standardized units) or mode
    (binary and categorical, accuracy), both taken from the rows' own observed entries."""
    rng = np.random.default_rng(seed)
    observed = ~np.isnan(codes)
    hidden = observed & (rng.random(codes.shape) < fraction)
    masked = np.where(hidden, np.nan, codes)
    predicted = reconstruct_codes(model, masked.astype(np.float32))
    report: dict = {"hidden_fraction": fraction, "columns": {}}
    for j, spec in enumerate(table.columns):
        rows = hidden[:, j]
        if not rows.any():
            continue
        truth, known = codes[rows, j], masked[~np.isnan(masked[:, j]), j]
        if spec.kind == "numeric":
            baseline = float(known.mean()) if len(known) else 0.0
            model_error = float(np.sqrt(np.mean((predicted[rows, j] - truth) ** 2)))
            baseline_error = float(np.sqrt(np.mean((baseline - truth) ** 2)))
            entry = {"metric": "rmse", "model": model_error, "mean": baseline_error}
        else:
            values, counts = np.unique(known, return_counts=True)
            mode = values[counts.argmax()] if len(values) else 0.0
            entry = {
                "metric": "accuracy",
                "model": float(np.mean(predicted[rows, j] == truth)),
                "mode": float(np.mean(truth == mode)),
            }
        report["columns"][spec.name] = {"hidden": int(rows.sum()), **entry}
    report["hidden"] = int(hidden.sum())
    return report


def quality_line(report: dict) -> str:
    """One line per report: each column's model figure against the mean/mode one."""

    def one(name: str, entry: dict) -> str:
        baseline = entry.get("mean", entry.get("mode", math.nan))
        return f"{name} {entry['metric']} {entry['model']:.3f} (mean/mode {baseline:.3f})"

    return "; ".join(one(name, entry) for name, entry in report["columns"].items())
