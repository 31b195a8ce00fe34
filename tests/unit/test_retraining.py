"""The daily pipeline's policy (vae.pipeline.policy) and its decision log (vae.pipeline.decisions)
on a real SQLite Iceberg catalog: when to retrain, when to roll back, the held-out ELBO in raw units,
a log that a re-run appends nothing to."""

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from vae.embeddings.catalog import EmbeddingsCatalog
from vae.pipeline.decisions import Decision, DecisionLog, exit_code, of_batch
from vae.pipeline.policy import (
    BatchHealth,
    Trigger,
    champion_history,
    elbo_gate,
    heldout_negative_elbo,
    pending_retrain,
    retrain_reason,
    training_window,
    unlogged_rollback,
    unlogged_switch,
    watch_breach,
    watched_over,
)


def health(batch: str, drift: bool = False, rate: float = 0.01, collapsed: bool = False) -> BatchHealth:
    return BatchHealth(
        batch, "v1", 1000, drift, 1e-6 if drift else 0.5, rate, 0.01, 0.0 if collapsed else 1.0, collapsed
    )


TRIGGER = Trigger(drift_batches=2, window_batches=3, anomaly_rate_multiple=3.0)


def test_drift_in_k_of_the_last_n_batches_triggers_a_retrain():
    assert retrain_reason([], TRIGGER) is None
    assert retrain_reason([health("d1", drift=True)], TRIGGER) is None, "one batch is not K=2"
    # two of the last three, with a healthy one between
    history = [health("d1"), health("d2", drift=True), health("d3"), health("d4", drift=True)]
    reason = retrain_reason(history, TRIGGER)
    assert reason.startswith("drift in 2 of the last 3 batches (d2, d4)")
    # the older drifted batch falls out of the window of 3
    history = [health("d1", drift=True), health("d2"), health("d3"), health("d4", drift=True)]
    assert retrain_reason(history, TRIGGER) is None


def test_an_anomaly_rate_above_the_multiple_triggers_at_once_when_it_is_no_chance():
    assert retrain_reason([health("d1", rate=0.029)], TRIGGER) is None
    reason = retrain_reason([health("d1", rate=0.031)], TRIGGER)
    assert reason == "batch d1: anomaly rate 3.1%, above 3x the calibrated 1.0%"
    # the calibration's own rows make 4.5% likely by chance (a 99% threshold from 120 rows): no spike
    chance = BatchHealth("d1", "v1", 597, False, 0.5, 0.045, 0.01, 1.0, False, anomaly_p_value=0.12)
    assert not chance.anomaly_spike(3.0) and retrain_reason([chance], TRIGGER) is None
    evidence = BatchHealth("d1", "v1", 1000, False, 0.5, 0.23, 0.01, 1.0, False, anomaly_p_value=1e-9)
    assert retrain_reason([evidence], TRIGGER).endswith("above 3x the calibrated 1.0%, p = 1e-09")


def test_a_watched_version_is_rolled_back_on_any_problem_and_says_why():
    assert watch_breach(health("d5"), 3.0) is None
    breach = watch_breach(health("d5", drift=True, collapsed=True), 3.0)
    assert breach.startswith("batch d5 against v1's own reference: drift (combined p = 1e-06)")
    assert "collapse (0% of latent units active)" in breach


def test_heldout_elbo_is_in_the_raw_datas_units():
    scores = np.array([10.0, 12.0])
    bernoulli = {"architecture": {"likelihood": "bernoulli"}, "normalizer": {"scale": [255.0]}}
    assert heldout_negative_elbo(scores, bernoulli) == 11.0
    # x = 2 * normalized x in each of 3 dims: the density of x is 2^-3 times that of the normalized x
    gaussian = {"architecture": {"likelihood": "gaussian"}, "normalizer": {"scale": [2.0, 2.0, 2.0]}}
    assert heldout_negative_elbo(scores, gaussian) == pytest.approx(11.0 + 3 * math.log(2.0))
    assert elbo_gate(11.5, 11.0, 1.0)[0] and not elbo_gate(12.5, 11.0, 1.0)[0]
    assert not elbo_gate(float("nan"), 11.0, 1.0)[0]
    assert (
        elbo_gate(12.5, 11.0, 1.0)[1]
        == "held-out -ELBO 12.50 vs champion 11.00 nats/example (+1.50; allowed +1)"
    )


def day(batch: str, version: str, drift: bool = False) -> list[Decision]:
    """What a quiet step logs for a batch: embedded, monitored (drift_seen too when it drifted)."""
    found = [
        Decision(batch, "embedded", version, detail={"data": f"/lake/{batch}"}),
        Decision(
            batch,
            "monitored",
            version,
            detail={"health": health(batch, drift).__dict__ | {"model_version": version}},
        ),
    ]
    return found + ([Decision(batch, "drift_seen", version)] if drift else [])


def test_a_new_version_is_watched_over_for_its_first_batches_then_no_longer():
    log = [*day("d1", "v1"), *day("d2", "v1"), Decision("d2", "switched", "v2", detail={"from": "v1"})]
    # the switch's own batch starts nothing; the next three batches are watched, this one included
    assert watched_over(log, "v2", "d2", watch_batches=3) is None
    for batch in ("d3", "d4", "d5"):
        assert watched_over(log, "v2", batch, watch_batches=3) == "v1", batch
        log += day(batch, "v2")
    assert watched_over(log, "v2", "d6", watch_batches=3) is None, "three batches held: the watch is over"
    assert watched_over(log, "v2", "d3", watch_batches=0) is None
    # a first version (switched from nothing) and a rolled back one are not watched
    first = [Decision("d1", "switched", "v1", detail={"from": None})]
    assert watched_over(first, "v1", "d2", watch_batches=3) is None
    rolled = [*log[:7], Decision("d3", "rolled_back", "v2", detail={"to": "v1"})]
    assert watched_over(rolled, "v2", "d4", watch_batches=3) is None


def test_the_champions_history_starts_when_it_became_current_or_was_last_retrained():
    log = [*day("d1", "v1", drift=True), Decision("d1", "switched", "v1", detail={"from": "v0"})]
    log += [*day("d2", "v1"), *day("d3", "v1", drift=True)]
    assert [h.batch_id for h in champion_history(log, "v1")] == ["d2", "d3"]
    log += [Decision("d3", "retrain_started", "v1"), *day("d4", "v1")]
    assert [h.batch_id for h in champion_history(log, "v1")] == ["d4"]
    log += [Decision("d4", "rolled_back", "v2", detail={"to": "v1"}), *day("d5", "v1", drift=True)]
    assert [h.batch_id for h in champion_history(log, "v1")] == ["d5"]


def test_a_retrain_is_due_on_the_trigger_resumed_when_unfinished_and_spaced_after_a_refusal():
    log = [*day("d1", "v1", drift=True), *day("d2", "v1", drift=True)]
    assert pending_retrain(log, "d2", "v1", TRIGGER, retry_batches=2).startswith("drift in 2 of the last 2")
    # a retrain of this batch that a crash cut short is finished by the re-run, whatever the trigger says
    started = [*day("d1", "v1"), Decision("d1", "retrain_started", "v1", "the reason")]
    assert pending_retrain(started, "d1", "v1", TRIGGER, retry_batches=2) == "the reason"
    done = [*started, Decision("d1", "challenger_refused", "v2")]
    assert pending_retrain(done, "d1", "v1", TRIGGER, retry_batches=2) is None
    # after the refusal, a batch that alone fires the trigger (its anomaly rate) waits for retry_batches
    spike = Decision("d2", "monitored", "v1", detail={"health": health("d2", rate=0.2).__dict__})
    later = [*done, spike]
    assert retrain_reason([health("d2", rate=0.2)], TRIGGER) is not None
    assert pending_retrain(later, "d2", "v1", TRIGGER, retry_batches=2) is None
    later.append(Decision("d3", "monitored", "v1", detail={"health": health("d3", rate=0.2).__dict__}))
    assert pending_retrain(later, "d3", "v1", TRIGGER, retry_batches=2).startswith("batch d3: anomaly rate")
    # a challenger whose training failed on its window is a refusal too: no retry on every re-run
    failed = [
        *started,
        Decision("d1", "challenger_refused", None, "training failed: ...", {"failed": "training"}),
    ]
    assert pending_retrain(failed, "d1", "v1", TRIGGER, retry_batches=2) is None
    assert pending_retrain([*failed, spike], "d2", "v1", TRIGGER, retry_batches=2) is None


def test_the_training_window_leaves_out_a_breaching_batch_and_the_old_healthy_lead():
    log = [*day("d1", "v1"), *day("d2", "v1"), *day("d3", "v1", drift=True), *day("d4", "v1", drift=True)]
    assert training_window(log, train_window=7) == [("d3", "/lake/d3"), ("d4", "/lake/d4")]
    assert training_window(log, train_window=1) == [("d4", "/lake/d4")]
    log += [*day("d5", "v2"), Decision("d5", "rolled_back", "v2", detail={"to": "v1"}), *day("d6", "v1")]
    assert [batch for batch, _ in training_window(log, train_window=7)] == ["d3", "d4", "d6"]
    # all healthy: the newest batch alone is left
    assert training_window(day("d1", "v1") + day("d2", "v1"), train_window=7) == [("d2", "/lake/d2")]


def test_a_switch_done_but_not_logged_is_logged_by_the_re_run():
    log = [
        *day("d9", "v1"),
        Decision("d9", "retrain_started", "v1"),
        Decision("d9", "challenger_trained", "v2"),
    ]
    switch = unlogged_switch(log, "d9", serving="v2")
    assert (switch.kind, switch.model_version, switch.detail) == ("switched", "v2", {"from": "v1"})
    assert unlogged_switch(log, "d9", serving="v1") is None, "still serving the champion: not switched"
    assert unlogged_switch([*log, switch], "d9", serving="v2") is None, "logged already"
    assert unlogged_switch(day("d9", "v1"), "d9", serving="v1") is None


def test_a_rollback_done_but_not_logged_is_logged_by_the_re_run_and_leaves_the_window():
    log = [
        *day("d1", "v1"),
        Decision("d1", "switched", "v2", detail={"from": "v1"}),
        *day("d2", "v2"),
        *day("d2", "v1"),  # the watched-over version gets the batch too
    ]
    # killed after switching back to v1, before logging it: the re-run of d2 finds v1 serving
    rollback = unlogged_rollback(log, "d2", serving="v1")
    assert (rollback.kind, rollback.batch_id, rollback.model_version) == ("rolled_back", "d2", "v2")
    assert rollback.detail == {"to": "v1"}
    assert "d2" not in [batch for batch, _ in training_window([*log, rollback], train_window=7)]
    assert unlogged_rollback(log, "d2", serving="v2") is None, "still serving the new version"
    assert unlogged_rollback([*log, rollback], "d2", serving="v1") is None, "logged already"
    assert unlogged_rollback([*log, *day("d3", "v1")], "d3", serving="v1") is None, "d3 never ran under v2"
    assert unlogged_rollback(day("d1", "v1"), "d1", serving="v1") is None, "no switch at all"


@pytest.fixture
def catalog(tmp_path) -> EmbeddingsCatalog:
    return EmbeddingsCatalog(f"sqlite:///{tmp_path / 'catalog.db'}", str(tmp_path / "warehouse"))


def test_the_log_appends_once_keeps_order_and_survives_a_reopen(catalog):
    log = DecisionLog(catalog, "item")
    assert log.read() == []
    first = [
        Decision("d1", "embedded", "v1", "1,000 rows", {"rows": 1000, "share": np.float32(0.5)}),
        Decision("d1", "monitored", "v1", "healthy"),
        Decision("d1", "published", "v1"),
    ]
    assert len(log.append(first, "run-a")) == 3
    # a re-run of the step decides the same again, and one new thing: only that is appended
    again = [*first, Decision("d1", "drift_seen", "v1", "drift (combined p = 1e-06)")]
    appended = log.append(again, "run-b")
    assert [d.kind for d in appended] == ["drift_seen"] and appended[0].step == "run-b"
    reopened = DecisionLog(catalog, "item").read()
    assert [d.kind for d in reopened] == ["embedded", "monitored", "published", "drift_seen"]
    assert reopened[0].detail == {"rows": 1000, "share": 0.5} and reopened[0].step == "run-a"
    assert all(d.decided_at.tzinfo is not None for d in reopened)
    assert reopened[0].line().endswith("d1 embedded v1: 1,000 rows")
    assert DecisionLog(catalog, "user").read() == [], "each entity set has its own log"


def test_exit_code_is_the_most_notable_decision():
    kinds = lambda *names: [Decision("d", name, "v") for name in names]  # noqa: E731
    assert exit_code(kinds("embedded", "monitored", "published")) == 0
    assert exit_code(kinds("embedded", "drift_seen")) == 3
    assert exit_code(kinds("drift_seen", "retrain_started", "switched")) == 4
    assert exit_code(kinds("drift_seen", "challenger_refused")) == 5
    assert exit_code(kinds("drift_seen", "rolled_back")) == 6
    assert of_batch([Decision("a", "embedded", "v"), Decision("b", "embedded", "v")], "b")[0].batch_id == "b"


def test_the_log_before_the_first_embed_leaves_the_entity_registrable(catalog):
    DecisionLog(catalog, "item").append([Decision("d1", "retrain_started", None, "no model yet")], "run")
    assert catalog.entity_sets() == []  # (found by the crash sweep: a step killed in its first training)
    entity = catalog.register("item", "item_id", "int64")
    assert (entity.join_key, entity.key_type) == ("item_id", "int64")
    assert catalog.entity_sets() == [entity]
    when = DecisionLog(catalog, "item").read()[0].decided_at
    assert when <= datetime.now(UTC)


HOLD_AND_DIE = """
import os, sys, time
from vae.embeddings.catalog import EmbeddingsCatalog
catalog = EmbeddingsCatalog(sys.argv[1], sys.argv[2])
renew = sys.argv[4] == "renew"
with catalog.lock("pipeline-item", ttl_seconds=float(sys.argv[3]), wait_seconds=0, renew=renew):
    print("held", flush=True)
    time.sleep(float(sys.argv[5]))
    os._exit(9)  # killed while holding the lock: no release
"""


def test_the_step_lock_refuses_a_second_holder_and_a_crashed_one_loses_it(catalog, tmp_path):
    import subprocess
    import sys
    import time

    from vae.embeddings.lock import LockHeld

    def holder(ttl: float, renew: bool, hold: float) -> subprocess.Popen:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                HOLD_AND_DIE,
                catalog.uri,
                catalog.warehouse,
                str(ttl),
                "renew" if renew else "-",
                str(hold),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "held"
        return process

    # A live holder that renews its 1 s lease keeps the lock past the lease.
    process = holder(ttl=1.0, renew=True, hold=3.0)
    try:
        time.sleep(1.5)
        with pytest.raises(LockHeld) as refused, catalog.lock("pipeline-item", wait_seconds=0):
            pass
        assert "pipeline-item" in str(refused.value) and f":{process.pid}:" in str(refused.value)
    finally:
        process.wait(timeout=30)
    assert process.returncode == 9
    # It died holding the lock: the lease runs out (1 s) and the next step gets it.
    started = time.monotonic()
    with catalog.lock("pipeline-item", wait_seconds=10):
        waited = time.monotonic() - started
    assert waited < 2.5
    # A crashed holder that did not renew loses it after its lease, not before.
    process = holder(ttl=2.0, renew=False, hold=0.0)
    process.wait(timeout=30)
    with pytest.raises(LockHeld), catalog.lock("pipeline-item", wait_seconds=0.2):
        pass
    with catalog.lock("pipeline-item", wait_seconds=10):
        pass


def test_the_held_out_check_compares_both_versions_on_the_challengers_validation_keys():
    import pyarrow as pa

    from vae.data.keys import is_validation, key_hash
    from vae.pipeline.policy import heldout_check
    from vae.versions.artifacts import ModelVersionInfo

    metadata = {"architecture": {"likelihood": "bernoulli"}, "training": {"validation_fraction": 0.5}}
    new, old = ModelVersionInfo("v2", "/m/v2", metadata), ModelVersionInfo("v1", "/m/v1", metadata)
    keys = pa.array(range(200), pa.int64())
    held_out = is_validation(key_hash(keys), 0.5)
    # the challenger is worse on training keys (which it memorized differently) but better held out
    scores = {"v2": np.where(held_out, 10.0, 99.0), "v1": np.full(200, 10.5)}
    rows = {
        v: pa.table({"item_id": keys, "anomaly_score": s, "batch_id": ["d1"] * 200})
        for v, s in scores.items()
    }
    check = heldout_check(rows, "item_id", new, old, margin=1.0)
    assert check.passed and check.value == pytest.approx(-0.5)
    assert check.detail.startswith("held-out -ELBO 10.00 vs champion 10.50 nats/example")
    rows["v2"] = rows["v2"].filter(pa.array(~held_out))  # no held-out row both embedded
    check = heldout_check(rows, "item_id", new, old, margin=1.0)
    assert not check.passed and check.detail == "no held-out rows both versions embedded"


def test_the_held_out_check_compares_mixed_tables_in_raw_units_row_by_row():
    """Two versions of a mixed table with different transforms (robust at scale 1, asinh at scale 10), each
    scoring every row at the exact density of the raw values mapped into its own codes: in raw units they
    are equal, whatever the transforms. An item embedded on two days is matched by key and batch."""
    import pyarrow as pa

    from vae.data.tabular import ColumnSpec, TableSchema
    from vae.pipeline.policy import heldout_check
    from vae.versions.artifacts import ModelVersionInfo

    def version(name: str, transform: str, scale: float) -> tuple[ModelVersionInfo, TableSchema]:
        schema = TableSchema((ColumnSpec("amount", "numeric", transform, 0.0, scale),))
        metadata = {
            "architecture": {"likelihood": "mixed"},
            "training": {"validation_fraction": 1.0},
            "features": {"table": schema.to_dict()},
        }
        return ModelVersionInfo(name, f"/m/{name}", metadata), schema

    (new, new_schema), (old, old_schema) = version("v2", "asinh", 10.0), version("v1", "robust", 1.0)
    rng = np.random.default_rng(0)
    keys = np.tile(np.arange(100), 2)  # every item on two days, with different values
    batches = ["d1"] * 100 + ["d2"] * 100
    raw = pa.table({"item_id": keys, "batch_id": batches, "amount": rng.standard_normal(200) * 3})
    true_nll = 0.5 * math.log(2 * math.pi) + 0.5 * raw.column("amount").to_numpy() ** 2
    scores = {  # a code density that is the raw one carried over: -log p(code) = -log p(x) + log |dc/dx|
        v.version: true_nll + schema.log_jacobian(raw) for v, schema in ((new, new_schema), (old, old_schema))
    }
    rows = {
        v: raw.select(["item_id", "batch_id"]).append_column("anomaly_score", pa.array(s))
        for v, s in scores.items()
    }
    order = np.argsort(-keys, kind="stable")  # the versions' tables list rows in other orders
    rows["v1"] = rows["v1"].take(order)
    check = heldout_check(rows, "item_id", new, old, margin=0.1, inputs=raw.take(order[::-1]))
    assert check.value == pytest.approx(0.0, abs=1e-9)
    assert check.detail.startswith(f"held-out -ELBO {true_nll.mean():.2f} vs champion {true_nll.mean():.2f}")
    # without the rows' values the asinh version stays in its own units: a different answer
    assert abs(heldout_check(rows, "item_id", new, old, margin=0.1).value) > 1.0


def test_the_log_compacts_itself_so_a_year_of_appends_reads_as_a_few_files(catalog):
    log = DecisionLog(catalog, "item")
    for day in range(60):
        log.append([Decision(f"d{day:02d}", "embedded", "v1", "rows", {"data": f"/lake/d{day}"})], "run")
    table = log.table()
    table.refresh()
    files = int(table.current_snapshot().summary.additional_properties["total-data-files"])
    assert files <= 11 and len(table.snapshots()) <= 11  # not 60: compacted at 51 appends
    again = DecisionLog(catalog, "item").read()
    assert [d.batch_id for d in again] == [f"d{day:02d}" for day in range(60)]  # every row, in order
    assert again[59].detail == {"data": "/lake/d59"}
