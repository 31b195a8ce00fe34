"""An embed run's identity: every setting that shapes the batch's rows is in the run id, so a re-run
with another setting is a new run (it replaces the batch) and a resumed run never mixes settings."""

import dataclasses
from datetime import UTC, datetime

import pytest

from vae.embeddings.runs import EncodeOptions, run_id

OPTIONS = EncodeOptions(
    batch_id="2026-12-01",
    batch_size=1024,
    on_bad_rows="fail",
    on_duplicate_keys="fail",
    timestamp_column=None,
    event_time=datetime(2026, 12, 1, tzinfo=UTC),
    threshold=3.5,
    key_type="int64",
)
LISTING = [{"path": "part-0.parquet", "size": 100, "rows": 10, "version": "1"}]


def identity(options: EncodeOptions) -> str:
    return run_id("/data/date=2026-12-01", "v1", LISTING, options, 65_536)


@pytest.mark.parametrize(
    "change",
    [
        {"attribution": False},
        {"impute": True},
        {"unseen_categories": "other"},
        {"threshold": 4.0},
        {"on_bad_rows": "quarantine"},
        {"on_duplicate_keys": "keep-latest"},
        {"timestamp_column": "ts"},
        {"event_time": datetime(2026, 12, 2, tzinfo=UTC)},
    ],
)
def test_every_output_shaping_setting_changes_the_run(change):
    assert identity(dataclasses.replace(OPTIONS, **change)) != identity(OPTIONS)


def test_the_same_settings_are_the_same_run():
    assert identity(dataclasses.replace(OPTIONS)) == identity(OPTIONS)
    # every field of EncodeOptions is either in the identity or named here as not shaping the rows
    not_shaping = {"key_type"}  # follows from the input's schema, which the listing covers
    not_shaping.add("profile_inputs")  # whether the run gathers its inputs' profile: a file beside, no row
    shaping = {f.name for f in dataclasses.fields(EncodeOptions)} - not_shaping
    changed = {
        name
        for name in shaping
        if identity(dataclasses.replace(OPTIONS, **{name: _other(getattr(OPTIONS, name))}))
        != identity(OPTIONS)
    }
    assert changed == shaping


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float) and value is not None:
        return value + 1
    if isinstance(value, datetime):
        return value.replace(year=value.year + 1)
    return f"{value}-other"
