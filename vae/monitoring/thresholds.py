"""The publish gate's and `vaectl monitor`'s thresholds (vae.monitoring.gate): when a batch fails a check."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    min_active_share: float = 0.1  # collapse: least share of latent units with Var(mean) > 0.01
    drift_alpha: float = 0.01  # drift: the combined p-value below which drift is declared
    min_linear_cka: float = 0.8  # movement: least linear CKA to the baseline version
    min_knn_overlap: float = 0.3  # movement: least mean k-NN overlap@10 with the baseline version
