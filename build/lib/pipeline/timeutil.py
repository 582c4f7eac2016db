"""UTC time helpers: every time pipeline stores or shows is UTC.

SQLite hands datetimes back without their zone although everything written is UTC; these
helpers make such values aware before they are compared, printed or turned into epoch seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utc(ts: float) -> datetime:
    """An aware UTC datetime from epoch seconds (what an injected `clock()` returns)."""
    return datetime.fromtimestamp(ts, UTC)


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: None) -> None: ...
def aware(value: datetime | None) -> datetime | None:
    """`value` with UTC as its zone when it has none (as read from SQLite); None stays None."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 with its offset ("2024-05-01T12:00:00+00:00"), naive values taken as UTC."""
    return None if value is None else aware(value).isoformat()


def epoch(value: datetime) -> float:
    """Epoch seconds of `value`, a naive value taken as UTC."""
    return aware(value).timestamp()
