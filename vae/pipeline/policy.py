"""When the daily pipeline retrains, what a challenger must show before it serves, and when a new
version is rolled back: pure functions of monitoring reports and the decision log (vae.pipeline.decisions).

    health     one batch's monitoring outcome against the version that embedded it: drift, the
               anomaly rate against the calibrated one, collapse
    trigger    drift in K of the last N batches the champion embedded since it became current (or
               since the last retrain), or the anomaly rate above a multiple of the calibrated one
    watch      after a switch, each of the next M batches against the new version's own reference:
               any problem rolls it back
    held-out   the challenger's and the champion's negative ELBO on the same held-out rows, in nats
               per example of the raw data (the normalizer's Jacobian added for Gaussian models)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vae.pipeline.decisions import Decision


@dataclass(frozen=True)
class Trigger:
    drift_batches: int  # K
    window_batches: int  # N
    anomaly_rate_multiple: float


@dataclass(frozen=True)
class BatchHealth:
    """What monitoring a batch showed, as the decision log records it ("monitored")."""

    batch_id: str
    model_version: str
    rows: int
    drift: bool
    drift_p_value: float | None
    anomaly_rate: float | None
    expected_anomaly_rate: float | None
    active_share: float
    collapsed: bool
    anomaly_p_value: float | None = None  # the excess over the calibration's own rows (Fisher exact)

    @classmethod
    def of_report(cls, batch_id: str, report: dict) -> BatchHealth:
        checks = {check["name"]: check for check in report["checks"]}
        drift = report.get("drift") or {}
        return cls(
            batch_id,
            report["model_version"],
            int(report["rows"]),
            bool(drift.get("detected", False)),
            drift.get("p_value"),
            report["anomaly"]["rate"],
            report["anomaly"]["expected_rate"],
            float(checks["collapse"]["value"]),
            not checks["collapse"]["passed"],
            report["anomaly"].get("p_value"),
        )

    @classmethod
    def of_decision(cls, decision: Decision) -> BatchHealth:
        return cls(**decision.detail["health"])

    def anomaly_spike(self, multiple: float, alpha: float = 0.01) -> bool:
        """The rate above `multiple` x the calibrated one, and (where known) more than the calibration's
        own rows would show by chance (p < alpha)."""
        if self.anomaly_rate is None or not self.expected_anomaly_rate:
            return False
        significant = self.anomaly_p_value is None or self.anomaly_p_value < alpha
        return self.anomaly_rate > multiple * self.expected_anomaly_rate and significant

    def problems(self, multiple: float) -> list[str]:
        """Everything wrong with the batch, one phrase each (empty: healthy)."""
        found = []
        if self.drift:
            found.append(f"drift (combined p = {self.drift_p_value:.3g})")
        if self.anomaly_spike(multiple):
            evidence = f", p = {self.anomaly_p_value:.2g}" if self.anomaly_p_value is not None else ""
            found.append(
                f"anomaly rate {self.anomaly_rate:.1%}, above {multiple:g}x the calibrated "
                f"{self.expected_anomaly_rate:.1%}{evidence}"
            )
        if self.collapsed:
            found.append(f"collapse ({self.active_share:.0%} of latent units active)")
        return found


def retrain_reason(history: list[BatchHealth], trigger: Trigger) -> str | None:
    """Why the champion should be retrained, given its batches oldest first; None: it should not."""
    if not history:
        return None
    recent = history[-trigger.window_batches :]
    drifted = [h.batch_id for h in recent if h.drift]
    if len(drifted) >= trigger.drift_batches:
        return (
            f"drift in {len(drifted)} of the last {len(recent)} batches ({', '.join(drifted)}); "
            f"the trigger is {trigger.drift_batches} of {trigger.window_batches}"
        )
    last = history[-1]
    if last.anomaly_spike(trigger.anomaly_rate_multiple):
        return f"batch {last.batch_id}: " + last.problems(trigger.anomaly_rate_multiple)[-1]
    return None


def watch_breach(health: BatchHealth, multiple: float) -> str | None:
    """Why a newly switched version must be rolled back after this batch; None: it holds."""
    problems = health.problems(multiple)
    if not problems:
        return None
    return f"batch {health.batch_id} against {health.model_version}'s own reference: " + "; ".join(problems)


def heldout_negative_elbo(scores: np.ndarray, metadata: dict) -> float:
    """Mean negative ELBO (nats per example) of held-out rows, from their anomaly scores (the negative
    ELBO at the posterior mean, in the model's normalized space), in the raw data's units: a Gaussian
    model's density of x is that of (x - offset) / scale divided by the product of the scales."""
    mean = float(np.mean(scores))
    if metadata["architecture"]["likelihood"] == "gaussian":
        mean += float(np.sum(np.log(metadata["normalizer"]["scale"])))
    elif metadata["architecture"]["likelihood"] == "mixed":
        # affine numeric transforms only: log and quantile columns stay in their transformed units
        # (two versions compare exactly when they fitted the same transforms)
        columns = metadata["features"]["table"]["columns"]
        mean += sum(
            math.log(c["scale"])
            for c in columns
            if c["kind"] == "numeric" and c["transform"] in ("robust", "standard")
        )
    return mean


def elbo_gate(challenger: float, champion: float, margin: float) -> tuple[bool, str]:
    """The challenger's held-out negative ELBO may be worse than the champion's by at most `margin`."""
    worse = challenger - champion
    passed = bool(math.isfinite(challenger) and worse <= margin)
    detail = (
        f"held-out -ELBO {challenger:.2f} vs champion {champion:.2f} nats/example "
        f"({worse:+.2f}; allowed +{margin:g})"
    )
    return passed, detail
