"""A model version's health under live traffic: what the encoding service records per version it serves
(the champion and a canary beside it), and the limits a canary is withdrawn for.

Per version, in one replica: requests, rows, the rows it could not embed through its own fault (outputs
that are not finite), request latencies, the rows above its calibrated threshold and a window of its
recent posterior means. The checks compare the canary with its own version's calibration (the anomaly
rate it was calibrated to give) and its own reference (drift of its outputs), never with the champion:
a better model gives other vectors by design.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from vae.monitoring.statistics import per_dimension_test


@dataclass(frozen=True)
class CanaryLimits:
    """When a canary is taken out of traffic (each judged once it served `min_rows` rows)."""

    max_error_rate: float = 0.01  # share of its rows it failed to embed (not bad input: its outputs)
    max_p99_ms: float = 1000.0  # p99 of its requests' encoding time
    max_anomaly_rate_multiple: float = 5.0  # its anomaly rate over the rate its calibration expects
    drift_alpha: float = 1e-6  # its outputs against its own reference (KS per latent unit, Holm)
    min_rows: int = 200


@dataclass
class VersionHealth:
    """One version's traffic in one replica since it started serving there."""

    version: str
    window: int = 2000  # recent rows kept for the drift check, and latencies for the p99
    requests: int = 0
    rows: int = 0
    failed_rows: int = 0
    anomalies: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=2000))
    latents: deque = field(default_factory=lambda: deque(maxlen=2000))
    _drift: tuple[int, float] | None = field(default=None, repr=False)  # (rows when computed, p-value)

    def record(
        self, latency_ms: float, posterior_mean: np.ndarray, is_anomaly: np.ndarray, failed: int
    ) -> None:
        """One request's outcome: its encoding time, its embedded rows' outputs, its rows that failed."""
        self.requests += 1
        self.rows += len(posterior_mean) + failed
        self.failed_rows += failed
        self.anomalies += int(np.count_nonzero(is_anomaly))
        self.latencies_ms.append(latency_ms)
        self.latents.extend(posterior_mean)

    @property
    def error_rate(self) -> float:
        return self.failed_rows / self.rows if self.rows else 0.0

    @property
    def anomaly_rate(self) -> float:
        embedded = self.rows - self.failed_rows
        return self.anomalies / embedded if embedded else 0.0

    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else 0.0

    def drift_p_value(self, reference: np.ndarray | None) -> float | None:
        """Of its recent outputs against its reference posterior means (None without either); computed
        once per rows served (the canary's judge, its decision and the metrics all ask)."""
        if reference is None or len(self.latents) < 20:
            return None
        if self._drift is None or self._drift[0] != self.rows:
            self._drift = (self.rows, per_dimension_test(reference, np.asarray(self.latents))["p_value"])
        return self._drift[1]


def breaches(
    health: VersionHealth,
    limits: CanaryLimits,
    expected_anomaly_rate: float | None,
    reference: np.ndarray | None,
) -> list[str]:
    """The limits the version breaches, each as a line naming the figure; [] before min_rows."""
    if health.rows < limits.min_rows:
        return []
    found = []
    if health.error_rate > limits.max_error_rate:
        found.append(f"error rate {health.error_rate:.3f} > {limits.max_error_rate}")
    if health.p99_ms() > limits.max_p99_ms:
        found.append(f"p99 latency {health.p99_ms():.0f} ms > {limits.max_p99_ms:.0f} ms")
    if expected_anomaly_rate:
        multiple = health.anomaly_rate / expected_anomaly_rate
        if multiple > limits.max_anomaly_rate_multiple:
            found.append(
                f"anomaly rate {health.anomaly_rate:.3f} = {multiple:.1f}x the calibrated "
                f"{expected_anomaly_rate:.3f} (limit {limits.max_anomaly_rate_multiple}x)"
            )
    p_value = health.drift_p_value(reference)
    if p_value is not None and p_value < limits.drift_alpha:
        found.append(f"drift of its outputs from its reference (KS p = {p_value:.3g} < {limits.drift_alpha})")
    return found
