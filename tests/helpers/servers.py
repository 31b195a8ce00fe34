"""Servers the tests start on 127.0.0.1 and stop by the PID they started: moto's S3, redis-server,
PostgreSQL, Prometheus and its Pushgateway, an MLflow tracking server."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this process: the OS may give a just-closed port
    again, and a Ray node started with two equal ports refuses to start (seen once in CI)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def wait_for_port(port: int, process: subprocess.Popen, name: str, seconds: float = 30) -> None:
    """Return once something accepts connections on 127.0.0.1:port; fail if `process` died or time ran out."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def moto_server(require_auth: bool = False) -> Iterator[str]:
    """Yield the endpoint URL of a fresh moto server; with require_auth every request must carry
    credentials moto's IAM knows, so any key is rejected as a real S3 would reject a wrong one."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0" if require_auth else "inf"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process, "moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


REDIS_ONLINE_STORE = "online_store:\n    type: redis\n    connection_string: ${REDIS_CONNECTION_STRING}\n"


def with_redis_online_store(feature_store_yaml: str, block: str = REDIS_ONLINE_STORE) -> str:
    """The project's feature_store.yaml switched to Redis the documented way: the online_store block
    replaced (the password comes from REDIS_CONNECTION_STRING)."""
    start = feature_store_yaml.index("online_store:\n    type: sqlite")
    end = feature_store_yaml.index("\n", feature_store_yaml.index("path: data/online_store.db", start)) + 1
    return feature_store_yaml[:start] + block + feature_store_yaml[end:]


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[int, str]]:
    """Yield (port, password) of a fresh password-protected redis-server with no persistence."""
    if shutil.which("redis-server") is None:
        raise RuntimeError(
            "redis-server is not installed; `make test` installs it (apt-get install redis-server)"
        )
    port, password = free_port(), secrets.token_hex(16)
    command = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--requirepass",
        password,
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process, "redis-server")
        yield port, password
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[int, str]]:
    """Yield (port, password) of a fresh PostgreSQL server (Debian's `postgresql` package) holding an
    empty database `vae_catalog` owned by user `vae`, password authentication only. As root, the
    server runs as the `postgres` user (PostgreSQL refuses root), in a directory of its own under /tmp
    (pytest's are private to root)."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        raise RuntimeError(
            "PostgreSQL is not installed; `make test` installs it (apt-get install postgresql)"
        )
    bin_dir = os.path.dirname(binaries[-1])
    directory = tempfile.mkdtemp(prefix="vae-postgres-")
    data, password, port = os.path.join(directory, "pgdata"), secrets.token_hex(16), free_port()
    os.makedirs(data)
    password_file = os.path.join(directory, "pgpass")
    with open(password_file, "w") as file:
        file.write(password)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(directory, "postgres")
        shutil.chown(data, "postgres")
        shutil.chown(password_file, "postgres")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(
        [
            *as_postgres,
            f"{bin_dir}/initdb",
            "-D",
            data,
            "-U",
            "vae",
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
        ],
        check=True,
        **quiet,
    )
    options = f"-p {port} -k {directory} -h 127.0.0.1 -c fsync=off"
    process = subprocess.Popen([*as_postgres, f"{bin_dir}/postgres", "-D", data, *options.split()], **quiet)
    try:
        wait_for_port(port, process, "postgres")
        env = {**os.environ, "PGPASSWORD": password}
        for _ in range(50):  # accepting connections before it accepts logins: retry briefly
            created = subprocess.run(
                [f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "vae", "vae_catalog"],
                env=env,
                capture_output=True,
            )
            if created.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"createdb failed: {created.stderr.decode()[-500:]}")
        yield port, password
    finally:
        process.terminate()
        process.wait(timeout=20)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def prometheus_servers(rules: str) -> Iterator[tuple[str, str]]:
    """Yield (pushgateway URL, Prometheus URL): Debian's prometheus-pushgateway and prometheus on
    127.0.0.1, Prometheus scraping the gateway every second (honor_labels, as deploy/prometheus/ does)
    and evaluating the given rules file."""
    for binary in ("prometheus", "prometheus-pushgateway"):
        if shutil.which(binary) is None:
            raise RuntimeError(
                f"{binary} is not installed; `make test` installs it (apt-get install prometheus "
                "prometheus-pushgateway)"
            )
    directory = tempfile.mkdtemp(prefix="vae-prometheus-")
    gateway_port, prometheus_port = free_port(), free_port()
    shutil.copy(rules, os.path.join(directory, "rules.yml"))
    with open(os.path.join(directory, "prometheus.yml"), "w") as file:
        file.write(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [rules.yml]\n"
            "scrape_configs:\n"
            "  - job_name: pushgateway\n"
            "    honor_labels: true\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{gateway_port}']}}]\n"
        )
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    gateway = subprocess.Popen(
        # Debian's default persistence file is shared by every gateway on the machine: one of its own
        [
            "prometheus-pushgateway",
            f"--web.listen-address=127.0.0.1:{gateway_port}",
            f"--persistence.file={directory}/pushgateway.data",
        ],
        **quiet,
    )
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={directory}/prometheus.yml",
            f"--storage.tsdb.path={directory}/data",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        cwd=directory,
        **quiet,
    )
    try:
        wait_for_port(gateway_port, gateway, "prometheus-pushgateway")
        wait_for_port(prometheus_port, prometheus, "prometheus")
        yield f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{prometheus_port}"
    finally:
        for process in (prometheus, gateway):
            process.terminate()
            process.wait(timeout=20)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(directory: str, users: tuple[str, str] | None = None) -> Iterator[str]:
    """Yield the URL of a real MLflow tracking server (full mlflow, from the virtual environment of its
    own that `make mlflow-server` makes) on 127.0.0.1, its store and artifacts under `directory`. With
    `users` (admin name, password): MLflow's basic-auth app, as deploy/mlflow/mlflow-server.yaml runs it
    (no access without a user)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    binary = os.environ.get("VAE_MLFLOW_SERVER", os.path.join(repo, ".mlflow-venv", "bin", "mlflow"))
    if not os.path.exists(binary):
        raise RuntimeError(f"{binary} is missing; `make mlflow-server` (run by `make test`) installs it")
    port = free_port()
    command = [
        binary,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{directory}/server.db",
        "--artifacts-destination",
        f"{directory}/artifacts",
    ]
    env = dict(os.environ)
    if users is not None:
        config = os.path.join(directory, "basic_auth.ini")
        with open(config, "w") as file:
            file.write(
                "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                f"database_uri = sqlite:///{directory}/auth.db\nadmin_username = {users[0]}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                # each request's password is checked with scrypt (0.14 s of CPU here) unless cached
                "auth_cache_ttl_seconds = 60\n"
            )
        command += ["--app-name", "basic-auth"]
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": config,
            "MLFLOW_AUTH_ADMIN_PASSWORD": users[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
    log = open(os.path.join(directory, "server.log"), "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_for_port(port, process, "mlflow server", seconds=90)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the port opens before the app answers
            with contextlib.suppress(OSError):
                import urllib.request

                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        # the server runs uvicorn workers in its process group: end the group we started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        process.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def feast_serve(repo, *options: str, env: dict | None = None) -> Iterator[str]:
    """Yield the URL of a real `feast serve` of a feature repo on 127.0.0.1 (its output in
    <repo>/serve.log), once /health answers."""
    port = free_port()
    feast = shutil.which("feast", path=os.path.dirname(sys.executable)) or "feast"
    log_path = os.path.join(repo, "serve.log")
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    command = [feast, "serve", "-h", "127.0.0.1", "-p", str(port), "--no-access-log", *options]
    server = subprocess.Popen(
        command, cwd=repo, env=env or os.environ.copy(), stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    with open(log_path) as output:
                        raise RuntimeError(f"feast serve did not start: {output.read()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
