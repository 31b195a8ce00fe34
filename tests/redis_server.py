"""A password-protected redis-server on 127.0.0.1 that the test starts and stops by its PID."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator

from s3_server import free_port, wait_for_port


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[int, str]]:
    """Yield (port, password) of a fresh redis-server with no persistence."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
    port, password = free_port(), secrets.token_hex(16)
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process, "redis-server")
        yield port, password
    finally:
        process.terminate()
        process.wait(timeout=10)
