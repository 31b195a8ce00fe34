"""`vaectl submit <job> [submit options] [job options]`: run a job on a Ray cluster as a Ray job.

What `ray job submit --working-dir . -- python -m ray_jobs.cli <job> ...` does, plus: the job's
options are checked here before anything is uploaded, Ray's token is sent wherever Ray keeps it,
the job's logs stream to this terminal, and the exit code is the job's own (2 for bad input).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from ray_jobs.config import parse_config, read_yaml_mapping
from vae.errors import InputError, first_line

log = logging.getLogger("ray_jobs.submit")

TOKEN_HELP = (
    "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, the one `ray get-auth-token` "
    "prints on its head (a `ray up cluster.yaml` cluster uses this machine's ~/.ray/auth_token)"
)
# the head's dashboard, locally or through `ray dashboard cluster.yaml`
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def main(argv: list[str] | None = None) -> None:
    options, job_args = _parser().parse_known_args(argv)
    runtime_env = job_runtime_env(options, job_args)
    entrypoint = shlex.join([options.python, "-m", "ray_jobs.cli", options.job, *job_args])
    client, job_id = submit(options, entrypoint, runtime_env)
    print(
        f"submitted {options.job} as {job_id} to {options.address}: {entrypoint}", file=sys.stderr, flush=True
    )
    if options.no_wait:
        return
    try:
        status, exit_code, message = follow(client, job_id)
    except KeyboardInterrupt:
        stop = f"`ray job stop {job_id}` stops it"
        print(f"\nstopped following {job_id}; it keeps running ({stop})", file=sys.stderr)
        sys.exit(130)
    failed = f": {message}" if status != "SUCCEEDED" and message else ""
    print(f"job {job_id} {status}{failed}", file=sys.stderr)
    sys.exit(exit_code)


def _parser() -> argparse.ArgumentParser:
    from ray_jobs.cli import JOBS

    parser = argparse.ArgumentParser(
        prog="vaectl submit",
        allow_abbrev=False,
        description="Submit a job to a Ray cluster, stream its logs and exit with its status. Options not "
        "listed here are the job's own (`vaectl <job> --help`).",
    )
    add = parser.add_argument
    add("job", choices=[name for name in JOBS if name != "submit"])
    address = os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    add(
        "--address",
        default=address,
        help=f"the cluster's job server (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    add(
        "--working-dir",
        help="directory shipped as the job's working directory (default: the runtime env's, else .)",
    )
    add("--python", default="python", help="interpreter on the cluster that has this project's dependencies")
    add("--runtime-env", metavar="YAML", help="more of the job's runtime_env (env_vars, pip, excludes, ...)")
    add(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this variable of your environment to the job (repeatable), e.g. REDIS_CONNECTION_STRING",
    )
    add("--submission-id", help="the job's id (default: Ray picks one)")
    add("--no-wait", action="store_true", help="return once the job is submitted")
    return parser


def job_runtime_env(options: argparse.Namespace, job_args: list[str]) -> dict:
    """The job's runtime_env, after checking its options here, where a typo costs a second, not an
    upload and a driver start. Paths inside them (--config) are relative to the working directory."""
    from ray_jobs.cli import JOBS

    runtime_env = {}
    if options.runtime_env:
        runtime_env = read_yaml_mapping(options.runtime_env, "--runtime-env", "runtime_env fields")
    working_dir = Path(options.working_dir or runtime_env.get("working_dir") or ".")
    if not working_dir.is_dir():
        raise InputError(f"working dir {working_dir}: not a directory")
    with contextlib.chdir(working_dir):
        parse_config(JOBS[options.job].config, job_args, prog=f"vaectl {options.job}")
    if missing := [name for name in options.env if name not in os.environ]:
        raise InputError(f"--env {missing[0]}: not set in this environment")
    passed = {name: os.environ[name] for name in options.env}
    return {
        **runtime_env,
        "working_dir": str(working_dir),
        "env_vars": {**runtime_env.get("env_vars", {}), **passed},
    }


def submit(options: argparse.Namespace, entrypoint: str, runtime_env: dict):
    """(the client, the job's id) once the job server took the job."""
    from ray.exceptions import AuthenticationError  # here: Ray is slow to import, the checks before are not

    try:
        client = connect(options.address)
        metadata = {"vaectl_job": options.job}
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=options.submission_id,
            metadata=metadata,
        )
    except AuthenticationError:  # Ray raises it for a 401/403 from any request (its version check is open)
        refused = f"the Ray cluster at {options.address} refused this client's token"
        raise InputError(f"{refused}: {TOKEN_HELP}") from None
    return client, job_id


def connect(address: str):
    """A JobSubmissionClient for the cluster, with a clear error for an unreachable server."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    # requests' ConnectionError, Ray's RuntimeError for a failed version check
    except (OSError, RuntimeError) as error:
        raise InputError(
            f"cannot reach a Ray job server at {address} ({first_line(str(error))}); for a `ray up` cluster "
            "open the tunnel first: `ray dashboard cluster.yaml`"
        ) from None


def auth_headers() -> dict[str, str]:
    """Ray's token from where Ray looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), as
    Ray's own CLI does when connecting: sent if one exists, unless RAY_AUTH_MODE=disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and (path := os.environ.get("RAY_AUTH_TOKEN_PATH")):
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as error:
            raise InputError(f"RAY_AUTH_TOKEN_PATH={path}: {error.strerror}") from None
        if not token:
            raise InputError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
    if not token:
        default = Path.home() / ".ray" / "auth_token"
        token = default.read_text().strip() if default.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def follow(client, job_id: str) -> tuple[str, int, str]:
    """Print the job's logs as they come; returns its final status, the exit code to use, its message."""

    import aiohttp

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    # a dropped log stream is not the job failing
    except (OSError, RuntimeError, aiohttp.ClientError) as error:
        log.warning("log stream ended early (%s); waiting for the job to finish", first_line(str(error)))
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        time.sleep(1)
    status = str(info.status)
    if status == "SUCCEEDED":
        return status, 0, ""
    # The driver's own exit code when it has one: 2 is bad input, as when the job runs locally.
    exit_code = info.driver_exit_code if getattr(info, "driver_exit_code", None) else 1
    return status, exit_code, first_line(info.message or "")
