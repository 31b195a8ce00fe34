"""Where jobs run: joining or starting Ray, and the resource arithmetic of placing workers and actors.

Ray is imported inside the functions that need it, so configs and `vaectl --help` stay fast."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from vae.errors import InputError


def resource_request(
    cpus: float, gpus: float = 0.0, extra: dict[str, float] | None = None, accelerator_type: str | None = None
) -> dict[str, float]:
    """One worker's or actor's Ray resources. An accelerator type is asked for as Ray does (0.001 of
    the node's accelerator_type:<name>): it pins to such nodes, it doesn't count."""
    request = {"CPU": cpus, "GPU": gpus, **(extra or {})}
    if accelerator_type:
        request[f"accelerator_type:{accelerator_type}"] = 0.001
    return {name: amount for name, amount in request.items() if amount > 0}


def node_capacity(request: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many copies of a request the nodes hold at once: counted per node, since an actor can't
    straddle two half-free nodes."""
    needed = {name: amount for name, amount in request.items() if amount > 0}
    if not needed:
        raise ValueError("a request for no resources fits without limit")
    return sum(
        min(int(node.get(name, 0) / amount + 1e-9) for name, amount in needed.items()) for node in nodes
    )


def describe(request: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in request.items() if amount > 0)


def alive_node_resources() -> list[dict[str, float]]:
    """The total resources of each node of the cluster this process is connected to."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def capacity_or_fail(
    request: dict[str, float], what: str, fix: str, nodes: list[dict[str, float]] | None = None
) -> int:
    """How many `what` the cluster holds at once; one clear error when no node holds even one."""
    capacity = node_capacity(request, alive_node_resources() if nodes is None else nodes)
    if capacity < 1:
        raise InputError(f"no node of the cluster holds one {what} ({describe(request)}); {fix}")
    return capacity


class _QuietConsole(logging.Filter):
    """What of Ray Data's console output a job's user needs. Dropped: its reports of a failed task when
    the failure is bad input (the job ends with the InputError's one line; Ray Data logs the same error
    two or three times with its stack traces first), and, when the output is a log rather than a
    terminal, its notices (three lines per dataset, and that progress bars are off: the jobs log their
    own progress, units done or a line per epoch). Other failures are still logged in full."""

    def __init__(self, interactive: bool):
        super().__init__()
        self.interactive = interactive

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return self.interactive or not record.name.startswith("ray.data")
        if not self.interactive and record.getMessage().startswith("Progress bars disabled"):
            return False
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            from ray_jobs.cli import find_input_error

            if find_input_error(record.exc_info[1]) is not None:
                return False
            text += repr(record.exc_info[1])
        return "InputError" not in text and not record.name.startswith("ray.data.exceptions")


def quiet_ray_data_console() -> None:
    """Ray's and Ray Data's console handlers get the filter (Ray Data's session log file keeps everything)."""
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if not any(isinstance(f, _QuietConsole) for f in handler.filters):
                    handler.addFilter(_QuietConsole(interactive=sys.stdout.isatty()))


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Use Ray if this process already started it, join the cluster RAY_ADDRESS names (set for
    every submitted job; `auto` finds a `ray start` cluster on this machine), or else start a
    private local cluster and stop it afterwards. Never a stale cluster left on the machine."""
    import ray

    # Re-raise a failing map function's own exception (an InputError naming the row) rather
    # than Ray Data's UserCodeException, which keeps only its text.
    context = ray.data.DataContext.get_current()
    context.raise_original_map_exception = True
    quiet_ray_data_console()
    if not sys.stdout.isatty():
        # A log, not a terminal: progress bars would be tqdm redraws or a block of lines per dataset
        # every 10 s; the jobs log their own progress (units done, a line per epoch).
        context.enable_progress_bars = False
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # workers' lines without escape codes in log files
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _not_the_token_auth_default_notice not in token_setup.filters:
        token_setup.addFilter(_not_the_token_auth_default_notice)
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    global _private_cluster
    _private_cluster = address == "local"
    try:
        yield
    finally:
        _private_cluster = False
        ray.shutdown()


_private_cluster = False


def _not_the_token_auth_default_notice(record: logging.LogRecord) -> bool:
    """Ray warns on every new local cluster that it turned token authentication on, its secure
    default: nothing to act on in a job's log. Its warning that authentication is off still shows."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def is_private_cluster() -> bool:
    """Whether this process started the Ray cluster it uses (one machine, gone with the job)."""
    return _private_cluster
