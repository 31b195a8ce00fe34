"""What every job shares: its typed config from YAML and flags, the error boundary, Ray start-up."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.dataset as pads
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from vae.errors import InputError
from vae.storage import filesystem, storage_errors

log = logging.getLogger("ray_jobs")


class JobConfig(BaseModel):
    """Base for the one config object of each job: unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


ConfigT = TypeVar("ConfigT", bound=JobConfig)


def parse_config(config_class: type[ConfigT], argv: list[str] | None, prog: str) -> ConfigT:
    """Defaults < YAML file (--config) < one flag per field (values parsed as YAML: 16, [256,128])."""
    parser = argparse.ArgumentParser(prog=prog, description=(config_class.__doc__ or "").strip())
    parser.add_argument("--config", metavar="YAML", help="YAML file with any of the options below")
    for name, field in config_class.model_fields.items():
        default = "required" if field.is_required() else f"default: {field.default!r}"
        switch = field.annotation is bool  # `--rollback` alone means true; `--rollback false` still works
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, metavar="VALUE",
            nargs="?" if switch else None, const="true" if switch else None, help=f"{field.description or ''} ({default})",
        )
    args = vars(parser.parse_args(argv))
    values: dict = {}
    if config_path := args.pop("config", None):
        values = read_yaml_mapping(config_path, "config", "option names to values")
    values.update({name: _parse_flag(raw) for name, raw in args.items()})
    try:
        return config_class(**values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise InputError(f"invalid {prog} config: {problems}") from None


def read_yaml_mapping(path: str, what: str, of: str) -> dict:
    """A YAML file that must hold a mapping; anything else is one clear error naming the file."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{what} {path}: {error}") from None
    if not isinstance(values, dict):
        raise InputError(f"{what} {path}: expected a mapping of {of}")
    return values


def _parse_flag(raw: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def find_input_error(error: BaseException) -> InputError | None:
    """The InputError behind an exception, looking through Ray's task and training wrappers."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, InputError):
            # Ray's RayTaskError(InputError) carries the original as .cause, without Ray's traceback text.
            original = getattr(current, "cause", None)
            return original if isinstance(original, InputError) else current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        pending += list(getattr(current, "worker_failures", {}).values())  # ray.train WorkerGroupError
    return None


def run_cli(job: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a job's main: bad input ends with one line on stderr and exit code 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job(argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        input_error = find_input_error(error)
        if input_error is None:
            raise
        print(f"error: {_first_line(input_error)}", file=sys.stderr)
        sys.exit(2)


def _first_line(error: InputError) -> str:
    return str(error).strip().splitlines()[0]


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Use Ray if this process already started it, join the cluster RAY_ADDRESS names (set for
    every submitted job; `auto` finds a `ray start` cluster on this machine), or else start a
    private local cluster and stop it afterwards. Never a stale cluster left on the machine."""
    import ray

    # Re-raise a failing map function's own exception (an InputError naming the row) rather
    # than Ray Data's UserCodeException, which keeps only its text.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    if ray.is_initialized():
        yield
        return
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def node_capacity(request: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many copies of a request (one worker's or actor's resources) the nodes hold at once:
    counted per node, since an actor can't straddle two half-free nodes."""
    needed = {name: amount for name, amount in request.items() if amount > 0}
    if not needed:
        raise ValueError("a request for no resources fits without limit")
    return sum(min(int(node.get(name, 0) / amount + 1e-9) for name, amount in needed.items()) for node in nodes)


def alive_node_resources() -> list[dict[str, float]]:
    """The total resources of each node of the cluster this process is connected to."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def describe(request: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in request.items() if amount > 0)


def parquet_schema(path: str) -> pa.Schema:
    """The Arrow schema of a Parquet file or directory, with a clear error if it can't be read."""
    fs, root = filesystem(path)
    try:
        with storage_errors(path):
            dataset = pads.dataset(root, format="parquet", filesystem=fs)
        if not dataset.files:
            raise InputError(f"{path}: no Parquet files found; check the path")
        return dataset.schema
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or directory") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: not readable as Parquet ({_short(error)})") from None


def _short(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:300]
