"""A generated fortnight of the daily pipeline on a mixed table, with planted upstream breakages and
then a real change of the world. Used by tests/integration/test_data_checks_month.py (which asserts
what happened); run alone it reports what each day decided and the false data alarm rate over null
days:

    python -m benchmarks.upstream [--rows 1000] [--null-days 30]   # writes benchmarks/results/upstream.json

Data: 6 numeric columns from 2 latent factors plus noise and a categorical region that follows the
first factor. Planted, each a known upstream failure:

    days 3-4   a unit change: f2 x1000
    day 5      f4 all null
    day 6      region 'north' vanishes (its rows say 'south')
    day 7      a duplicated join: every row twice (the embed keeps the latest of each key)
    day 9-     the real change: f0 and f1 move by 2 standard deviations, for good
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import save
from benchmarks.month import START, pipeline_options

NUMERIC = [f"f{i}" for i in range(6)]
REGIONS = ["north", "south", "east", "west"]
BREAKAGES = {3: "unit", 4: "unit", 5: "null", 6: "vanish", 7: "duplicate"}
BROKEN_COLUMN = {"unit": "f2", "null": "f4", "vanish": "region", "duplicate": None}
SHIFT_DAY = 9
SHIFTED = ["f0", "f1"]


def day_table(day: int, rows: int, breakage: str | None = None, shifted: bool = False) -> pa.Table:
    """Day `day`'s new items (item_id = day * 100000 + i), broken or shifted as planted."""
    mixing = np.random.default_rng(7).normal(size=(2, len(NUMERIC)))
    rng = np.random.default_rng(2000 + day)
    factors = rng.normal(size=(rows, 2))
    values = factors @ mixing + 0.3 * rng.normal(size=(rows, len(NUMERIC)))
    if shifted:
        values[:, :2] += 2.0 * values.std(axis=0)[:2]
    if breakage == "unit":
        values[:, 2] *= 1000.0
    # the region follows the first factor: north the highest 40%, then south, east, west
    rank = np.argsort(np.argsort(factors[:, 0] + 0.5 * rng.normal(size=rows))) / rows
    region = np.array(REGIONS)[np.searchsorted([0.6, 0.8, 0.9], 1 - rank)]
    if breakage == "vanish":
        region[region == "north"] = "south"
    columns = {"item_id": pa.array(day * 100_000 + np.arange(rows), pa.int64())}
    columns |= {name: pa.array(values[:, i]) for i, name in enumerate(NUMERIC)}
    if breakage == "null":
        columns["f4"] = pa.nulls(rows, pa.float64())
    columns["region"] = pa.array(region.astype(object), pa.string())
    table = pa.table(columns)
    return pa.concat_tables([table, table]) if breakage == "duplicate" else table


def options(work: Path, feature_repo: Path) -> dict:
    """The month's settings, on a mixed table; duplicate keys settled (the duplicate check sees them). A
    2-sd change of two of six columns moves the space more than the month's: the gate's CKA at 0.6."""
    values = pipeline_options(work, feature_repo) | {"min_linear_cka": 0.6}
    values["train"] |= {"feature_columns": [*NUMERIC, "region"], "likelihood": "mixed"}
    values["embed"] = {"on_duplicate_keys": "keep-latest"}
    return values


@dataclass
class Fortnight:
    decisions: dict[int, list] = field(default_factory=dict)  # day -> the batch's Decisions
    current: dict[int, str] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)

    def days_with(self, kind: str) -> list[int]:
        return [day for day, found in self.decisions.items() if kind in [d.kind for d in found]]

    def decision(self, day: int, kind: str):
        return next((d for d in self.decisions[day] if d.kind == kind), None)


def simulate(
    work: Path, feature_repo: Path, days: int = 11, rows: int = 1000, null_days: int = 0
) -> Fortnight:
    """The planted days, then `null_days` more unbroken days of the changed world, each one step. Day 1,
    which the first version trains on, has 3x the rows (its calibration: 600 validation rows)."""
    import ray_jobs.pipeline as pipeline
    from ray_jobs.config import PipelineConfig

    settings = options(work, feature_repo)
    result = Fortnight()
    for day in range(1, days + null_days + 1):
        table = day_table(day, rows * (3 if day == 1 else 1), BREAKAGES.get(day), shifted=day >= SHIFT_DAY)
        path = work / "daily" / f"date=day-{day:02d}" / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        started = time.perf_counter()
        config = PipelineConfig(**settings, data=str(path.parent), event_time=START + timedelta(days=day))
        step = pipeline.step(config)
        result.seconds[day] = time.perf_counter() - started
        result.decisions[day] = step.decisions
        result.current[day] = step.current
        logging.getLogger("benchmarks.upstream").info(
            "day %d: %s -> current %s (%.1fs)",
            day,
            [d.kind for d in step.decisions],
            step.current,
            result.seconds[day],
        )
    return result


DATA_KINDS = ("data_warning", "data_blocked", "data_refused")


def summary(result: Fortnight) -> dict:
    null_days = [day for day in result.decisions if day > 1 and day not in BREAKAGES]
    alarms = [day for day in null_days if any(d.kind in DATA_KINDS for d in result.decisions[day])]
    # retrains of a champion (day 1's first version is trained for want of one)
    retrains = [day for day in result.days_with("retrain_started") if day > 1]
    return {
        "breakages": {day: BREAKAGES[day] for day in sorted(BREAKAGES) if day in result.decisions},
        "caught": {
            day: [d.reason for d in result.decisions[day] if d.kind in DATA_KINDS]
            for day in sorted(BREAKAGES)
            if day in result.decisions
        },
        "drift_reasons": {
            day: result.decision(day, "drift_seen").reason for day in result.days_with("drift_seen")
        },
        "retrain_days": retrains,
        "retrain_windows": {
            day: result.decision(day, "retrain_started").detail["window"] for day in retrains
        },
        "null_days": len(null_days),
        "false_data_alarm_days": alarms,
        "false_data_alarm_rate": len(alarms) / len(null_days) if null_days else None,
        "median_step_seconds": float(np.median(list(result.seconds.values()))),
    }


def new_feature_repo(work: Path) -> Path:
    """The project's Feast repo (its definitions, not its data) under work/."""
    template = Path(__file__).resolve().parents[1] / "feature_repo"
    repo = work / "feature_repo"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        (repo / name).write_text((template / name).read_text())
    return repo


def main() -> None:
    import tempfile

    from benchmarks.common import parse_args
    from ray_jobs.cluster import ray_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--null-days", type=int, default=30, help="unbroken days after the planted ones")
    args = parse_args(parser, null_days=1, rows=300)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("feast").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        work = Path(tmp)
        result = simulate(work, new_feature_repo(work), rows=args.rows, null_days=args.null_days)
    save("upstream", {"rows": args.rows, **summary(result)})


if __name__ == "__main__":
    main()
