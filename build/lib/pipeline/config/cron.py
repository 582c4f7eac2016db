"""Cron expressions of `[images.*] rebuild`: five crontab fields, evaluated in UTC.

Parsed with APScheduler's `CronTrigger` (the scheduler in `sources/schedule.py` runs the same
trigger), so what `pipeline validate` accepts is exactly what the service will schedule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apscheduler.triggers.cron import CronTrigger


def parse_cron(expr: str) -> CronTrigger:
    """Return the trigger for a five-field crontab expression (UTC).

    Raises ValueError naming the expression and what is wrong with it (field count, a value
    out of range); rules are APScheduler's `CronTrigger.from_crontab`."""
    # Imported here: APScheduler's import (its version look-up) is paid only by a config that
    # has a cron expression, not by every command that loads the config.
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron expression {expr!r}: expected 5 fields, got {len(fields)}")
    try:
        return CronTrigger.from_crontab(expr, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None
