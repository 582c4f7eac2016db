"""The state database: leases that never go stale, and a true record after a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import LockedError
from pipeline.state.store import State, default_owner, owner_alive_local


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(tmp_path: Path, clock: Clock) -> State:
    return State.in_dir(tmp_path, clock=clock)


def test_lease_excludes_a_second_owner_until_it_expires(state: State, clock: Clock) -> None:
    """Two owners never hold one service's lease at once; an expired lease goes to the next."""
    assert state.leases.acquire("service:web", "host:1", ttl=60)
    assert not state.leases.acquire("service:web", "host:2", ttl=60)
    clock.now += 61
    assert state.leases.acquire("service:web", "host:2", ttl=60)
    assert not state.leases.acquire("service:web", "host:1", ttl=60)


def test_lease_of_a_dead_process_is_broken_at_once(state: State) -> None:
    """A crashed run's lease does not block the next run, even before it expires."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = default_owner().rsplit(":", 1)[0] + f":{dead.pid}"
    assert state.leases.acquire("service:web", owner, ttl=3600)
    with state.leases.lease("service:web", default_owner()):
        assert state.leases.lock_holder("service:web").owner == default_owner()  # type: ignore[union-attr]
    assert state.leases.lock_holder("service:web") is None


def test_lease_held_by_a_live_process_is_refused_with_its_holder(state: State) -> None:
    """A live holder's lease is respected, and the error names who holds it."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        owner = default_owner().rsplit(":", 1)[0] + f":{live.pid}"
        assert state.leases.acquire("service:web", owner, ttl=3600)
        with (
            pytest.raises(LockedError, match=f":{live.pid}"),
            state.leases.lease("service:web", default_owner()),
        ):
            pass
    finally:
        live.kill()
        live.wait()


def test_interrupted_runs_are_marked_and_not_left_running(state: State) -> None:
    """Runs, steps and releases of a dead owner are recorded as interrupted on the next start."""
    run = state.start_run("cli", "shop", owner="elsewhere:1")
    step = state.start_step(run, "build", "web")
    rel = state.start_release(
        "web", "a" * 40, "sha256:x", "r@sha256:x", "h", kind="deploy", reason="test", run_id=run
    )
    assert state.interrupt_stale_runs(lambda owner: owner != "elsewhere:1") == [run]
    assert state.run(run).status == "interrupted"  # type: ignore[union-attr]
    assert state.steps(run)[0].id == step and state.steps(run)[0].status == "interrupted"
    assert state.releases("web")[0].id == rel and state.releases("web")[0].status == "interrupted"


def test_owner_alive_local_knows_dead_pids() -> None:
    """The liveness check tells a finished local process from a running one."""
    assert owner_alive_local(default_owner())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not owner_alive_local(default_owner().rsplit(":", 1)[0] + f":{dead.pid}")
    assert owner_alive_local("another-machine:1")


def test_service_records_say_where_each_service_runs(tmp_path: Path) -> None:
    """A service's record carries the hosts it is deployed on, so that the planner can roll
    it out to a host added to its `hosts`; a service never deployed has no record."""
    state = State.in_dir(tmp_path)
    rel = state.start_release("web", "a" * 40, "sha256:a", "r/web@sha256:a", "h", kind="deploy",
                              reason="test", run_id=None)  # fmt: skip
    state.finish_release(rel, "succeeded")
    for host in ("lab-1", "lab-2"):
        state.set_deployment("web", host, revision="a" * 40, digest="sha256:a",
                             ref="r/web@sha256:a", spec_hash="h", container_id=None,
                             release_id=rel)  # fmt: skip
    records = state.service_records(["web", "api"])
    assert set(records) == {"web"}
    assert records["web"].targets == frozenset({"lab-1", "lab-2"})
