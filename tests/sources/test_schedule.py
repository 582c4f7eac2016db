"""The scheduler's one-shot retries: one waiting job per key, fired once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.sources.schedule import Scheduler


@pytest.fixture
def scheduler() -> Iterator[Scheduler]:
    sched = Scheduler()
    sched.start()
    yield sched
    sched.shutdown()


def test_retry_at_replaces_the_waiting_retry_of_its_key(scheduler: Scheduler) -> None:
    """A second `retry_at` of a key moves its one waiting retry; `cancel_retry` drops it."""
    soon, later = time.time() + 3600, time.time() + 7200
    fired: list[str] = []
    scheduler.retry_at("shop", soon, lambda: fired.append("first"))
    scheduler.retry_at("shop", later, lambda: fired.append("second"))
    scheduler.retry_at("blog", soon, lambda: fired.append("blog"))
    assert scheduler.retries() == {"shop": later, "blog": soon}
    scheduler.cancel_retry("blog")
    scheduler.cancel_retry("nothing")
    assert scheduler.retries() == {"shop": later}
    assert fired == []


def test_retry_at_a_past_time_fires_once_at_once(scheduler: Scheduler) -> None:
    """A retry whose time has passed fires at once, exactly once, and is then no longer waiting."""
    calls: list[float] = []
    fired = threading.Event()

    def fire() -> None:
        calls.append(time.time())
        fired.set()

    scheduler.retry_at("shop", time.time() - 60, fire)
    assert fired.wait(5)
    assert scheduler.retries() == {}
    assert len(calls) == 1
