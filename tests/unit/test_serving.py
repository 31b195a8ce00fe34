"""The encoding service's rules without a server: a canary's limits (each breach found once it served enough
rows, and named with its figure), and what a backfill leaves to the daily batches."""

import numpy as np

from vae.monitoring.canary import CanaryLimits, VersionHealth, breaches

LIMITS = CanaryLimits(max_error_rate=0.01, max_p99_ms=100, max_anomaly_rate_multiple=3, min_rows=100)


def served(
    rows: int, latency_ms: float = 5.0, anomalous_share: float = 0.01, failed: int = 0, shift: float = 0.0
):
    rng = np.random.default_rng(0)
    health = VersionHealth("v")
    for _ in range(rows // 10):
        latents = rng.standard_normal((10, 4)) + shift
        health.record(latency_ms, latents, rng.random(10) < anomalous_share, failed)
    return health


def test_a_healthy_canary_breaches_nothing_and_none_is_judged_before_min_rows():
    reference = np.random.default_rng(1).standard_normal((2000, 4))
    assert breaches(served(1000), LIMITS, 0.01, reference) == []
    assert breaches(served(50, latency_ms=1e4, failed=5), LIMITS, 0.01, reference) == []


def test_each_limit_is_named_with_its_figure():
    reference = np.random.default_rng(1).standard_normal((2000, 4))
    assert "error rate" in breaches(served(1000, failed=1), LIMITS, 0.01, reference)[0]
    assert "p99 latency 500 ms > 100 ms" in breaches(served(1000, latency_ms=500), LIMITS, 0.01, reference)[0]
    found = breaches(served(1000, anomalous_share=0.2), LIMITS, 0.01, reference)
    assert len(found) == 1 and "anomaly rate" in found[0] and "calibrated 0.010" in found[0]
    found = breaches(served(1000, shift=1.0), LIMITS, 0.01, reference)
    assert len(found) == 1 and found[0].startswith("drift of its outputs"), found
    assert breaches(served(1000, anomalous_share=0.2), LIMITS, None, None) == []  # no calibration: not judged


def test_a_backfill_leaves_out_the_batches_embedded_on_request():
    from ray_jobs.pipeline import replayable
    from vae.embeddings.catalog import Batch

    def batch(name: str) -> Batch:
        return Batch(name, 10, 1, 1, "2026-12-07T00:00:00+00:00", "run", None, {"vae.data": "s3://x/" + name})

    kept = replayable([batch("day-1"), batch("stream-2026-12-07"), batch("day-2")])
    assert [b.batch_id for b in kept] == ["day-1", "day-2"]
