"""`rebuild` cron expressions: crontab(5) rules, the same for `validate` and the scheduler."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline.config.cron import parse_cron
from pipeline.sources.schedule import CronTrigger

MONDAY = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)  # a Monday, noon UTC


@pytest.mark.parametrize(
    ("expr", "fires"),
    [
        ("0 4 * * 0", datetime(2026, 12, 6, 4, 0, tzinfo=UTC)),  # 0 is Sunday
        ("0 4 * * 7", datetime(2026, 12, 6, 4, 0, tzinfo=UTC)),  # so is 7
        ("0 4 * * sun", datetime(2026, 12, 6, 4, 0, tzinfo=UTC)),
        ("30 3 * * 1-5", datetime(2026, 12, 1, 3, 30, tzinfo=UTC)),  # Mon-Fri, tomorrow
        ("*/15 * * * *", datetime(2026, 11, 30, 12, 15, tzinfo=UTC)),
        # A restricted day of month and day of week: either matches (crontab(5)).
        ("0 0 1 * 2", datetime(2026, 12, 1, 0, 0, tzinfo=UTC)),
        ("0 0 5 * 3", datetime(2026, 12, 2, 0, 0, tzinfo=UTC)),
    ],
)
def test_a_cron_fires_when_crontab_says(expr: str, fires: datetime) -> None:
    """The scheduler's trigger fires a `rebuild` cron at the next time crontab(5) gives (0 and 7
    are Sunday), for a new job and after a previous fire."""
    trigger = CronTrigger(parse_cron(expr))
    first = trigger.get_next_fire_time(None, MONDAY)
    assert first == fires
    assert trigger.get_next_fire_time(first, first) > first


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("0 4 * *", "expected 5 fields, got 4"),
        ("61 * * * *", "Bad minute"),
        ("0 25 * * *", "Bad hour"),
        ("0 4 * * 8", "Bad day-of-week"),
        ("@daily", "expected 5 fields, got 1"),
    ],
)
def test_an_invalid_cron_is_refused_naming_what_is_wrong(expr: str, problem: str) -> None:
    """`validate` refuses a cron crontab would refuse, saying which field is wrong."""
    with pytest.raises(ValueError, match="invalid cron expression") as err:
        parse_cron(expr)
    assert problem in str(err.value) and repr(expr) in str(err.value)
