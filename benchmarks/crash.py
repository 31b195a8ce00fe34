"""Crash safety, proven by killing: daily pipeline steps run as their own processes (`vaectl pipeline`,
as a scheduler runs them) and SIGKILLed, some at named points between two writes (vae/killpoints.py:
inside embed, publish, switch, rollback, retire, backfill and the decision log append), some at a
random moment; each killed step is run again as the docs say (the same command; a killed step's lease
runs out in `lock_seconds`), until one run completes. After every completed step the invariants are
checked:

    every batch of every version table is whole (its rows = what its commit recorded)
    no orphan and no missing data files (every file a snapshot references exists; every data file
        is referenced by a snapshot)
    online equals each key's latest row of the current version (every key, bit for bit)
    MLflow's vae-item@champion is the current version (with --mlflow: a SQLite tracking store)
    exactly one decision of each kind per batch and version
    the step's lock is free once the step is done

    python -m benchmarks.crash [--days 10] [--kills-per-day 3] [--seed 0]   # writes results/crash.json

A shift planted on day 4 makes the trigger fire (retrain, backfill, gate, switch); a unit change two
days after the switch makes the watch roll back. The short seeded sweep in the tests
(tests/integration/test_crash_safety.py) runs the same code on fewer days.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

from benchmarks.month import START, day_table, pipeline_options

log = logging.getLogger("benchmarks.crash")
REPO = Path(__file__).resolve().parents[1]
# Every named point a step can pass (vae/killpoints.py callers).
POINTS = (
    "embed.settled",
    "embed.committed",
    "decisions.appended",
    "publish.recorded",
    "publish.recorded_written",
    "publish.written",
    "publish.retiring",
    "pipeline.rolled_back",
    "pipeline.backfilled",
)


@dataclass
class Sweep:
    kills: list[dict] = field(default_factory=list)  # {"day", "point" or "after_seconds", "returncode"}
    steps: int = 0  # completed steps
    runs: int = 0  # process runs, killed ones included
    violations: list[str] = field(default_factory=list)
    decisions: dict[int, list[str]] = field(default_factory=dict)

    def points(self) -> list[str]:
        return sorted({k["point"].partition(":")[0] for k in self.kills if "point" in k})


def prepare(work: Path) -> tuple[Path, Path]:
    """The feature repo and the step's config file (short leases, so a killed step's lease runs out
    in seconds)."""
    feature_repo = work / "feature_repo"
    feature_repo.mkdir(parents=True)
    for name in ("feature_store.yaml", "features.py"):
        (feature_repo / name).write_text((REPO / "feature_repo" / name).read_text())
    options = pipeline_options(work, feature_repo)
    options.update(lock_seconds=3, lock_wait_seconds=120, html_reports=False, exit_codes=False)
    options["train"]["epochs"] = 8
    config = work / "pipeline.yaml"
    config.write_text(yaml.safe_dump(options))
    return feature_repo, config


def run_step(config: Path, data: Path, day: int, env: dict, kill_after: float | None = None) -> int:
    """One `vaectl pipeline` process for a day's batch; SIGKILLed after kill_after seconds if given."""
    command = [sys.executable, "-m", "ray_jobs.cli", "pipeline", "--config", str(config), "--data", str(data)]
    command += ["--event-time", (START + timedelta(days=day)).isoformat()]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.communicate()
        return -signal.SIGKILL
    if process.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"day {day}: the step failed ({process.returncode}):\n{stderr[-3000:]}")
    return process.returncode


def sweep(
    work: Path,
    days: int,
    kills_per_day: int,
    seed: int,
    points: tuple[str, ...] = POINTS,
    random_kills: bool = True,
    tracking_uri: str | None = None,
    nth_point_kills: bool = True,
) -> Sweep:
    """The days' steps, each killed up to kills_per_day times (at one of `points`, or at a random moment)
    and run again until it completes; the invariants checked after every completed step."""
    feature_repo, config = prepare(work)
    rng = random.Random(seed)
    result = Sweep()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # each step starts its own local Ray when it needs one
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    switched_on = None
    for day in range(1, days + 1):
        regression = switched_on is not None and day == switched_on + 2
        path = work / "daily" / f"date=day-{day:02d}" / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(day_table(day, 400, shifted=day >= 4, regression=regression), path)
        for _ in range(kills_per_day):
            kill = _plan_kill(rng, points, random_kills, nth_point_kills, work / "kill-trace.txt")
            code = run_step(config, path.parent, day, {**env, **kill.pop("env")}, kill.get("after_seconds"))
            result.runs += 1
            if code == 0:
                break  # the kill point was not on this day's path: the step completed
            if "nth_point" in kill:  # the point it died at: the trace's last line
                kill["point"] = (work / "kill-trace.txt").read_text().split()[-1]
            result.kills.append({"day": day, **kill, "returncode": code})
            log.info("day %d: killed %s", day, kill)
        else:
            code = run_step(config, path.parent, day, env)
            result.runs += 1
        result.steps += 1
        problems, kinds = check_invariants(work, feature_repo, day, tracking_uri)
        result.violations += problems
        result.decisions[day] = kinds
        if "switched" in kinds and day > 1 and switched_on is None:
            switched_on = day
        log.info(
            "day %d done: %s; invariants %s", day, ", ".join(kinds), "held" if not problems else problems
        )
    return result


def _plan_kill(
    rng: random.Random, points: tuple[str, ...], random_kills: bool, nth_point_kills: bool, trace: Path
) -> dict:
    """A random moment (a quarter of the kills), a named point, or the n-th point the step reaches
    whichever it is (so that the busy days' switch, rollback and backfill points are hit as often as
    they are passed); the trace says which point that was."""
    draw = rng.random()
    if random_kills and draw < 0.25:
        return {"after_seconds": round(rng.uniform(2.0, 25.0), 1), "env": {}}
    if draw < 0.6 or not nth_point_kills:
        point, nth = rng.choice(points), rng.choice((1, 1, 2))
        return {"point": f"{point}:{nth}", "env": {"VAE_KILL_AT": f"{point}:{nth}"}}
    trace.unlink(missing_ok=True)
    nth = rng.randint(1, 12)
    return {"nth_point": nth, "env": {"VAE_KILL_AT": f"any:{nth}", "VAE_KILL_LOG": str(trace)}}


def check_invariants(
    work: Path, feature_repo: Path, day: int, tracking_uri: str | None = None
) -> tuple[list[str], list[str]]:
    """The invariants after a completed step; returns (violations, the day's decision kinds)."""
    from feast_embeddings.repo import EmbeddingsRepo
    from vae.pipeline.decisions import DecisionLog, of_batch

    repo = EmbeddingsRepo(feature_repo)
    catalog = repo.catalog
    problems = []
    for version in catalog.versions("item"):
        problems += _whole_batches_and_files(catalog, catalog.table("item", version))
    problems += _online_is_latest(repo)
    decisions = DecisionLog(catalog, "item").read()
    counts = Counter((d.batch_id, d.kind, d.model_version) for d in decisions)
    problems += [f"decision {key} logged {n} times" for key, n in counts.items() if n > 1]
    problems += _lock_free(catalog)
    if tracking_uri:
        problems += _champion_is_current(repo, tracking_uri)
    kinds = [d.kind for d in of_batch(decisions, f"day-{day:02d}")]
    return [f"day {day}: {p}" for p in problems], kinds


def _whole_batches_and_files(catalog, table) -> list[str]:
    from vae.embeddings.catalog import Properties, rows_per_batch

    problems = []
    rows = rows_per_batch(table)
    for batch in catalog.batches(table):
        recorded = int(batch.properties.get(Properties.EMBEDDED_ROWS, -1))
        if rows.get(batch.batch_id) != recorded:
            problems.append(
                f"{table.name()[-1]} batch {batch.batch_id}: {rows.get(batch.batch_id)} rows, "
                f"{recorded} committed"
            )
    referenced = set()
    for snapshot in table.snapshots():
        referenced |= {
            t.file.file_path.removeprefix("file://")
            for t in table.scan(snapshot_id=snapshot.snapshot_id).plan_files()
        }
    current = set(catalog.data_files(table))
    problems += [f"missing data file {path}" for path in current if not Path(path).exists()]
    location = Path(table.location().removeprefix("file://")) / "data"
    on_disk = {str(path) for path in location.rglob("*.parquet")}
    # files of a replaced batch that only expired snapshots referenced: listed until a commit deletes them
    for key, value in table.properties.items():
        if key.startswith(Properties.UNREFERENCED):
            referenced |= {path.removeprefix("file://") for path in json.loads(value)}
    problems += [f"orphan data file {path}" for path in on_disk - referenced]
    return problems


def _online_is_latest(repo) -> list[str]:
    from feast_embeddings.delta import latest_per_key
    from feast_embeddings.verify import fetch_online
    from vae.embeddings.contract import COLUMNS

    current = repo.publication("item").current
    if current is None:
        return []
    table = repo.catalog.table("item", current)
    order = [b.batch_id for b in repo.catalog.batches(table)]
    latest = latest_per_key(repo.catalog.read(table, ["item_id", *COLUMNS]), "item_id", order)
    fetched = fetch_online(
        repo.store, repo.version_view_name("item", current), latest.column("item_id").to_pylist(), "item_id"
    )
    expected = latest.column("latent").to_pylist()
    wrong = [
        row["item_id"]
        for row, want in zip(fetched, expected, strict=True)
        if row["latent"] is None or not np.array_equal(np.float32(row["latent"]), np.float32(want))
    ]
    return (
        [
            f"online: {len(wrong)} of {latest.num_rows} keys not at their latest row of {current} "
            f"(e.g. {wrong[:3]})"
        ]
        if wrong
        else []
    )


def _champion_is_current(repo, tracking_uri: str) -> list[str]:
    from vae.versions.mlflow_registry import CHAMPION, Registry, registered_model_name

    current = repo.publication("item").current
    champion = Registry(tracking_uri).alias(registered_model_name("item"), CHAMPION)
    return [] if champion == current else [f"MLflow @champion is {champion}, current is {current}"]


def _lock_free(catalog) -> list[str]:
    from sqlalchemy import text

    with catalog.catalog.engine.begin() as connection:
        rows = connection.execute(
            text("SELECT name, holder, expires FROM vae_locks WHERE name = 'pipeline-item'")
        ).fetchall()
    return [f"the step's lock is still held by {row[1]}" for row in rows if row[2] > time.time()]


def main() -> None:
    import tempfile

    from benchmarks.common import parse_args, save

    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--kills-per-day", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-mlflow", action="store_true", help="no MLflow tracking store (no @champion check)"
    )
    args = parse_args(parser, days=2, kills_per_day=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tracking_uri = None if args.no_mlflow else f"sqlite:///{tmp}/mlflow.db"
        result = sweep(Path(tmp), args.days, args.kills_per_day, args.seed, tracking_uri=tracking_uri)
    figures = {
        "days": args.days,
        "seed": args.seed,
        "runs": result.runs,
        "kills": len(result.kills),
        "named_points_killed": result.points(),
        "random_moment_kills": sum("after_seconds" in k for k in result.kills),
        "invariant_checks": result.steps,
        "violations": result.violations,
        "decisions": result.decisions,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "decisions"}, indent=2))
    save("crash", figures, show=False)
    if result.violations:
        sys.exit(1)


if __name__ == "__main__":
    main()
