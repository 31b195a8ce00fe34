"""A production year of the daily step: does a quiet day cost what its own batch costs, whatever the
history holds? 365 daily batches of new items (generated, as in benchmarks/month.py) through
`ray_jobs.pipeline.step` in this process, one after another, with a shift planted mid-year so that the
trigger fires once: a retrain, and a backfill of every batch the champion holds.

    python -m benchmarks.year [--days 365] [--rows 300]            # ~10 minutes on the 2-core machine
    python -m benchmarks.year --days 60 --rows 100000 [--online redis]   # the large run
    writes benchmarks/results/year.json

Per day: the step's wall time and the process's peak RSS during it (sampled every 20 ms). Reported:
the median quiet step of days 2-31 against the last 30 days (the growth ratio; 1.0 = flat), the same
for peak RSS, and the retrain day's backfill cost per backfilled row. The baseline is the year's own
first month: a cost that grows with history shows as a ratio above 1.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq

from benchmarks.month import START, day_table, pipeline_options

log = logging.getLogger("benchmarks.year")
RETENTION_SECONDS = 5.0  # the version tables' snapshot retention: about a week of the benchmark's days


class PeakRss:
    """The process's peak resident memory while the block runs (a sampling thread)."""

    def __enter__(self) -> PeakRss:
        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            if self.done.wait(0.02):
                return

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def run_year(work: Path, feature_repo: Path, days: int, rows: int, shift_day: int) -> list[dict]:
    """One step per day; returns per day: seconds, peak RSS (MiB), the decisions, the stage timings."""
    import ray_jobs.pipeline as pipeline
    from ray_jobs.config import PipelineConfig

    options = pipeline_options(work, feature_repo)
    options["html_reports"] = False
    # a day here takes about a second, so the tables' week of snapshot retention shrinks with it
    options["embed"] = {"snapshot_retention_hours": RETENTION_SECONDS / 3600}
    per_day = []
    for day in range(1, days + 1):
        path = work / "daily" / f"date=day-{day:03d}" / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(day_table(day, rows, shifted=day >= shift_day, regression=False), path)
        config = PipelineConfig(**options, data=str(path.parent), event_time=START + timedelta(days=day))
        started = time.perf_counter()
        with PeakRss() as memory:
            result = pipeline.step(config)
        seconds = time.perf_counter() - started
        kinds = [d.kind for d in result.decisions]
        per_day.append(
            {
                "day": day,
                "seconds": round(seconds, 3),
                "peak_rss_mib": round(memory.peak / 2**20, 1),
                "decisions": kinds,
                "timings": {k: round(v, 3) for k, v in result.timings.items()},
            }
        )
        if day % 10 == 0 or {"retrain_started", "backfilled"} & set(kinds):
            log.info("day %d: %.2f s, %.0f MiB, %s", day, seconds, memory.peak / 2**20, ", ".join(kinds))
    return per_day


def summary(per_day: list[dict], rows: int) -> dict:
    """Growth of a quiet day's cost: the last 30 days against days 2-31."""
    busy = {"retrain_started", "rolled_back", "backfilled"}
    quiet = [d for d in per_day if d["day"] > 1 and not busy & set(d["decisions"])]
    first, last = quiet[:30], quiet[-30:]

    def median(days: list[dict], key: str) -> float:
        return float(np.median([d[key] for d in days]))

    backfills = [d for d in per_day if "backfilled" in d["decisions"]]
    backfill = None
    if backfills:
        day = backfills[0]
        seconds = day["timings"].get("backfill", 0.0)
        backfilled_rows = rows * (day["day"] - 1)  # every batch the champion held before this one
        backfill = {
            "day": day["day"],
            "step_seconds": day["seconds"],
            "backfill_seconds": seconds,
            "backfilled_rows": backfilled_rows,
            "microseconds_per_backfilled_row": round(1e6 * seconds / max(backfilled_rows, 1), 1),
        }
    return {
        "days": len(per_day),
        "rows_per_day": rows,
        "quiet_days": len(quiet),
        "median_step_seconds_days_2_31": median(first, "seconds"),
        "median_step_seconds_last_30": median(last, "seconds"),
        "step_growth": round(median(last, "seconds") / median(first, "seconds"), 3),
        "median_peak_rss_mib_days_2_31": median(first, "peak_rss_mib"),
        "median_peak_rss_mib_last_30": median(last, "peak_rss_mib"),
        "rss_growth": round(median(last, "peak_rss_mib") / median(first, "peak_rss_mib"), 3),
        "retrains": [d["day"] for d in per_day if "retrain_started" in d["decisions"]],
        "backfill": backfill,
    }


def main() -> None:
    import contextlib
    import os
    import sys
    import tempfile

    from benchmarks.common import parse_args, save
    from ray_jobs.cluster import ray_session

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the servers the tests start
    from helpers.servers import redis_server, with_redis_online_store

    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--shift-day", type=int, default=None, help="default: mid-year")
    parser.add_argument("--work", type=Path, default=None, help="keep the tables here (default: a temp dir)")
    parser.add_argument(
        "--online", choices=("sqlite", "redis"), default="sqlite", help="redis: a redis-server started here"
    )
    args = parse_args(parser, days=8, rows=200, shift_day=4)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("feast", "ray_jobs", "vae", "feast_embeddings", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    shift_day = args.shift_day or args.days // 2
    repo_template = Path(__file__).resolve().parents[1] / "feature_repo"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        work = args.work or Path(tmp)
        feature_repo = work / "feature_repo"
        feature_repo.mkdir(parents=True)
        (feature_repo / "features.py").write_text((repo_template / "features.py").read_text())
        text = (repo_template / "feature_store.yaml").read_text()
        if args.online == "redis":  # the documented switch: the online_store block replaced
            port, password = servers.enter_context(redis_server())
            os.environ["REDIS_CONNECTION_STRING"] = f"127.0.0.1:{port},password={password}"
            text = with_redis_online_store(text)
        (feature_repo / "feature_store.yaml").write_text(text)
        servers.enter_context(ray_session())
        per_day = run_year(work, feature_repo, args.days, args.rows, shift_day)
    figures = summary(per_day, args.rows) | {"online_store": args.online, "per_day": per_day}
    print(
        f"quiet step: days 2-31 {figures['median_step_seconds_days_2_31']:.2f} s, last 30 "
        f"{figures['median_step_seconds_last_30']:.2f} s: growth {figures['step_growth']:.2f}x; "
        f"peak RSS growth {figures['rss_growth']:.2f}x; backfill {figures['backfill']}"
    )
    save("year", figures, show=False)


if __name__ == "__main__":
    main()
