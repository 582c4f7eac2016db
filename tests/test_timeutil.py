"""Times read back from SQLite (naive) are taken as the UTC they were written in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from pipeline.timeutil import aware, epoch, iso, utc


def test_naive_values_are_utc_and_aware_ones_keep_their_zone() -> None:
    """A naive datetime prints and converts as UTC; an aware one is left as it is."""
    naive = datetime(2024, 5, 1, 12, 0, 0)
    assert iso(naive) == "2024-05-01T12:00:00+00:00"
    assert epoch(naive) == utc(epoch(naive)).timestamp() == 1714564800.0
    paris = datetime(2024, 5, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert iso(paris) == "2024-05-01T14:00:00+02:00"
    assert epoch(paris) == epoch(naive)
    assert iso(None) is None and aware(None) is None


def test_utc_turns_epoch_seconds_into_an_aware_datetime() -> None:
    """utc() gives the aware UTC datetime of epoch seconds (what State.now() records)."""
    assert utc(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert utc(0).tzinfo is UTC
