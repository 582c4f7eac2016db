"""Cron expressions of `[images.*] rebuild`: five crontab fields, evaluated in UTC.

Parsed with cronsim (https://github.com/cuu508/cronsim), whose rules are those of Debian's
cron and crontab(5): 0 and 7 are Sunday, a restricted day-of-month and day-of-week match
either one. The scheduler in `sources/schedule.py` fires on the times `CronSchedule.next_after`
gives, so what `pipeline validate` accepts is exactly what the service will schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class CronSchedule:
    """A validated five-field crontab expression, evaluated in UTC."""

    expr: str

    def next_after(self, moment: datetime) -> datetime:
        """The first time strictly after `moment` (aware or naive UTC) that the expression
        matches, as an aware UTC datetime with whole minutes."""
        from cronsim import CronSim  # imported here: only configs with a cron pay for it

        start = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
        return next(CronSim(self.expr, start))


def parse_cron(expr: str) -> CronSchedule:
    """Return the schedule of a five-field crontab expression (UTC).

    Raises ValueError naming the expression and what is wrong with it (field count, a value
    out of range); rules are cronsim's, i.e. Debian cron's (crontab(5))."""
    from cronsim import CronSim, CronSimError

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron expression {expr!r}: expected 5 fields, got {len(fields)}")
    try:
        CronSim(expr, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None
    return CronSchedule(expr)
