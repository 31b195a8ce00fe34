"""A lease lock in a SQL database (the embeddings catalog's): held by one process at a time across
machines, lost by a holder that crashed when its lease runs out.

    table vae_locks (name, holder, expires)   one row per held lock; holder = host:pid:random
    take     update the row when its lease has expired, else insert it (a primary key refuses a second)
    renew    a thread extends the lease every ttl/3 while held (work longer than one lease); an UPDATE
             that matches no row means another process took the lock: the lease is lost
    check    the holder asks before each write: lost (taken over, or not renewed within its ttl, e.g. the
             database unreachable) raises LeaseLost, so a step never writes beside the next one
    release  delete the row, only if this holder still holds it
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("vae.embeddings.lock")


class LockHeld(RuntimeError):
    """Another process holds a lock past the wait."""

    def __init__(self, name: str, waited: float, holder: str, expires_in: float):
        super().__init__(
            f"lock '{name}' is held by {holder} (lease ends in {expires_in:.0f} s unless renewed); waited "
            f"{waited:.0f} s (table vae_locks)"
        )
        self.holder = holder


class LeaseLost(RuntimeError):
    """This process no longer holds a lock it took: it must stop before its next write."""


@dataclass
class Lease:
    """A held lock, as its holder sees it."""

    name: str
    holder: str
    ttl_seconds: float
    renewed_at: float  # time.monotonic() of the last successful take or renewal
    lost: str | None = None  # why the lease is gone, once it is

    def check(self) -> None:
        """Raise LeaseLost unless this process still holds the lock (call before each write)."""
        unrenewed = time.monotonic() - self.renewed_at
        if self.lost is None and unrenewed > self.ttl_seconds:
            self.lost = f"not renewed for {unrenewed:.0f} s, longer than its {self.ttl_seconds:g} s lease"
        if self.lost is not None:
            raise LeaseLost(
                f"lost the lock '{self.name}' ({self.lost}); stopped before the next write, another "
                "process may hold it now. Run the same command again to finish"
            )


@contextlib.contextmanager
def lease_lock(
    engine, name: str, ttl_seconds: float = 300, wait_seconds: float = 600, renew: bool = False
) -> Iterator[Lease]:
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
    lease = Lease(name, holder, ttl_seconds, time.monotonic())
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(engine, lease, stop), daemon=True)
    if renew:
        renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        if renew:
            renewer.join()
        with engine.begin() as connection:
            connection.execute(
                text("DELETE FROM vae_locks WHERE name = :name AND holder = :holder"),
                {"name": name, "holder": holder},
            )


def _renew(engine, lease: Lease, stop: threading.Event) -> None:
    """Extend the lease every ttl/3; a failed renewal is retried (the check fails once the lease has
    run out), a renewal that matches no row marks the lease lost."""
    from sqlalchemy import text

    while not stop.wait(lease.ttl_seconds / 3) and lease.lost is None:
        try:
            with engine.begin() as connection:
                matched = connection.execute(
                    text("UPDATE vae_locks SET expires = :expires WHERE name = :name AND holder = :holder"),
                    {"expires": time.time() + lease.ttl_seconds, "name": lease.name, "holder": lease.holder},
                ).rowcount
        except Exception as error:  # the database unreachable or busy: try again at the next tick
            log.warning("renewing the lock '%s' failed: %s: %s", lease.name, type(error).__name__, error)
            continue
        if matched:
            lease.renewed_at = time.monotonic()
        else:
            holder = "another process"
            with contextlib.suppress(Exception):
                holder = _lock_holder(engine, lease.name)[0]
            lease.lost = f"its lease ran out and it is held by {holder}"


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
