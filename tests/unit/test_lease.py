"""A step that lost the entity set's lock stops before its next write, and says so: taken over while it
was frozen (a real process stopped with SIGSTOP past its lease), or unable to renew (the database
busy past the lease)."""

import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from vae.embeddings.catalog import EmbeddingsCatalog
from vae.embeddings.lock import LeaseLost

HOLD_AND_WRITE = """
import sys, time
from vae.embeddings.catalog import EmbeddingsCatalog
from vae.embeddings.lock import LeaseLost
catalog = EmbeddingsCatalog(sys.argv[1], sys.argv[2])
with catalog.lock("pipeline-item", ttl_seconds=1.0, wait_seconds=0, renew=True) as lease:
    print("held", flush=True)
    writes = 0
    try:
        while True:  # a step: check the lease, then write
            lease.check()
            writes += 1
            time.sleep(0.05)
    except LeaseLost as error:
        print(f"stopped after {writes} writes: {error}", flush=True)
        sys.exit(75)
"""


@pytest.fixture
def catalog(tmp_path) -> EmbeddingsCatalog:
    return EmbeddingsCatalog(f"sqlite:///{tmp_path / 'catalog.db'}", str(tmp_path / "warehouse"))


def test_a_step_frozen_past_its_lease_finds_it_taken_and_stops_before_writing(catalog):
    step = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_WRITE, catalog.uri, catalog.warehouse],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert step.stdout.readline().strip() == "held"
        step.send_signal(signal.SIGSTOP)  # a frozen VM, a long GC pause: the lease (1 s) runs out
        with catalog.lock("pipeline-item", ttl_seconds=30, wait_seconds=10) as next_step:
            step.send_signal(signal.SIGCONT)
            output, _ = step.communicate(timeout=30)
            assert step.returncode == 75
            assert "lost the lock 'pipeline-item'" in output and "stopped before the next write" in output
            # its own clock saw the lease run out, or its renewal found the lock taken: either way
            assert "not renewed for" in output or next_step.holder in output
            next_step.check()
            assert (
                _holder(catalog) == next_step.holder
            )  # the stopped step did not release the new holder's lock
    finally:
        if step.poll() is None:
            step.send_signal(signal.SIGCONT)
            step.kill()


def test_a_lease_that_cannot_be_renewed_is_lost_once_it_runs_out(catalog, tmp_path):
    with catalog.lock("pipeline-item", ttl_seconds=1.0, wait_seconds=0, renew=True) as lease:
        lease.check()
        blocker = sqlite3.connect(tmp_path / "catalog.db", timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")  # the database refuses every write: no renewal lands
        try:
            time.sleep(1.6)
            with pytest.raises(LeaseLost, match=r"not renewed for \d+ s, longer than its 1 s lease"):
                lease.check()
        finally:
            blocker.rollback()
            blocker.close()


def test_a_renewed_lease_is_kept_past_its_ttl(catalog):
    with catalog.lock("pipeline-item", ttl_seconds=0.6, wait_seconds=0, renew=True) as lease:
        time.sleep(1.5)
        lease.check()


def _holder(catalog) -> str:
    from vae.embeddings.lock import _lock_holder

    return _lock_holder(catalog.catalog.engine, "pipeline-item")[0]


def test_a_renewal_that_finds_another_holder_loses_the_lease_naming_it(catalog, tmp_path):
    # another machine's clock ran ahead: it saw the lease expired and took the lock
    with catalog.lock("pipeline-item", ttl_seconds=3.0, wait_seconds=0, renew=True) as lease:
        with sqlite3.connect(tmp_path / "catalog.db") as other:
            other.execute("UPDATE vae_locks SET holder = 'other-host:42:abcd' WHERE name = 'pipeline-item'")
        time.sleep(1.6)  # one renewal (every ttl/3)
        with pytest.raises(LeaseLost, match=r"its lease ran out and it is held by other-host:42:abcd"):
            lease.check()
    assert _holder(catalog) == "other-host:42:abcd"  # leaving did not delete the other holder's row
