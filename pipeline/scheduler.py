"""Cron schedules: the only module that imports APScheduler."""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger


def parse_cron(expr: str) -> CronTrigger:
    """Return the trigger for a five-field crontab expression, or raise ValueError saying why."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron expression {expr!r}: expected 5 fields, got {len(fields)}")
    try:
        return CronTrigger.from_crontab(expr, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None
