"""A real multi-process Ray cluster on 127.0.0.1: `ray start --head` plus nodes joined with
`ray start --address`, token authentication on, every port chosen free. Stopped through the PIDs
of the `ray start --block` processes this helper started (and what they started), never by name."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from helpers.servers import free_port


@dataclass
class LocalCluster:
    address: str  # the job server, e.g. http://127.0.0.1:8265
    gcs_address: str
    token: str
    env: dict[str, str]  # what a client process needs: token auth on, this cluster's token
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def nodes(self) -> list[dict]:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.address, headers=self.headers)
        return [
            n.__dict__
            for n in client.list(StateResource.NODES, options=ListApiOptions(), raise_on_missing_output=False)
        ]

    def actors(self, class_name_contains: str) -> list[dict]:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.address, headers=self.headers)
        actors = client.list(
            StateResource.ACTORS,
            options=ListApiOptions(limit=10_000, detail=True),
            raise_on_missing_output=False,
        )
        return [a.__dict__ for a in actors if class_name_contains in (a.class_name or "")]


def _node_ports() -> list[str]:
    # Two nodes share this machine: every per-node port that has a fixed default gets a free one.
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


@contextlib.contextmanager
def local_cluster(
    work: Path, head_cpus: int, nodes: list[dict], timeout: float = 150, environment: dict | None = None
) -> Iterator[LocalCluster]:
    """nodes: one dict per joined node, e.g. {"num_cpus": 2, "num_gpus": 1, "resources": {...}};
    environment: the nodes' environment (their workers inherit it), this process's by default."""
    ray = str(Path(sys.executable).parent / "ray")
    token = secrets.token_hex(32)
    token_path = work / "auth_token"
    token_path.write_text(token)
    env = {k: v for k, v in (environment or os.environ).items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        # No drain on SIGTERM: nothing to hand over when a test cluster stops.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # Ray gives a raylet 30 s to register; a fresh venv's first dashboard start (compiling its
        # modules) on a busy 2-core machine took longer once.
        "RAY_raylet_start_wait_time_s": "120",
    }
    gcs_port, dashboard_port = free_port(), free_port()
    cluster = LocalCluster(
        address=f"http://127.0.0.1:{dashboard_port}",
        gcs_address=f"127.0.0.1:{gcs_port}",
        token=token,
        env=env,
    )
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        cluster.processes.append(
            _start(
                [
                    ray,
                    "start",
                    "--head",
                    f"--port={gcs_port}",
                    f"--dashboard-port={dashboard_port}",
                    "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={free_port()}",
                    f"--num-cpus={head_cpus}",
                    "--num-gpus=0",
                    *_node_ports(),
                    *common,
                ],
                env,
                work / "head.log",
            )
        )
        _wait(
            lambda: len(cluster.nodes()) == 1, timeout, "the head node", work / "head.log", cluster.processes
        )

        def join(index: int, node: dict) -> subprocess.Popen:
            return _start(
                [
                    ray,
                    "start",
                    f"--address={cluster.gcs_address}",
                    f"--num-cpus={node['num_cpus']}",
                    f"--num-gpus={node.get('num_gpus', 0)}",
                    f"--resources={json.dumps(node.get('resources', {}))}",
                    *_node_ports(),
                    *common,
                ],
                env,
                work / f"node{index}.log",
            )

        cluster.processes.extend(join(index, node) for index, node in enumerate(nodes))
        for retries_left in reversed(range(3)):
            try:
                _wait(
                    lambda: sum(n["state"] == "ALIVE" for n in cluster.nodes()) == 1 + len(nodes),
                    timeout,
                    "the nodes",
                    work / "node0.log",
                    cluster.processes,
                )
                break
            except RuntimeError:
                # A joining `ray start` gives up when the GCS answers slowly (Ray waits 30 s for its
                # raylet to register, a fixed limit): on a busy 2-core machine that happened once. Start
                # the nodes that gave up again; a head that exited, or no retries left, is a failure.
                exited = [i for i, p in enumerate(cluster.processes) if i > 0 and p.poll() is not None]
                if not exited or not retries_left or cluster.processes[0].poll() is not None:
                    raise
                for i in exited:
                    stop([cluster.processes[i]])
                    cluster.processes[i] = join(i - 1, nodes[i - 1])
        yield cluster
    finally:
        stop(cluster.processes)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Its own process group: everything this node starts (GCS, raylet, workers, job drivers) is in it.
    with open(log, "ab") as output:  # a restarted node's log follows its first try
        return subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait(condition, timeout: float, what: str, log: Path, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    # a `ray start` that exited won't come up
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        with contextlib.suppress(Exception):  # not up yet: connection refused, 503, ...
            if condition():
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up; log:\n{log.read_text()[-3000:]}")


def stop(processes: list[subprocess.Popen], grace: float = 20) -> None:
    """SIGTERM to each `ray start --block` process, worker nodes first: each stops the processes it
    started. Then SIGKILL whatever of their process groups and descendants is left."""
    import psutil

    members = set()
    for process in processes:
        # `_start` made each process its group's leader: the group outlives a leader that exited
        group = process.pid
        members.update(p for p in psutil.process_iter() if _group(p) == group)
        with contextlib.suppress(psutil.NoSuchProcess):
            # and descendants in other groups (a job's driver gets its own session)
            members.update(psutil.Process(process.pid).children(recursive=True))
    for process in reversed(processes):
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    deadline = time.monotonic() + 5
    while (alive := [p for p in members if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    for process in processes:
        process.wait(timeout=10)


def _running(process) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for an init that may never reap it)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group(process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None
