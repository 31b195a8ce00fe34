"""The daily pipeline over a generated fortnight of a mixed table with planted upstream breakages (a unit
change for two days, a column all null, a vanished category, a duplicated join) and then a real change
of the world (benchmarks/upstream.py), on a real local Ray cluster, Iceberg tables and Feast: each
breakage is caught by its own data check, names its column first, never trains a challenger nor fires
the trigger; the real change still retrains and its alarms name the shifted columns."""

import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.upstream import BREAKAGES, BROKEN_COLUMN, SHIFT_DAY, SHIFTED, day_table, simulate, summary
from ray_jobs.config import PipelineConfig
from ray_jobs.pipeline import step
from vae.errors import DATA_REFUSED_EXIT

log = logging.getLogger("tests.data_checks_month")
CHECK_OF = {
    "unit": "scale",
    "null": "null_rate",
    "vanish": "vanished_categories",
    "duplicate": "duplicate_keys",
}


@pytest.fixture(scope="module")
def fortnight(ray_cluster, tmp_path_factory):
    from benchmarks.upstream import new_feature_repo

    work = tmp_path_factory.mktemp("upstream")
    repo = new_feature_repo(work)
    result = simulate(work, repo)
    figures = summary(result)
    log.warning("planted fortnight: %s", figures)
    return {"result": result, "figures": figures, "work": work, "repo": repo}


def test_each_breakage_is_caught_by_its_check_naming_its_column_first(fortnight):
    result = fortnight["result"]
    for day, breakage in BREAKAGES.items():
        blocked = result.decision(day, "data_blocked")
        assert blocked is not None, (day, [d.kind for d in result.decisions[day]])
        first = blocked.detail["checks"][0]
        assert first["name"] == CHECK_OF[breakage] and first["column"] == BROKEN_COLUMN[breakage], first
        assert blocked.reason.startswith(
            f"kept out of training and the retrain trigger: {CHECK_OF[breakage]}"
        )
        # the batch is still embedded, monitored and served under the version that was current
        assert {"embedded", "monitored", "published"} <= {d.kind for d in result.decisions[day]}
        alarm = result.decision(day, "drift_seen")
        if alarm and alarm.reason.startswith("drift") and BROKEN_COLUMN[breakage]:
            # "drift (combined p = 1e-120): f2 (KS p < 1e-300, median 0.04 -> 312)": the broken column first
            assert alarm.reason.split("): ", 1)[1].startswith(BROKEN_COLUMN[breakage]), alarm.reason


def test_no_breakage_fires_a_retrain_or_enters_a_training_window(fortnight):
    result, figures = fortnight["result"], fortnight["figures"]
    assert all(day >= SHIFT_DAY for day in figures["retrain_days"]), figures["retrain_days"]
    for window in figures["retrain_windows"].values():
        broken = {f"day-{day:02d}" for day in BREAKAGES}
        assert not broken & set(window), window
    assert result.current[SHIFT_DAY - 1] == result.current[1], "the champion of day 1 served until the change"


def test_the_real_change_retrains_and_its_alarms_name_the_shifted_columns(fortnight):
    result, figures = fortnight["result"], fortnight["figures"]
    assert figures["retrain_days"] and figures["retrain_days"][0] <= SHIFT_DAY + 2
    assert result.days_with("switched")[-1] == figures["retrain_days"][0]
    assert result.current[max(result.decisions)] != result.current[1]
    alarms = [result.decision(d, "drift_seen") for d in result.days_with("drift_seen") if d >= SHIFT_DAY]
    assert alarms and alarms[0].batch_id == f"day-{SHIFT_DAY:02d}", "the change is seen on its first day"
    for alarm in alarms[:1] + [a for a in alarms if a.batch_id == f"day-{figures['retrain_days'][0]:02d}"]:
        assert {c["column"] for c in alarm.detail["inputs"][:2]} == set(SHIFTED), alarm.detail["inputs"]
        if alarm.reason.startswith("drift"):  # "drift (combined p = ...): f0 (KS p = 1e-40, median ...), f1"
            assert alarm.reason.split("): ", 1)[1].split(" (")[0] in SHIFTED, alarm.reason
        else:  # an anomaly-rate alarm: the columns that make the anomalous rows' surprise
            assert alarm.reason.split("(surprise: ")[1].split(" ")[0] in SHIFTED, alarm.reason
    assert figures["false_data_alarm_days"] == [], figures
    # the report a person opens shows the moved columns, training vs batch
    page = Path(alarms[0].detail["report"]).read_text()
    assert "<h2>Inputs</h2>" in page and "id='plot-inputs'" in page and "f0 (KS p" in page


def test_a_refused_batch_is_not_embedded_and_says_why(fortnight):
    """The same unit change with scale set to refuse: exit code 8, a data_refused decision naming the check,
    and the version's table without the batch."""
    from benchmarks.upstream import options
    from feast_embeddings.repo import EmbeddingsRepo

    work, repo = fortnight["work"], fortnight["repo"]
    path = work / "refused" / "date=day-40" / "part-0.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(day_table(40, 1000, "unit", shifted=True), path)
    settings = options(work, repo)
    settings["embed"] |= {"data_checks": {"scale": "refuse"}}
    outcome = step(PipelineConfig(**settings, data=str(path.parent)))
    assert outcome.exit_code == DATA_REFUSED_EXIT
    assert [d.kind for d in outcome.decisions] == ["data_refused"]
    assert "scale: f2: spread x1" in outcome.decisions[0].reason
    catalog = EmbeddingsRepo(str(repo)).catalog
    table = catalog.table("item", outcome.current)
    assert "day-40" not in {b.batch_id for b in catalog.batches(table)}


def test_vaectl_embed_refuses_with_exit_code_8_and_one_line(fortnight):
    """The plain job: a refused batch is one line naming the check and the column, exit 8, no batch."""
    import subprocess

    from helpers.cli import flags, vaectl_command

    from feast_embeddings.repo import EmbeddingsRepo

    work, repo = fortnight["work"], fortnight["repo"]
    path = work / "refused-cli" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(day_table(41, 1000, "null"), path)
    current = fortnight["result"].current[max(fortnight["result"].decisions)]
    options = flags(
        data=path.parent,
        feature_store_yaml=repo / "feature_store.yaml",
        model_root=work / "models",
        model_version=current,
        batch="day-41",
        in_process_rows=100_000,
        data_checks="{null_rate: refuse}",
    )
    done = subprocess.run(vaectl_command("embed", *options), capture_output=True, text=True, timeout=300)
    assert done.returncode == DATA_REFUSED_EXIT, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: batch day-41 refused by its data checks: null_rate: f4: missing 0% -> 100%"
    )
    catalog = EmbeddingsRepo(str(repo)).catalog
    assert "day-41" not in {b.batch_id for b in catalog.batches(catalog.table("item", current))}
