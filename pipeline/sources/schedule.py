"""The service's timed jobs (polls with jitter and backoff, cron rebuilds, one-shot retries),
run by APScheduler.

Cron expressions are parsed by `pipeline.config.cron`, where the config is validated."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from pipeline.config.cron import CronSchedule, parse_cron
from pipeline.retry import capped_doubling
from pipeline.timeutil import utc

log = structlog.get_logger(__name__)
# APScheduler logs every job added and every tick skipped at INFO/WARNING through stdlib logging;
# our own wrapper logs what matters (failures, backoff) with context, so keep its chatter out.
logging.getLogger("apscheduler").setLevel(logging.ERROR)


# -- the service's jobs ----------------------------------------------------------------------


class CronTrigger(BaseTrigger):
    """An APScheduler trigger firing on a `CronSchedule`'s times (cronsim's crontab rules, the
    ones `pipeline validate` checked), not APScheduler's own cron, whose day-of-week numbers
    start on Monday and whose day fields must both match."""

    def __init__(self, schedule: CronSchedule) -> None:
        self.schedule = schedule

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first match after the previous fire time, or after `now` for a new job (what
        APScheduler asks a trigger for)."""
        return self.schedule.next_after(previous_fire_time or now)

    def __str__(self) -> str:
        return f"cron[{self.schedule.expr}]"


MAX_BACKOFF = 600.0  # a repo that keeps failing is still retried every 10 minutes


def poll_jitter(interval: float) -> float:
    """Random delay added to each poll: 10% of the interval, at most 5s (spreads the load)."""
    return min(interval * 0.1, 5.0)


def backoff_interval(interval: float, failures: int, cap: float = MAX_BACKOFF) -> float:
    """The poll interval after `failures` consecutive failures: doubled each time, capped."""
    return capped_doubling(interval, failures + 1, cap)


@dataclass
class _Poll:
    interval: float
    poll: Callable[[str], None]
    failures: int = 0


class Scheduler:
    """Poll jobs (interval with jitter, per-key backoff on failure), cron jobs and one-shot
    retries, run in a small thread pool. Jobs only enqueue work; `sync_*` and `retry_at` add,
    change and remove jobs while running."""

    def __init__(self, *, workers: int = 4, max_backoff: float = MAX_BACKOFF) -> None:
        self.max_backoff = max_backoff
        self._lock = threading.Lock()
        self._polls: dict[str, _Poll] = {}
        self._crons: dict[str, str] = {}
        self._retries: dict[str, float] = {}  # key -> when (epoch seconds), until it fires
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(workers)},
            # A poll that is still running when its next tick comes is not doubled (max 1),
            # and ticks missed while the pool was busy collapse into one (coalesce).
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )

    def start(self) -> None:
        self._sched.start()

    def shutdown(self) -> None:
        """Stop firing jobs; a poll already running finishes on its own thread."""
        if self._sched.running:
            self._sched.shutdown(wait=False)

    # -- polls ------------------------------------------------------------------------------
    def sync_polls(self, intervals: Mapping[str, float], poll: Callable[[str], None]) -> None:
        """Make the poll jobs exactly `intervals` (key -> seconds); new keys poll at once."""
        with self._lock:
            for key in set(self._polls) - set(intervals):
                del self._polls[key]
                self._remove(f"poll:{key}")
            for key, interval in intervals.items():
                current = self._polls.get(key)
                if current is not None and current.interval == interval:
                    current.poll = poll
                    continue
                self._polls[key] = _Poll(interval, poll)
                self._remove(f"poll:{key}")
                self._sched.add_job(
                    self._tick,
                    self._interval_trigger(interval),
                    args=[key],
                    id=f"poll:{key}",
                    name=f"poll {key}",
                    next_run_time=datetime.now(UTC),
                )

    def _tick(self, key: str) -> None:
        with self._lock:
            p = self._polls.get(key)
        if p is None:
            return
        try:
            p.poll(key)
        except Exception as exc:  # any failure of one repo backs it off; the others carry on
            with self._lock:
                p.failures += 1
                interval = backoff_interval(p.interval, p.failures, self.max_backoff)
                self._reschedule(key, p, interval)
            log.warning(
                "poll.failed",
                repo=key,
                error=str(exc),
                failures=p.failures,
                retry_in=round(interval, 1),
            )
            return
        if p.failures:
            with self._lock:
                p.failures = 0
                self._reschedule(key, p, p.interval)
            log.info("poll.recovered", repo=key, interval=p.interval)

    def _reschedule(self, key: str, p: _Poll, interval: float) -> None:
        if self._polls.get(key) is p and self._sched.get_job(f"poll:{key}") is not None:
            self._sched.reschedule_job(f"poll:{key}", trigger=self._interval_trigger(interval))

    @staticmethod
    def _interval_trigger(interval: float) -> IntervalTrigger:
        return IntervalTrigger(seconds=interval, jitter=poll_jitter(interval), timezone="UTC")

    # -- crons ------------------------------------------------------------------------------
    def sync_crons(self, crons: Mapping[str, str], fire: Callable[[str], None]) -> None:
        """Make the cron jobs exactly `crons` (key -> five-field crontab expression)."""
        with self._lock:
            for key in set(self._crons) - set(crons):
                del self._crons[key]
                self._remove(f"cron:{key}")
            for key, expr in crons.items():
                if self._crons.get(key) == expr:
                    continue
                self._crons[key] = expr
                self._remove(f"cron:{key}")
                self._sched.add_job(
                    fire,
                    CronTrigger(parse_cron(expr)),
                    args=[key],
                    id=f"cron:{key}",
                    name=f"cron {key}",
                )

    # -- one-shot retries ---------------------------------------------------------------------
    def retry_at(self, key: str, when: float, fire: Callable[[], None]) -> None:
        """Call `fire()` once at `when` (epoch seconds; at once when already past), replacing
        the retry of `key` still waiting, if any."""
        with self._lock:
            self._retries[key] = when
            self._sched.add_job(
                self._fire_retry,
                DateTrigger(run_date=utc(when), timezone="UTC"),
                args=[key, when, fire],
                id=f"retry:{key}",
                name=f"retry {key}",
                replace_existing=True,
            )

    def cancel_retry(self, key: str) -> None:
        """Drop the retry of `key` if it has not fired yet."""
        with self._lock:
            if self._retries.pop(key, None) is not None:
                self._remove(f"retry:{key}")

    def retries(self) -> dict[str, float]:
        """The retries waiting to fire: key -> when (epoch seconds)."""
        with self._lock:
            return dict(self._retries)

    def _fire_retry(self, key: str, when: float, fire: Callable[[], None]) -> None:
        with self._lock:
            if self._retries.get(key) == when:
                del self._retries[key]
        try:
            fire()
        except Exception as exc:  # logged here: APScheduler's own logging is silenced above
            log.warning("retry.failed", key=key, error=str(exc))

    def _remove(self, job_id: str) -> None:
        if self._sched.get_job(job_id) is not None:
            self._sched.remove_job(job_id)
