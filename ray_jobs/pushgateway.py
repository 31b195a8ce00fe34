"""Every job's figures, pushed to a Prometheus Pushgateway when one is configured (the `pushgateway`
option, else the PUSHGATEWAY_URL variable): the convention for batch jobs, which end before a
Prometheus could scrape them.

One group per job and entity set (grouping key job=vae_<job>, entity=<entity>); each push replaces
the series of the names it pushes, so the gateway holds each figure of the job's latest run (and a
failed run's push leaves the last success's time). Model version and batch are labels.
A push that fails is logged and never fails the job. The alert rules in deploy/prometheus/ read these
names.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime

from prometheus_client import CollectorRegistry, Gauge

from vae.errors import first_line

log = logging.getLogger("ray_jobs.pushgateway")

PUSHGATEWAY_ENV = "PUSHGATEWAY_URL"


class JobMetrics:
    """Gauges of one job run, labelled with the entity set (plus model_version / batch where given)."""

    def __init__(self, job: str, entity: str):
        self.job, self.entity = f"vae_{job}", entity
        self.registry = CollectorRegistry()
        self.gauges: dict[str, Gauge] = {}

    def set(self, name: str, value: float | None, help_text: str, **labels: str) -> None:
        if value is None:
            return
        gauge = self.gauges.get(name)
        if gauge is None:
            gauge = Gauge(f"vae_{name}", help_text, tuple(sorted(labels)), registry=self.registry)
            self.gauges[name] = gauge
        names = gauge._labelnames  # one label set per name: a label a call leaves out is ""
        (gauge.labels(**{n: labels.get(n, "") for n in names}) if names else gauge).set(float(value))

    def push(self, url: str | None = None) -> bool:
        """Push to the gateway (url, else $PUSHGATEWAY_URL); False when none is configured or it failed."""
        from prometheus_client import pushadd_to_gateway

        url = url or os.environ.get(PUSHGATEWAY_ENV)
        if not url or not self.gauges:
            return False
        try:
            # POST: replaces the series of the names pushed, keeps the group's others (a failed step's
            # push keeps the time of the last success)
            pushadd_to_gateway(
                url, job=self.job, grouping_key={"entity": self.entity}, registry=self.registry
            )
        except Exception as error:  # noqa: BLE001 - an unreachable gateway must not fail the job
            log.warning("could not push metrics to %s: %s: %s", url, type(error).__name__, first_line(error))
            return False
        log.info("pushed %d metrics to %s (job %s)", len(self.gauges), url, self.job)
        return True


def stage(metrics: JobMetrics, name: str, seconds: float, rows_in: int, **labels: str) -> None:
    """Rows in, duration and rows/s of one stage (embed, publish, backfill, train...)."""
    metrics.set("stage_rows_in", rows_in, "rows the stage read", stage=name, **labels)
    metrics.set("stage_duration_seconds", seconds, "wall time of the stage", stage=name, **labels)
    if seconds > 0:
        metrics.set("stage_rows_per_second", rows_in / seconds, "rows per second", stage=name, **labels)


def embed_figures(metrics: JobMetrics, result, batch_label: str | None = None) -> None:
    """An embed run: rows in, embedded, quarantined, duplicates dropped, rows/s, duration."""
    labels = {"model_version": result.model_version, "batch": batch_label or result.batch_id}
    stage(metrics, "embed", result.seconds, result.input_rows, **labels)
    metrics.set("rows_embedded", result.embedded_rows, "rows written to the version's table", **labels)
    metrics.set("rows_quarantined", result.quarantined_rows, "bad rows sent to quarantine", **labels)
    metrics.set("rows_duplicate_dropped", result.duplicate_rows, "duplicate keys dropped", **labels)
    data_check_figures(metrics, result.model_version, labels["batch"], result.data_checks)


def data_check_figures(metrics: JobMetrics, version: str, batch: str, checks: list[dict]) -> None:
    """Each data check of a batch: failed (1) or passed (0), and what it measured."""
    for check in checks:
        labels = {
            "model_version": version,
            "batch": batch,
            "check": check["name"],
            "column": check["column"] or "",
            "check_severity": check["severity"],
        }
        failed = 0 if check["passed"] else 1
        metrics.set("data_check_failed", failed, "1 when a data check of the batch failed", **labels)
        metrics.set("data_check_value", check["value"], "what a data check measured", **labels)


def publish_figures(metrics: JobMetrics, summary: dict, seconds: float) -> None:
    labels = {"model_version": summary["model_version"], "batch": ""}
    stage(metrics, "publish", seconds, summary["rows"], **labels)
    metrics.set("rows_published", summary["rows"], "rows written to the online store", **labels)
    metrics.set("version_keys", summary.get("version_keys"), "keys of the version online", **labels)


def monitoring_figures(metrics: JobMetrics, report: dict, batch: str) -> None:
    """A batch's drift p-values per test, MMD, anomaly rate and its expected value, active units."""
    labels = {"model_version": report["model_version"], "batch": batch}
    drift = report.get("drift")
    if drift:
        metrics.set("drift_p_value", drift["p_value"], "combined drift p-value (Bonferroni)", **labels)
        metrics.set("drift_detected", drift["detected"], "1 when the combined p-value < alpha", **labels)
        for test, result in drift["tests"].items():
            p = result.get("p_value")
            metrics.set("drift_test_p_value", p, "p-value of one drift test", test=test, **labels)
        metrics.set("drift_mmd", drift["tests"]["mmd"].get("mmd2"), "squared MMD to the reference", **labels)
    anomaly = report["anomaly"]
    metrics.set("anomaly_rate", anomaly["rate"], "share of rows above the anomaly threshold", **labels)
    metrics.set(
        "anomaly_rate_expected", anomaly["expected_rate"], "the rate the calibration expects", **labels
    )
    metrics.set(
        "anomaly_rate_p_value",
        anomaly.get("p_value"),
        "the rate's excess over the calibration's rows",
        **labels,
    )
    for shift in (report.get("inputs") or {}).get("columns", []):
        column = {"column": shift["column"], "test": shift["test"], **labels}
        metrics.set("input_column_shift", shift["effect"], "how far an input column moved (0..1)", **column)
        metrics.set("input_column_shift_p_value", shift["p_value"], "its Holm-adjusted p-value", **column)
    collapse = next(c for c in report["checks"] if c["name"] == "collapse")
    metrics.set("active_units_share", collapse["value"], "share of latent units active", **labels)
    moved = report.get("movement")
    if moved:
        version_figures(metrics, report["model_version"], None, moved)


def version_figures(metrics: JobMetrics, version: str, info: dict | None, moved: dict | None = None) -> None:
    """A model version's active units, validation ELBO and age; CKA and k-NN overlap to another version."""
    labels = {"model_version": version}
    if info is not None:
        figures = info.get("metrics", {})
        metrics.set("version_active_units", figures.get("active_units"), "active latent units", **labels)
        metrics.set(
            "version_validation_negative_elbo",
            figures.get("val_negative_elbo"),
            "validation -ELBO, nats/example",
            **labels,
        )
        metrics.set(
            "version_iw_nll", figures.get("iw_nll"), "importance-weighted NLL, nats/example", **labels
        )
        created = info.get("created_at")
        if created:
            stamp = datetime.fromisoformat(created).timestamp()
            metrics.set("version_created_timestamp_seconds", stamp, "when the version was saved", **labels)
    if moved:
        baseline = {"baseline_version": str(moved.get("baseline_version"))}
        metrics.set(
            "version_linear_cka", moved["linear_cka"], "linear CKA to the baseline", **labels, **baseline
        )
        metrics.set(
            "version_knn_overlap", moved["knn_overlap"]["mean"], "k-NN overlap@k", **labels, **baseline
        )
