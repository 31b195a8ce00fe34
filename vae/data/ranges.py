"""The range the model computes in: float32. A finite float64 beyond it would become inf inside the
model and be blamed on the model's output; it is a bad input value and named as one."""

from __future__ import annotations

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
BEYOND_FLOAT32 = f"beyond float32's range (|x| > {FLOAT32_MAX:.3g}), which the model computes in"


def beyond_float32(values: np.ndarray) -> np.ndarray:
    """Finite values that float32 cannot hold (NaN and inf are reported as such, not here)."""
    if values.dtype != np.float64:
        return np.zeros(values.shape, bool)
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
