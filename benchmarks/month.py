"""A simulated month of the daily pipeline on generated data: 30 daily batches of new items, a planted
shift from day 12, a broken challenger on the first retrain, a planted regression after the first
switch. Used by tests/integration/test_pipeline.py (which asserts what happened) and run alone it
reports the detection delay, false retrains over the null days and the time per step:

    python -m benchmarks.month [--days 30] [--rows 1000]    # writes benchmarks/results/month.json

Data: 8 numeric columns from 2 latent factors plus noise. The shift moves three columns by 1.5
standard deviations; the regression (one day, just after a switch) multiplies one column by 2.5: a
change the data checks let through (within their limits, so not a broken upstream) and the new
version has never seen; its watch rolls it back.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = [f"f{i}" for i in range(8)]
SHIFT_DAY = 12
START = datetime(2026, 11, 1, tzinfo=UTC)


def day_table(day: int, rows: int, shifted: bool, regression: bool) -> pa.Table:
    """Day `day`'s new items: item_id = day * 100000 + i."""
    mixing = np.random.default_rng(7).normal(size=(2, len(FEATURES)))
    rng = np.random.default_rng(1000 + day)
    values = rng.normal(size=(rows, 2)) @ mixing + 0.3 * rng.normal(size=(rows, len(FEATURES)))
    if shifted:
        values[:, :3] += 1.5 * values.std(axis=0)[:3]
    if regression:
        values[:, 0] *= 2.5
    columns = {"item_id": pa.array(day * 100_000 + np.arange(rows), pa.int64())}
    columns |= {name: pa.array(values[:, i].astype(np.float32)) for i, name in enumerate(FEATURES)}
    return pa.table(columns)


def pipeline_options(work: Path, feature_repo: Path) -> dict:
    """The step's settings for the month: small batches, a short training recipe."""
    return {
        "entity": "item",
        "feature_repo": str(feature_repo),
        "model_root": str(work / "models"),
        "monitoring": str(work / "monitoring"),
        "initial_version": None,
        "drift_batches": 2,
        "drift_window": 3,
        "train_window": 5,
        "watch_batches": 3,
        "permutations": 100,
        # two true factors in four latent units: neighbours are noisier than on real embeddings
        "min_knn_overlap": 0.2,
        "exit_codes": False,
        "train": {
            "key_column": "item_id",
            "feature_columns": FEATURES,
            "likelihood": "gaussian",
            "latent_dim": 4,
            "hidden_dims": [32],
            "epochs": 15,
            "batch_size": 64,
            "kl_warmup_epochs": 2,
            "learning_rate": 3e-3,
            "validation_fraction": 0.2,
            "num_workers": 1,
            "iw_samples": 0,
            "early_stopping_patience": 0,
            "storage_path": str(work / "ray_results"),
        },
    }


@dataclass
class Month:
    """What the month's steps decided, day by day."""

    decisions: dict[int, list[str]] = field(default_factory=dict)  # day -> decision kinds
    current: dict[int, str] = field(default_factory=dict)  # day -> current after the step
    seconds: dict[int, float] = field(default_factory=dict)
    data: dict[int, Path] = field(default_factory=dict)
    crashed: dict[int, str] = field(default_factory=dict)
    regression_day: int | None = None

    def days_with(self, kind: str) -> list[int]:
        return [day for day, kinds in self.decisions.items() if kind in kinds]


def broken_once(train_challenger, model_root: str, which: int = 2):
    """Wrap the pipeline's challenger training: the `which`-th training (the first is the first version)
    yields a collapsed model (its encoder's last layer zeroed: every posterior mean the same)."""
    import torch

    from vae import load_model_version, save_model_version

    calls = {"count": 0}

    def train(step, champion, data):
        calls["count"] += 1
        version = train_challenger(step, champion, data)
        if calls["count"] != which:
            return version
        loaded = load_model_version(model_root, version)
        last = [m for m in loaded.model.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        return save_model_version(
            model_root,
            loaded.model,
            loaded.normalizer,
            loaded.features,
            loaded.metadata["training"],
            loaded.metadata["metrics"],
            {"source": "broken on purpose"},
            reference=None,
            anomaly=loaded.metadata.get("anomaly"),
        )

    return train


def crash_once(function, day: int, crashes: dict, after: bool = False):
    """`function`, raising once on its first call of `day` (a step killed there, before the call, or
    after it with after=True), as a planted crash."""

    def crashing(*args, **kwargs):
        if crashes.get("day") != day or crashes.get(function.__name__):
            return function(*args, **kwargs)
        crashes[function.__name__] = True
        result = function(*args, **kwargs) if after else None
        where = "after" if after else "in"
        raise RuntimeError(f"planted crash {where} {function.__name__} on day {day}: {result is not None}")

    return crashing


def simulate(
    work: Path,
    feature_repo: Path,
    days: int = 30,
    rows: int = 1000,
    pushgateway: str | None = None,
    crashes: dict[int, str] | None = None,
) -> Month:
    """Run the month's steps in this process; the regression is planted on the second day after the
    first switch. crashes: day -> a function of ray_jobs.pipeline that raises once that day (before it
    runs; "name:after" once it has run); the step is then run again, as a scheduler's retry would."""
    import ray_jobs.pipeline as pipeline
    from ray_jobs.config import PipelineConfig

    options = pipeline_options(work, feature_repo)
    names = {name.split(":")[0] for name in (crashes or {}).values()}
    originals = {name: getattr(pipeline, name) for name in {"train_challenger", *names}}
    pipeline.train_challenger = broken_once(originals["train_challenger"], options["model_root"])
    planted: dict = {}
    for day, planned in (crashes or {}).items():
        name, _, when = planned.partition(":")
        setattr(pipeline, name, crash_once(getattr(pipeline, name), day, planted, after=when == "after"))
    month = Month()
    regression_day = None
    try:
        for day in range(1, days + 1):
            first_switch = next(iter(month.days_with("switched")[1:2]), None)
            if first_switch and regression_day is None:
                regression_day = first_switch + 2
            table = day_table(day, rows, day >= SHIFT_DAY, day == regression_day)
            path = work / "daily" / f"date=day-{day:02d}" / "part-0.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            month.data[day] = path.parent
            started = time.perf_counter()
            config = PipelineConfig(
                **options,
                data=str(path.parent),
                event_time=START + timedelta(days=day),
                pushgateway=pushgateway,
            )
            planted["day"] = day
            try:
                result = pipeline.step(config)
            except RuntimeError as error:
                if "planted crash" not in str(error):
                    raise
                month.crashed[day] = str(error)
                result = pipeline.step(config)  # the scheduler's retry
            month.seconds[day] = time.perf_counter() - started
            month.decisions[day] = [d.kind for d in result.decisions]
            month.current[day] = result.current
            logging.getLogger("benchmarks.month").info(
                "day %d: %s -> current %s (%.1fs)",
                day,
                month.decisions[day],
                result.current,
                month.seconds[day],
            )
    finally:
        for name, function in originals.items():
            setattr(pipeline, name, function)
    month.regression_day = regression_day
    return month


def summary(month: Month) -> dict:
    retrains = month.days_with("retrain_started")
    null_retrains = [day for day in retrains if 1 < day < SHIFT_DAY]
    after_shift = [day for day in retrains if day >= SHIFT_DAY]
    step_seconds = [s for day, s in month.seconds.items() if month.decisions[day] and day > 1]
    quiet = [
        s
        for day, s in month.seconds.items()
        if not {"retrain_started", "rolled_back"} & set(month.decisions[day]) and day > 1
    ]
    return {
        "shift_day": SHIFT_DAY,
        "first_retrain_day": after_shift[0] if after_shift else None,
        "detection_delay_batches": (after_shift[0] - SHIFT_DAY) if after_shift else None,
        "false_retrains_null_days": len(null_retrains),
        "drift_seen_null_days": len([d for d in month.days_with("drift_seen") if 1 < d < SHIFT_DAY]),
        "refused_days": month.days_with("challenger_refused"),
        "switched_days": month.days_with("switched"),
        "rolled_back_days": month.days_with("rolled_back"),
        "regression_day": month.regression_day,
        "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
        "median_quiet_step_seconds": float(np.median(quiet)) if quiet else None,
        "retrain_step_seconds": {day: round(month.seconds[day], 1) for day in retrains},
    }


def step_vs_plain_jobs(work: Path, feature_repo: Path, rows: int, repeats: int = 3) -> dict:
    """A quiet day after the month: the pipeline step against the same work as the three plain jobs a
    person would run (embed with the current version, monitor the batch, publish it), alternating,
    each on a new batch of the same size."""
    import ray_jobs.pipeline as pipeline
    from feast_embeddings.publication import Publication
    from feast_embeddings.settings import StoreSettings
    from ray_jobs.config import EmbedConfig, MonitorConfig, PipelineConfig, PublishConfig
    from ray_jobs.embed import embed
    from ray_jobs.monitor import monitor
    from ray_jobs.publish import publish

    options = pipeline_options(work, feature_repo)
    yaml_path = str(feature_repo / "feature_store.yaml")
    current = Publication.read(StoreSettings.read(yaml_path).open_catalog(), "item").current
    timings: dict[str, list[float]] = {"step": [], "plain": []}
    for repeat in range(repeats):
        for kind, day in (("plain", 40 + 2 * repeat), ("step", 41 + 2 * repeat)):
            path = work / "extra" / f"date=day-{day}" / "part-0.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(day_table(day, rows, shifted=True, regression=False), path)
            when = START + timedelta(days=day)
            started = time.perf_counter()
            if kind == "step":
                pipeline.step(PipelineConfig(**options, data=str(path.parent), event_time=when))
            else:
                common = {"model_root": options["model_root"], "model_version": current}
                batch = f"day-{day}"
                embed(
                    EmbedConfig(
                        **common,
                        data=str(path.parent),
                        batch=batch,
                        event_time=when,
                        feature_store_yaml=yaml_path,
                        in_process_rows=10**6,
                    )
                )
                monitor(
                    MonitorConfig(
                        **common,
                        batch=batch,
                        feature_store_yaml=yaml_path,
                        output=options["monitoring"],
                        permutations=options["permutations"],
                    )
                )
                publish(PublishConfig(**common, feature_repo=str(feature_repo), switch_current=False, show=0))
            timings[kind].append(time.perf_counter() - started)
    step, plain = float(np.median(timings["step"])), float(np.median(timings["plain"]))
    return {
        "step_seconds": timings["step"],
        "plain_seconds": timings["plain"],
        "median_step": step,
        "median_plain": plain,
        "step_over_plain": step / plain,
    }


def main() -> None:
    import tempfile

    from benchmarks.common import parse_args, save
    from ray_jobs.cluster import ray_session

    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of step vs plain jobs")
    args = parse_args(parser, days=2, rows=200, repeats=1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("feast").setLevel(logging.WARNING)

    repo_template = Path(__file__).resolve().parents[1] / "feature_repo"
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        work = Path(tmp)
        feature_repo = work / "feature_repo"
        feature_repo.mkdir()
        for name in ("feature_store.yaml", "features.py"):
            (feature_repo / name).write_text((repo_template / name).read_text())
        month = simulate(work, feature_repo, args.days, args.rows)
        figures = summary(month)
        figures["quiet_day"] = step_vs_plain_jobs(work, feature_repo, args.rows, args.repeats)
    save("month", figures)


if __name__ == "__main__":
    main()
