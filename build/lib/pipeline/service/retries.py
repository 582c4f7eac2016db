"""Retries of revisions whose rollout failed for an infrastructure reason, under `pipeline serve`.

Such a revision waits out a backoff (`pipeline.plan.blocked`) and is retried by the next pass of
its repo; but passes only follow events, and a webhook comes only with a push. So after every
pass, and at start, each waiting service gets a one-shot timer that queues a "retry" push of its
repo when its backoff ends. The event's delivery id names the service, revision and backoff, so
each wait is queued once, however often passes and restarts set its timer again.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from pipeline.config.model import Config
from pipeline.plan.blocked import Blocked
from pipeline.state.queue import EventQueue
from pipeline.state.store import State
from pipeline.timeutil import iso, utc

log = structlog.get_logger(__name__)

SOURCE = "retry"


class Timers(Protocol):
    """One-shot timers by key (`pipeline.sources.schedule.Scheduler`)."""

    def retry_at(self, key: str, when: float, fire: Callable[[], None]) -> None: ...

    def cancel_retry(self, key: str) -> None: ...

    def retries(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class Retry:
    """The push event of `repo` to queue at `until` (epoch seconds), so that a pass rolls out
    `service`'s `revision` again after its infrastructure failure."""

    service: str
    repo: str
    kind: str  # push | tag: what the repo follows, as its other triggers queue
    ref: str | None
    revision: str
    until: float

    @property
    def delivery_id(self) -> str:
        """Names this wait: a later failure of the revision waits until another time."""
        return f"{self.service}@{self.revision[:12]}@{self.until:.3f}"


def plan_retries(config: Config, waiting: Mapping[str, Blocked]) -> dict[str, Retry]:
    """Per service of `config` in `waiting` whose wait ends (`until` set), the event to queue
    then; a revision kept out until a newer commit (`until` None) gets none."""
    out = {}
    for name, blocked in waiting.items():
        service = config.services.get(name)
        if blocked.until is None or service is None or service.image not in config.images:
            continue
        repo = config.images[service.image].repo
        section = config.repos.get(repo)
        if section is None:
            continue
        if section.tags:
            kind, ref = "tag", None
        else:
            kind, ref = "push", f"refs/heads/{section.branch or 'main'}"
        out[name] = Retry(name, repo, kind, ref, blocked.revision, blocked.until)
    return out


class Retrier:
    """Keeps one timer per service waiting out an infrastructure failure (`sync`), which queues
    the retry event of its repo when the wait ends and wakes the worker."""

    def __init__(
        self,
        *,
        state: State,
        queue: EventQueue,
        timers: Timers,
        config: Callable[[], Config],
        wake: Callable[[], None],
    ) -> None:
        self.state, self.queue, self.timers = state, queue, timers
        self.config, self.wake = config, wake
        self._lock = threading.Lock()
        self._fired: set[str] = set()  # delivery ids queued by this process

    def sync(self) -> None:
        """Make the timers exactly the retries the state asks for now: one per waiting service,
        at its `until` (at once when that has passed and nothing was queued for it yet)."""
        config = self.config()
        waiting = plan_retries(config, self.state.infrastructure_retries(list(config.services)))
        with self._lock:
            self._fired &= {r.delivery_id for r in waiting.values()}
            wanted = {s: r for s, r in waiting.items() if r.delivery_id not in self._fired}
        timers = self.timers.retries()
        for key in set(timers) - set(wanted):
            self.timers.cancel_retry(key)
        for key, retry in wanted.items():
            if timers.get(key) != retry.until:
                self.timers.retry_at(key, retry.until, functools.partial(self.fire, retry))
                log.info(
                    "retry.scheduled",
                    service=retry.service,
                    repo=retry.repo,
                    revision=retry.revision[:12],
                    until=iso(utc(retry.until)),
                )

    def fire(self, retry: Retry) -> None:
        """Queue the retry event of `retry` (once: its delivery id is remembered by the queue)."""
        with self._lock:
            self._fired.add(retry.delivery_id)
        event_id, created = self.queue.put(
            source=SOURCE,
            kind=retry.kind,
            repo=retry.repo,
            ref=retry.ref,
            sha=retry.revision,
            delivery_id=retry.delivery_id,
        )
        if created:
            log.info(
                "retry.queued",
                service=retry.service,
                repo=retry.repo,
                revision=retry.revision[:12],
                event_id=event_id,
            )
            self.wake()
