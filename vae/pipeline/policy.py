"""When the daily pipeline retrains, what a challenger must show before it serves, and when a new
version is rolled back: pure functions of monitoring reports and of the decision log
(vae.pipeline.decisions), which is the pipeline's state. No I/O here.

    health     one batch's monitoring outcome against the version that embedded it: drift, the
               anomaly rate against the calibrated one, collapse
    trigger    drift in K of the last N batches the champion embedded since it became current (or
               since the last retrain), or the anomaly rate above a multiple of the calibrated one;
               after a refused challenger, not before `retry_batches` more batches; a batch the data
               checks blocked (vae.monitoring.datachecks) neither fires it nor counts
    watch      after a switch, each of the next M batches against the new version's own reference:
               any problem rolls it back (the version watched over is the one a rollback returns to)
    window     the batches a challenger trains on: the recent ones, less a batch that broke a watch
               and less the leading ones the champion found healthy
    held-out   the challenger's and the champion's negative ELBO on the same held-out rows, in nats
               per example of the raw data (the normalizer's Jacobian added for Gaussian models)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vae.data.keys import is_validation, key_hash
from vae.data.tabular import TableSchema
from vae.monitoring.gate import Check
from vae.pipeline.decisions import Decision, of_batch
from vae.versions.artifacts import ModelVersionInfo


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
    explanation: str = ""  # the input columns (or latent dimensions) that moved most, one phrase
    anomaly_columns: str = ""  # the columns that make the anomalous rows' surprise, e.g. "amount 71%"

    @classmethod
    def of_report(cls, batch_id: str, report: dict) -> BatchHealth:
        checks = {check["name"]: check for check in report["checks"]}
        drift = report.get("drift") or {}
        inputs = report.get("inputs") or {}
        shares = list((inputs.get("anomaly_attribution") or {}).items())[:3]
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
            inputs.get("summary", ""),
            ", ".join(f"{column} {share:.0%}" for column, share in shares),
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
            why = f": {self.explanation}" if self.explanation else ""
            found.append(f"drift (combined p = {self.drift_p_value:.3g}){why}")
        if self.anomaly_spike(multiple):
            evidence = f", p = {self.anomaly_p_value:.2g}" if self.anomaly_p_value is not None else ""
            surprise = f" (surprise: {self.anomaly_columns})" if self.anomaly_columns else ""
            found.append(
                f"anomaly rate {self.anomaly_rate:.1%}, above {multiple:g}x the calibrated "
                f"{self.expected_anomaly_rate:.1%}{evidence}{surprise}"
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


def heldout_negative_elbo(
    scores: np.ndarray, metadata: dict, log_jacobian: np.ndarray | None = None
) -> float:
    """Mean negative ELBO (nats per example) of held-out rows, from their anomaly scores (the negative
    ELBO at the posterior mean, in the model's normalized space), in the raw data's units: a Gaussian
    model's density of x is that of (x - offset) / scale divided by the product of the scales. A mixed
    table's transforms are not all affine (asinh, log, quantile): `log_jacobian` holds each row's
    (vae.data.tabular.TableSchema.log_jacobian, from the rows' raw values), which makes it exact."""
    if log_jacobian is not None and metadata["architecture"]["likelihood"] == "mixed":
        return float(np.mean(scores - log_jacobian))
    mean = float(np.mean(scores))
    if metadata["architecture"]["likelihood"] == "gaussian":
        mean += float(np.sum(np.log(metadata["normalizer"]["scale"])))
    elif metadata["architecture"]["likelihood"] == "mixed":
        # without the rows' values: affine transforms only; the others stay in their transformed units
        columns = metadata["features"]["table"]["columns"]
        mean += sum(
            math.log(c["scale"])
            for c in columns
            if c["kind"] == "numeric" and c["transform"] in ("robust", "standard")
        )
    return mean


def table_schema(metadata: dict) -> TableSchema | None:
    """A version's mixed-table schema (None for vectors and images)."""
    table = metadata["features"].get("table")
    return TableSchema.from_dict(table) if table else None


def heldout_check(
    rows: dict[str, pa.Table],
    join_key: str,
    challenger: ModelVersionInfo,
    champion: ModelVersionInfo,
    margin: float,
    inputs: pa.Table | None = None,
) -> Check:
    """The gate's held-out check: both versions' -ELBO on the challenger's validation keys (never trained on
    by it; the key-hash split is the same for both), from the rows each version embedded, matched by key
    and batch. `inputs`: the same batches' raw rows (key, batch_id, numeric columns), for mixed tables'
    exact raw units (each version's own transforms' log-Jacobian at each row)."""
    fraction = challenger.metadata["training"]["validation_fraction"]
    held = {}
    for version, table in rows.items():
        table = table.filter(is_validation(key_hash(table.column(join_key)), fraction))
        held[version] = dict(
            zip(row_ids(table, join_key), table.column("anomaly_score").to_pylist(), strict=True)
        )
    keys = sorted(held[challenger.version].keys() & held[champion.version].keys())
    jacobians: dict[str, np.ndarray] = {}
    if inputs is not None:
        inputs = inputs.filter(is_validation(key_hash(inputs.column(join_key)), fraction))
        position = {row: i for i, row in enumerate(row_ids(inputs, join_key))}
        keys = [key for key in keys if key in position]
        raw = inputs.take(pa.array([position[key] for key in keys], pa.int64()))
        for info in (challenger, champion):
            if (schema := table_schema(info.metadata)) is not None:
                jacobians[info.version] = schema.log_jacobian(raw)
    if not keys:
        return Check("heldout_elbo", False, "no held-out rows both versions embedded", None)
    scores = {version: np.array([by_key[k] for k in keys], np.float64) for version, by_key in held.items()}
    ours = heldout_negative_elbo(
        scores[challenger.version], challenger.metadata, jacobians.get(challenger.version)
    )
    theirs = heldout_negative_elbo(
        scores[champion.version], champion.metadata, jacobians.get(champion.version)
    )
    passed, detail = elbo_gate(ours, theirs, margin)
    return Check("heldout_elbo", passed, detail, ours - theirs)


def row_ids(table: pa.Table, join_key: str) -> list[tuple]:
    """(key, batch) of each row: an item embedded on several days is one row per day."""
    return list(zip(table.column(join_key).to_pylist(), table.column("batch_id").to_pylist(), strict=True))


def elbo_gate(challenger: float, champion: float, margin: float) -> tuple[bool, str]:
    """The challenger's held-out negative ELBO may be worse than the champion's by at most `margin`."""
    worse = challenger - champion
    passed = bool(math.isfinite(challenger) and worse <= margin)
    detail = (
        f"held-out -ELBO {challenger:.2f} vs champion {champion:.2f} nats/example "
        f"({worse:+.2f}; allowed +{margin:g})"
    )
    return passed, detail


# ---------------------------------------------------------------------------------------------
# Queries on the decision log (oldest first)


def recorded(decisions: list[Decision], batch: str, kind: str, version: str | None = None) -> Decision | None:
    """The batch's decision of a kind (for a version, when given), if one was recorded."""
    found = [d for d in of_batch(decisions, batch) if d.kind == kind]
    return next((d for d in found if version is None or d.model_version == version), None)


def unlogged_switch(decisions: list[Decision], batch: str, serving: str | None) -> Decision | None:
    """The "switched" decision a step killed between switching to the version it trained for this batch
    and logging it did not record (the switch itself is one registry write: done or not); None when
    there is nothing to log."""
    trained = recorded(decisions, batch, "challenger_trained")
    if serving is None or trained is None or trained.model_version != serving:
        return None
    if recorded(decisions, batch, "switched"):
        return None
    started = recorded(decisions, batch, "retrain_started")
    champion = started.model_version if started else None
    reason = "logged by the re-run of the step that switched"
    return Decision(batch, "switched", serving, reason, {"from": champion})


def unlogged_rollback(decisions: list[Decision], batch: str, serving: str | None) -> Decision | None:
    """The "rolled_back" decision a step killed between switching back and logging it did not record:
    this batch was monitored under the version the last switch made current, and "current" is now the
    version that switch replaced. Logged, the batch leaves the next training window as a rollback's
    does. None when there is nothing to log."""
    switches = [i for i, d in enumerate(decisions) if d.kind == "switched" and d.detail.get("from")]
    if serving is None or not switches:
        return None
    switch, since = decisions[switches[-1]], decisions[switches[-1] :]
    left = switch.model_version  # the version a rollback left
    if serving != switch.detail["from"] or recorded(decisions, batch, "monitored", left) is None:
        return None
    if any(d.kind == "rolled_back" and d.model_version == left for d in since):
        return None
    reason = "logged by the re-run of the step that rolled back"
    return Decision(batch, "rolled_back", left, reason, {"to": serving})


def watched_over(decisions: list[Decision], champion: str, batch: str, watch_batches: int) -> str | None:
    """The version the champion replaced, while the champion is within its first watch_batches batches
    after a switch by the pipeline (this batch included); else None."""
    switches = [
        i
        for i, d in enumerate(decisions)
        if d.kind == "switched" and d.model_version == champion and d.detail.get("from")
    ]
    if not switches or watch_batches == 0:
        return None
    switch = decisions[switches[-1]]
    if switch.batch_id == batch:
        return None  # switched at the end of this very batch: the watch starts with the next one
    if any(d.kind == "rolled_back" and d.model_version == champion for d in decisions[switches[-1] :]):
        return None
    watched = {
        d.batch_id
        for d in decisions[switches[-1] + 1 :]
        if d.kind == "monitored" and d.model_version == champion
    }
    watched.discard(batch)
    return switch.detail["from"] if len(watched) < watch_batches else None


def data_blocked(decisions: list[Decision]) -> set[str]:
    """Batches whose data checks kept them out of training and the trigger (block-retrain), or refused
    them: an upstream breakage, not a changed world."""
    return {d.batch_id for d in decisions if d.kind in ("data_blocked", "data_refused")}


def champion_history(decisions: list[Decision], champion: str) -> list[BatchHealth]:
    """The champion's monitored batches since it last became current or was last retrained, less the
    batches the data checks blocked."""
    start = 0
    for i, d in enumerate(decisions):
        made_current = (d.kind == "switched" and d.model_version == champion) or (
            d.kind == "rolled_back" and d.detail.get("to") == champion
        )
        if made_current or d.kind == "retrain_started":
            start = i + 1
    blocked = data_blocked(decisions)
    return [
        BatchHealth.of_decision(d)
        for d in decisions[start:]
        if d.kind == "monitored" and d.model_version == champion and d.batch_id not in blocked
    ]


def pending_retrain(
    decisions: list[Decision], batch: str, champion: str, trigger: Trigger, retry_batches: int
) -> str | None:
    """Why to retrain after this batch: a retrain of this batch that did not finish, or the trigger
    (not within retry_batches batches of a refused challenger)."""
    started = recorded(decisions, batch, "retrain_started", champion)
    if started is not None:
        done = recorded(decisions, batch, "switched") or recorded(decisions, batch, "challenger_refused")
        return None if done else started.reason
    if batch in data_blocked(decisions):
        return None  # a batch the data checks blocked cannot fire the trigger
    history = champion_history(decisions, champion)
    refused = [d for d in decisions if d.kind == "challenger_refused"]
    retrains = [d for d in decisions if d.kind == "retrain_started"]
    if refused and retrains and refused[-1].batch_id == retrains[-1].batch_id:
        if len(history) < retry_batches:  # the last challenger was refused: not every day
            return None
    return retrain_reason(history, trigger)


def training_window(decisions: list[Decision], train_window: int) -> list[tuple[str, str]]:
    """(batch, data) of the last train_window batches embedded, less a batch that rolled a version back
    (its data broke the watch), less a batch the data checks blocked (a broken upstream) and less the
    window's leading batches that the version serving them found healthy: those are the distribution
    the champion already models, and a challenger whose reference mixed them in would see drift on
    every batch after the change."""
    breached = {d.batch_id for d in decisions if d.kind == "rolled_back"} | data_blocked(decisions)
    data: dict[str, str] = {}
    for d in decisions:
        if d.kind == "embedded" and d.batch_id not in breached:
            data.pop(d.batch_id, None)
            data[d.batch_id] = d.detail["data"]
    window = list(data.items())[-train_window:]
    healthy = {d.batch_id for d in decisions if d.kind == "monitored"} - {
        d.batch_id for d in decisions if d.kind == "drift_seen"
    }
    while len(window) > 1 and window[0][0] in healthy:
        window.pop(0)
    return window
