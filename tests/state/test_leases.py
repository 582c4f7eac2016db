"""Leases that live exactly as long as their holder: short expiry, renewed while held, freed
when the holder's process is gone, and a holder that lost its lease knows it."""

from __future__ import annotations

import subprocess
import sys
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
