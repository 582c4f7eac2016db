"""Leases that live exactly as long as their holder: short expiry, renewed while held, freed
when the holder's process is gone, and a holder that lost its lease knows it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import LockedError
from pipeline.state.leases import LEASE_TTL, LeaseLost
from pipeline.state.store import State, default_owner


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _dead_owner() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return default_owner().rsplit(":", 1)[0] + f":{proc.pid}"


def test_leases_are_short_by_default() -> None:
    """A lease expires within a minute of its holder's last renewal, not ten."""
    assert LEASE_TTL <= 60


def test_heartbeat_keeps_a_short_lease_from_a_second_holder(tmp_path: Path) -> None:
    """While the first holder's heartbeat runs, a second holder cannot take the service, even
    long after the lease's ttl; once the first lets go, the second gets it."""
    state = State.in_dir(tmp_path)
    with state.leases.lease("service:web", "host:1", ttl=0.3) as held:
        time.sleep(1.0)  # three ttls: without renewals the lease would have expired
        assert not state.leases.acquire("service:web", "host:2", ttl=0.3)
        with (
            pytest.raises(LockedError, match="host:1"),
            state.leases.lease("service:web", "host:2"),
        ):
            pass
        assert not held.lost
    assert state.leases.acquire("service:web", "host:2", ttl=0.3)


def test_holder_whose_process_is_dead_is_replaced_at_once(tmp_path: Path) -> None:
    """A lease held by a process that is gone goes to the next holder at once, long before its
    expiry."""
    clock = Clock()
    state = State.in_dir(tmp_path, clock=clock)
    assert state.leases.acquire("service:web", _dead_owner(), ttl=30)
    with state.leases.lease("service:web", "host:2", ttl=30, heartbeat=False):
        holder = state.leases.lock_holder("service:web")
        assert holder is not None and holder.owner == "host:2"


def test_holder_that_lost_its_lease_knows_at_its_next_renewal(tmp_path: Path) -> None:
    """A holder that could not renew in time (its lease expired and went to another owner)
    finds out at its next renewal: `lost` is set and `check()` raises LeaseLost."""
    clock = Clock()
    state = State.in_dir(tmp_path, clock=clock)
    with state.leases.lease("service:web", "host:1", ttl=30, heartbeat=False) as held:
        assert held.beat() and not held.lost
        held.check()
        clock.now += 31
        assert state.leases.acquire("service:web", "host:2", ttl=30)
        assert not held.beat()
        assert held.lost
        with pytest.raises(LeaseLost, match="host:2"):
            held.check()
    holder = state.leases.lock_holder("service:web")
    assert holder is not None and holder.owner == "host:2"  # leaving did not free host:2's lease


def test_a_waiting_lease_waits_for_the_holder_then_takes_it(tmp_path: Path) -> None:
    """A second process changing the same host's proxy routes waits while the first holds
    `proxy:HOST` and goes on as soon as it lets go; the two changes never overlap."""
    first, second = State.in_dir(tmp_path), State.in_dir(tmp_path)  # two connections, one file
    inside: list[str] = []
    released = threading.Event()

    def hold() -> None:
        with first.leases.waiting("proxy:lab-1", "host:1", sleep=time.sleep):
            inside.append("first in")
            released.wait(5)
            time.sleep(0.3)
            inside.append("first out")

    worker = threading.Thread(target=hold)
    worker.start()
    while not inside:
        time.sleep(0.01)
    released.set()
    with second.leases.waiting("proxy:lab-1", "host:2", sleep=time.sleep):
        inside.append("second in")
    worker.join()
    assert inside == ["first in", "first out", "second in"]
    assert second.leases.lock_holder("proxy:lab-1") is None  # let go after the block


def test_a_waiting_lease_gives_up_naming_the_holder_and_skips_a_dead_one(tmp_path: Path) -> None:
    """A wait that runs out raises LockedError naming who holds the lease; a lease left by a
    process that is gone is taken at once."""
    clock = Clock()
    state = State.in_dir(tmp_path, clock=clock)
    assert state.leases.acquire("proxy:lab-1", "otherhost:7", ttl=60)

    def tick(seconds: float) -> None:
        clock.now += seconds

    with (
        pytest.raises(LockedError, match="otherhost:7"),
        state.leases.waiting("proxy:lab-1", "host:2", timeout=1, sleep=tick),
    ):
        pass
    assert state.leases.acquire("proxy:lab-2", _dead_owner(), ttl=60)
    with state.leases.waiting("proxy:lab-2", "host:2", timeout=0, sleep=tick):
        assert state.leases.lock_holder("proxy:lab-2").owner == "host:2"  # type: ignore[union-attr]
