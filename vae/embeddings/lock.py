"""A lease lock in a SQL database (the embeddings catalog's): held by one process at a time across
machines, lost by a holder that crashed when its lease runs out.

    table vae_locks (name, holder, expires)   one row per held lock; holder = host:pid:random
    take     update the row when its lease has expired, else insert it (a primary key refuses a second)
    renew    a thread extends the lease every ttl/3 while held (work longer than one lease)
    release  delete the row, only if this holder still holds it
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator


class LockHeld(RuntimeError):
    """Another process holds a lock past the wait."""

    def __init__(self, name: str, waited: float, holder: str, expires_in: float):
        super().__init__(
            f"lock '{name}' is held by {holder} (lease ends in {expires_in:.0f} s unless renewed); waited "
            f"{waited:.0f} s (table vae_locks)"
        )
        self.holder = holder


@contextlib.contextmanager
def lease_lock(
    engine, name: str, ttl_seconds: float = 300, wait_seconds: float = 600, renew: bool = False
) -> Iterator[None]:
    """Hold lock `name` in the database of a SQLAlchemy engine; LockHeld after `wait_seconds`."""
    from sqlalchemy import text

    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE IF NOT EXISTS vae_locks "
                "(name VARCHAR(255) PRIMARY KEY, holder VARCHAR(255), expires DOUBLE PRECISION)"
            )
        )
    deadline = time.monotonic() + wait_seconds
    while not _try_lock(engine, name, holder, ttl_seconds):
        if time.monotonic() > deadline:
            raise LockHeld(name, wait_seconds, *_lock_holder(engine, name))
        time.sleep(0.1)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(engine, name, holder, ttl_seconds, stop), daemon=True)
    if renew:
        renewer.start()
    try:
        yield
    finally:
        stop.set()
        if renew:
            renewer.join()
        with engine.begin() as connection:
            connection.execute(
                text("DELETE FROM vae_locks WHERE name = :name AND holder = :holder"),
                {"name": name, "holder": holder},
            )


def _renew(engine, name: str, holder: str, ttl_seconds: float, stop: threading.Event) -> None:
    from sqlalchemy import text

    while not stop.wait(ttl_seconds / 3):
        with contextlib.suppress(Exception), engine.begin() as connection:
            connection.execute(
                text("UPDATE vae_locks SET expires = :expires WHERE name = :name AND holder = :holder"),
                {"expires": time.time() + ttl_seconds, "name": name, "holder": holder},
            )


def _lock_holder(engine, name: str) -> tuple[str, float]:
    from sqlalchemy import text

    with engine.begin() as connection:
        row = connection.execute(
            text("SELECT holder, expires FROM vae_locks WHERE name = :name"), {"name": name}
        ).first()
    return (row[0], row[1] - time.time()) if row else ("nobody", 0.0)


def _try_lock(engine, name: str, holder: str, ttl_seconds: float) -> bool:
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError, OperationalError

    now = time.time()
    try:
        with engine.begin() as connection:
            taken = connection.execute(
                text(
                    "UPDATE vae_locks SET holder = :holder, expires = :expires "
                    "WHERE name = :name AND expires < :now"
                ),
                {"holder": holder, "expires": now + ttl_seconds, "name": name, "now": now},
            ).rowcount
            if taken:
                return True
            connection.execute(
                text("INSERT INTO vae_locks (name, holder, expires) VALUES (:name, :holder, :expires)"),
                {"name": name, "holder": holder, "expires": now + ttl_seconds},
            )
            return True
    except (IntegrityError, OperationalError):  # held by another process; SQLite: busy
        return False
