"""The one retry policy: capped exponential backoff (tenacity) for errors that declare themselves
transient (`PipelineError.retry`, see `errors.py`); sleeping and the clock are injected.

Engines retry their idempotent registry and engine calls (pull, image inspection) with it, the
builder its pushes; the runner makes one policy and hands it to both, so a test that injects a
sleep that does not sleep retries instantly everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from pipeline.errors import PipelineError

log = structlog.get_logger(__name__)

T = TypeVar("T")
# Called before each wait: (number of the attempt that failed, its error, seconds to wait).
OnRetry = Callable[[int, BaseException, float], None]


def capped_doubling(first: float, count: int, cap: float) -> float:
    """The wait after `count` consecutive failures (seconds): `first`, then doubling, never
    above `cap` (nor below `first`). Shared by every backoff of pipeline: engine retries,
    polls of a failing repo, retries of a revision after an infrastructure failure."""
    exponent = max(0, min(count - 1, 32))  # 2**32 of any base is past every cap already
    return min(first * 2.0**exponent, max(cap, first))


def is_transient(exc: BaseException) -> bool:
    """True for an error that declares itself worth retrying (a TransientError: connection
    refused or reset, a timeout, a 5xx); auth refusals and unknown images are not."""
    return isinstance(exc, PipelineError) and exc.retry


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `attempts` tries, waiting `initial` seconds after the first failure and doubling up
    to `maximum`; no wait that would end more than `budget` seconds after the first try began.

    The defaults wait 0.5, 1, 2 and 4 s: a blip of a few seconds is covered, a dead registry
    is reported within about 20 s (each try also has its own timeout).
    """

    attempts: int = 5
    initial: float = 0.5
    maximum: float = 8.0
    budget: float = 20.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def waits(self) -> list[float]:
        """The waits between tries when every try fails at once (for docs and tests)."""
        out: list[float] = []
        for n in range(1, self.attempts):
            wait = min(self.initial * 2 ** (n - 1), self.maximum)
            if sum(out) + wait > self.budget:
                break
            out.append(wait)
        return out

    def retrying(self, what: str, on_retry: OnRetry | None = None) -> Retrying:
        """A fresh tenacity `Retrying` for one operation, named `what` in the retry log lines."""
        started: list[float] = []

        def before(state: RetryCallState) -> None:
            if state.attempt_number == 1:
                started[:] = [self.clock()]

        def stop(state: RetryCallState) -> bool:
            if state.attempt_number >= self.attempts:
                return True
            elapsed = self.clock() - (started[0] if started else self.clock())
            return elapsed + state.upcoming_sleep > self.budget

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            assert exc is not None  # only failed attempts are retried
            log.warning(
                "transient error, retrying",
                what=what,
                attempt=state.attempt_number,
                attempts=self.attempts,
                wait=round(state.upcoming_sleep, 2),
                error=str(exc),
            )
            if on_retry is not None:
                on_retry(state.attempt_number, exc, state.upcoming_sleep)

        return Retrying(
            stop=stop,
            wait=wait_exponential(multiplier=self.initial, max=self.maximum),
            retry=retry_if_exception(is_transient),
            before=before,
            before_sleep=before_sleep,
            sleep=self.sleep,
            reraise=True,
        )

    def call(self, fn: Callable[[], T], what: str, on_retry: OnRetry | None = None) -> T:
        """`fn()`, retried while it raises a transient error; the last error is re-raised."""
        return self.retrying(what, on_retry)(fn)
