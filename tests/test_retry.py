"""The retry policy: capped exponential backoff within a time budget, transient errors only,
with the sleep and the clock injected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pipeline.errors import PipelineError, StallingError, TransientError
from pipeline.retry import RetryPolicy, is_transient


@dataclass
class FakeTime:
    """A clock that only moves when slept on."""

    now: float = 100.0
    waits: list[float] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def failing(times: int, error: Exception) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return calls, fn


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (TransientError("registry blip"), True),
        (StallingError("auth refused"), False),
        (PipelineError("a plain pipeline error"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_errors_that_declare_themselves_transient_are_retried(
    error: Exception, retried: bool
) -> None:
    """`is_transient` follows the error's own `retry`; anything else is never retried."""
    assert is_transient(error) is retried
    t = FakeTime()
    calls, fn = failing(1, error)
    policy = RetryPolicy(sleep=t.sleep, clock=t.clock)
    if retried:
        assert policy.call(fn, "test") == "done"
    else:
        with pytest.raises(type(error)):
            policy.call(fn, "test")
    assert len(calls) == (2 if retried else 1)


@pytest.mark.parametrize(
    ("policy", "waits"),
    [
        (RetryPolicy(), [0.5, 1, 2, 4]),
        (RetryPolicy(attempts=8, budget=60), [0.5, 1, 2, 4, 8, 8, 8]),
        (RetryPolicy(attempts=8, budget=10), [0.5, 1, 2, 4]),
        (RetryPolicy(attempts=1), []),
    ],
    ids=["default", "capped at 8 s", "within a 10 s budget", "one attempt"],
)
def test_backoff_doubles_up_to_its_cap_within_the_budget(
    policy: RetryPolicy, waits: list[float]
) -> None:
    """Waits double from 0.5 s, never exceed `maximum`, and stop before `budget` is passed."""
    t = FakeTime()
    injected = RetryPolicy(
        policy.attempts, policy.initial, policy.maximum, policy.budget, t.sleep, t.clock
    )
    calls, fn = failing(100, TransientError("still down"))
    with pytest.raises(TransientError, match="still down"):
        injected.call(fn, "test")
    assert t.waits == waits == policy.waits()
    assert len(calls) == len(waits) + 1


def test_slow_tries_count_against_the_budget() -> None:
    """Time spent in the tries themselves (a 15 s timeout) uses up the budget too."""
    t = FakeTime()
    policy = RetryPolicy(sleep=t.sleep, clock=t.clock)
    calls: list[int] = []

    def slow() -> str:
        calls.append(1)
        t.now += 15  # each try times out after 15 s
        raise TransientError("timeout")

    with pytest.raises(TransientError):
        policy.call(slow, "test")
    assert len(calls) == 2 and t.waits == [0.5]  # 15 + 0.5 + 15; another wait would pass 20 s


def test_on_retry_hears_each_failed_try() -> None:
    """`on_retry` gets the number of the failed try, its error and the wait before the next."""
    t = FakeTime()
    heard: list[tuple[int, str, float]] = []
    _, fn = failing(2, TransientError("blip"))
    result = RetryPolicy(sleep=t.sleep, clock=t.clock).call(
        fn,
        "test",
        on_retry=lambda n, exc, wait: heard.append((n, str(exc), wait)),
    )
    assert result == "done"
    assert heard == [(1, "blip", 0.5), (2, "blip", 1.0)]
