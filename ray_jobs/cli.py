"""`vaectl <job> [options]`: one console script for every job, so `ray job submit -- vaectl ...` works.

A job's options are parsed (and `--help` answered) from ray_jobs.config before its module, with
torch, Ray and Feast behind it, is imported. Bad input ends with one line `error: ...` on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ray_jobs import config
from vae.embeddings.lock import LeaseLost
from vae.errors import DATA_REFUSED_EXIT, DataRefused, InputError, StorageUnavailable, first_line
from vae.secrets import redact, redact_logs

E = TypeVar("E", bound=BaseException)
TRY_AGAIN_EXIT = 75  # EX_TEMPFAIL: not bad input; the same command, run again, carries on


@dataclass(frozen=True)
class Job:
    module: str
    config: type[config.JobConfig] | None  # None: the module parses its own arguments (submit)
    summary: str


JOBS = {
    "train": Job("ray_jobs.train", config.TrainConfig, "train a VAE with Ray Train and save a model version"),
    "embed": Job(
        "ray_jobs.embed", config.EmbedConfig, "encode a Parquet dataset with a model version (Ray Data)"
    ),
    "publish": Job(
        "ray_jobs.publish", config.PublishConfig, "register the Feast definitions and write embeddings online"
    ),
    "monitor": Job(
        "ray_jobs.monitor",
        config.MonitorConfig,
        "drift, version movement, anomaly rate and collapse of a batch's latents; HTML report",
    ),
    "embeddings": Job(
        "ray_jobs.embeddings",
        config.EmbeddingsCommand,
        "an entity set's tables: history <entity> [<version>], export, decisions <entity>, lineage, migrate",
    ),
    "demo": Job(
        "ray_jobs.demo", config.DemoConfig, "run train, embed and publish end to end on scikit-learn's digits"
    ),
    "pipeline": Job(
        "ray_jobs.pipeline",
        config.PipelineConfig,
        "the daily step: embed, monitor, publish a batch; retrain, gate, switch, roll back",
    ),
    "serve": Job(
        "ray_jobs.serve",
        config.ServeConfig,
        "the online encoding service (Ray Serve): POST /embed, follows current, writes through",
    ),
    "submit": Job(
        "ray_jobs.submit",
        None,
        "run one of the jobs above on a Ray cluster: logs stream here, exit code is the job's",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in JOBS:
        print(
            "usage: vaectl {" + ",".join(JOBS) + "} [--config YAML] [--option VALUE ...]\n", file=sys.stderr
        )
        for name, job in JOBS.items():
            print(f"  {name:<11} {job.summary}", file=sys.stderr)
        print("\n`vaectl <job> --help` lists a job's options.", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    run_cli(lambda args: run_job(argv[0], args), argv[1:])


def run_job(name: str, argv: list[str]) -> object:
    """Parse the job's options, then import its module (slow: torch, Ray, Feast) and run it."""
    job = JOBS[name]
    if job.config is None:
        return importlib.import_module(job.module).main(argv)
    if name == "embeddings":
        argv = embeddings_positionals(argv)
    parsed = config.parse_config(job.config, argv, prog=f"vaectl {name}")
    return importlib.import_module(job.module).run(parsed)


def embeddings_positionals(argv: list[str]) -> list[str]:
    """`embeddings history item v1 --as-of X` -> `--command history --entity item --model-version v1 ...`."""
    names, argv, positional = ["--command", "--entity", "--model-version"], list(argv), []
    while argv and not argv[0].startswith("-") and len(positional) < len(names):
        positional.append(argv.pop(0))
    return [part for pair in zip(names, positional, strict=False) for part in pair] + argv


def run_cli(job: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a job's main: bad input ends with one line on stderr and exit code 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs()
    # Feast logs "Registry cache expired, so refreshing" on nearly every call; its warnings still show.
    logging.getLogger("feast").setLevel(logging.WARNING)
    try:
        job(argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        input_error = find_input_error(error)
        if input_error is not None:
            print(f"error: {redact(first_line(input_error, limit=100_000))}", file=sys.stderr)
            sys.exit(DATA_REFUSED_EXIT if isinstance(input_error, DataRefused) else 2)
        # not bad input: the same command, run again, finishes the work
        if (later := find_cause(error, (LeaseLost, StorageUnavailable))) is not None:
            print(f"error: {redact(first_line(later, limit=100_000))}", file=sys.stderr)
            sys.exit(TRY_AGAIN_EXIT)
        from vae.storage import is_transient  # here: `vaectl --help` stays free of pyarrow and fsspec

        if (hiccup := find_cause(error, Exception, is_transient)) is not None:
            # storage unavailable where no retry wraps the call: every step is safe to run again
            print(
                f"error: storage unavailable: {redact(first_line(hiccup))}; nothing is lost: run the same "
                "command "
                "again",
                file=sys.stderr,
            )
            sys.exit(TRY_AGAIN_EXIT)
        raise


def find_input_error(error: BaseException) -> InputError | None:
    """The InputError behind an exception, looking through Ray's task and training wrappers."""
    return find_cause(error, InputError)


def find_cause(
    error: BaseException,
    kind: type[E] | tuple[type[E], ...],
    where: Callable[[BaseException], bool] = lambda _: True,
) -> E | None:
    """The exception of a kind (for which `where` holds) behind an exception, looking through Ray's task
    and training wrappers."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind) and where(current):
            # Ray's RayTaskError(InputError) carries the original as .cause, without Ray's traceback text.
            original = getattr(current, "cause", None)
            return original if isinstance(original, kind) else current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        pending += list(getattr(current, "worker_failures", {}).values())  # ray.train WorkerGroupError
    return None


if __name__ == "__main__":
    main()
