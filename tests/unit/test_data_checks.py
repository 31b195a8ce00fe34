"""Input profiles, the data checks and the input explanation of latent alarms, on generated tables with
planted upstream breakages (vae.monitoring.profile, datachecks, explain) and on the decision log."""

import re

import numpy as np
import pyarrow as pa
import pytest

from vae.data.features import FeatureSchema
from vae.data.keys import key_hash
from vae.data.tabular import ColumnSpec, TableSchema
from vae.monitoring.datachecks import CheckSettings, check_batch, failed, worst
from vae.monitoring.explain import column_shifts, explanation, input_explanation
from vae.monitoring.profile import SAMPLE_ROWS, InputProfile
from vae.pipeline.decisions import Decision, exit_code
from vae.pipeline.policy import BatchHealth, Trigger, pending_retrain, training_window

FEATURES = FeatureSchema(
    "item_id",
    4,
    feature_columns=("amount", "age", "country", "member"),
    table=TableSchema(
        (
            ColumnSpec("amount", "numeric"),
            ColumnSpec("age", "numeric"),
            ColumnSpec("country", "categorical", categories=("de", "fr", "us")),
            ColumnSpec("member", "binary"),
        )
    ),
)


def day(seed: int, rows: int = 2000, **planted) -> pa.Table:
    """One day's items: a log-normal amount, a normal age with 2% missing, a country, a member flag."""
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3.7, 0.5, rows) * planted.get("amount_scale", 1.0)
    age = rng.normal(40 + planted.get("age_shift", 0.0), 10, rows)
    age[rng.random(rows) < 0.02] = np.nan
    country = rng.choice(["de", "fr", "us"], rows, p=[0.5, 0.3, 0.2]).astype(object)
    if vanished := planted.get("vanish"):
        country[country == vanished] = "fr"
    if planted.get("new_country"):
        country[rng.random(rows) < 0.3] = "zz"
    columns = {
        "item_id": pa.array(seed * 1_000_000 + np.arange(rows)),
        "amount": pa.array(amount),
        "age": pa.array(age, mask=np.isnan(age)),
        "country": pa.array(country, pa.string()),
        "member": pa.array(rng.random(rows) < 0.3),
    }
    if planted.get("null_column"):
        columns[planted["null_column"]] = pa.nulls(rows, columns[planted["null_column"]].type)
    table = pa.table(columns)
    if planted.get("duplicated_join"):  # a join that matched every row twice
        table = pa.concat_tables([table, table])
    return table


def profile(table: pa.Table, chunk: int = 700) -> InputProfile:
    """As the embed pass gathers it: one profile per record batch, merged."""
    merged = InputProfile()
    for batch in table.to_batches(max_chunksize=chunk):
        merged = merged.merge(InputProfile.of(batch, FEATURES, key_hash(batch.column("item_id"))))
    return InputProfile.from_json(merged.to_json())


@pytest.fixture(scope="module")
def trained() -> InputProfile:
    training = profile(pa.concat_tables([day(seed) for seed in range(5)]))
    training.batches = 5
    return training


def failing(trained: InputProfile, batch: pa.Table, duplicates: int = 0) -> list[tuple[str, str | None]]:
    checks = check_batch(trained, profile(batch), duplicates, CheckSettings())
    return [(check.name, check.column) for check in failed(checks)]


def test_a_profile_is_the_same_however_the_rows_are_cut_into_batches():
    table = day(1, rows=5000)
    whole, cut = profile(table, chunk=5000), profile(table, chunk=333)
    assert whole.rows == cut.rows == 5000
    for name, column in whole.columns.items():
        other = cut.columns[name]
        assert (column.missing, column.count, column.values) == (other.missing, other.count, other.values)
        assert column.total == pytest.approx(other.total) and column.minimum == other.minimum
    # the key-hash sample holds the same rows in any layout, so the same values
    assert np.array_equal(whole.sample_hashes, cut.sample_hashes) and len(whole.sample_hashes) == SAMPLE_ROWS
    np.testing.assert_array_equal(whole.sample["amount"], cut.sample["amount"])
    assert whole.null_rate("age") == pytest.approx(np.isnan(table.column("age").to_numpy(False)).mean(), 0.01)


@pytest.mark.parametrize(
    "planted, check, column",
    [
        ({"amount_scale": 1000.0}, "scale", "amount"),
        ({"null_column": "age"}, "null_rate", "age"),
        ({"null_column": "country"}, "null_rate", "country"),
        ({"vanish": "de"}, "vanished_categories", "country"),
        ({"new_country": True}, "new_categories", "country"),
    ],
)
def test_each_planted_breakage_fails_its_own_check_naming_the_column(trained, planted, check, column):
    found = failing(trained, day(50, **planted))
    assert (check, column) in found
    assert {c for _, c in found} == {column}  # no other column is blamed


def test_a_duplicated_join_fails_the_duplicate_key_check(trained):
    batch = day(51, duplicated_join=True)
    assert failing(trained, batch, duplicates=batch.num_rows // 2) == [("duplicate_keys", None)]


def test_a_batch_far_smaller_than_the_usual_one_is_a_warning(trained):
    checks = check_batch(trained, profile(day(52, rows=150)), 0, CheckSettings())
    assert [(c.name, c.severity) for c in failed(checks)] == [("row_count", "warn")]
    assert worst(checks) == "warn"


def test_null_batches_raise_no_data_alarm_and_name_no_column(trained):
    """30 batches from the training distribution (false alarm rate of the checks and the explanation)."""
    alarms = [failing(trained, day(100 + seed)) for seed in range(30)]
    named = [column_shifts(trained, profile(day(100 + seed))) for seed in range(30)]
    assert sum(bool(a) for a in alarms) == 0
    assert sum(bool(n) for n in named) <= 1  # Holm at 0.01 per batch: about 0.3 expected in 30


def test_a_real_shift_passes_the_checks_and_its_explanation_names_the_shifted_column(trained):
    shifted = day(60, age_shift=8.0)
    assert failing(trained, shifted) == []
    shifts = column_shifts(trained, profile(shifted))
    assert [s.column for s in shifts][:1] == ["age"]
    assert explanation(shifts).startswith("age (KS p")
    assert re.search(r"median 40\.\d -> 4[78]\.\d\)$", explanation(shifts))


@pytest.mark.parametrize(
    "planted, first, text",
    [
        ({"amount_scale": 1000.0}, "amount", "amount (KS p < 1e-300, median"),
        ({"null_column": "age"}, "age", "age (missing 2% -> 100%"),
        ({"vanish": "de"}, "country", "'de' 50% -> 0%"),
        ({"new_country": True}, "country", "new 'zz' 30%"),
    ],
)
def test_an_alarm_names_the_broken_column_first(trained, planted, first, text):
    shifts = column_shifts(trained, profile(day(70, **planted)))
    assert shifts[0].column == first
    assert text in explanation(shifts)


def test_vector_inputs_say_what_is_shown_instead_of_columns():
    vector = FeatureSchema("item_id", 3, vector_column="pixels")
    table = pa.table({"item_id": pa.array([1, 2, 3]), "pixels": pa.array([[0.1, 0.2, 0.3]] * 3)})
    reference = InputProfile.of(table, vector, key_hash(table.column("item_id")))
    drift = {
        "tests": {
            "per_dimension": {
                "adjusted_p_values": [0.5, 1e-9, 0.003],
                "ks_statistic": [0.01, 0.4, 0.2],
                "drifted_dimensions": [1, 2],
            }
        }
    }
    inputs = input_explanation(reference, reference, drift)
    assert inputs["columns"] == [] and "one vector column" in inputs["note"]
    assert inputs["summary"] == "latent z1 (KS p = 1e-09), z2 (KS p = 0.003)"


def decision(batch: str, kind: str, version: str = "v1", **detail) -> Decision:
    return Decision(batch, kind, version, "", detail)


def monitored(batch: str, drift: bool) -> Decision:
    health = BatchHealth(batch, "v1", 100, drift, 1e-6 if drift else 0.5, 0.01, 0.01, 1.0, False)
    return decision(batch, "monitored", health=health.__dict__)


def test_blocked_batches_neither_fire_the_trigger_nor_enter_a_training_window():
    log = []
    for batch in ("d1", "d2", "d3", "d4"):
        log += [decision(batch, "embedded", data=f"/data/{batch}"), monitored(batch, drift=batch != "d1")]
        log += [decision(batch, "drift_seen")] if batch != "d1" else []
    log.insert(4, decision("d2", "data_blocked"))
    log.append(decision("d4", "data_blocked"))
    trigger = Trigger(drift_batches=2, window_batches=3, anomaly_rate_multiple=3.0)
    assert pending_retrain(log, "d4", "v1", trigger, retry_batches=1) is None  # d4 is blocked
    # without the blocks, d2-d4 drifted: the trigger fires on d4
    unblocked = [d for d in log if d.kind != "data_blocked"]
    assert pending_retrain(unblocked, "d4", "v1", trigger, retry_batches=1) is not None
    assert [batch for batch, _ in training_window(log, 5)] == ["d3"]
    assert [batch for batch, _ in training_window(unblocked, 5)] == ["d2", "d3", "d4"]


def test_the_exit_code_is_that_of_the_most_notable_decision():
    assert exit_code([decision("d", "drift_seen"), decision("d", "data_blocked")]) == 7
    assert exit_code([decision("d", "data_blocked"), decision("d", "switched")]) == 4
    assert exit_code([decision("d", "data_refused")]) == 8
    assert exit_code([decision("d", "data_warning")]) == 0
