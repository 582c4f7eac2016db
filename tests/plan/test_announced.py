"""When a commit announced by a trigger but not on the remote yet is fetched again, and when the
wait for it ends, as a table over (arrival, now, bound) in plain epoch seconds."""

from __future__ import annotations

import pytest

from pipeline.plan.announced import never_appeared, next_fetch

T0 = 1_800_000_000.0  # when the event arrived


@pytest.mark.parametrize(
    ("now", "timeout", "expected"),
    [
        (0.0, 300.0, 1.0),  # the arrival's own fetch did not bring it: again 1 s after arrival
        (1.0, 300.0, 3.0),  # then 2 s later, 4, 8, 16 ...
        (1.2, 300.0, 3.0),  # a late fetch does not push the schedule back
        (3.0, 300.0, 7.0),
        (7.0, 300.0, 15.0),
        (15.0, 300.0, 31.0),
        (31.0, 300.0, 61.0),  # the waits stop doubling at 30 s
        (61.0, 300.0, 91.0),
        (280.0, 300.0, 300.0),  # the last fetch falls on the bound
        (300.0, 300.0, None),  # nothing at the bound: give up
        (4000.0, 300.0, None),  # a service down past the bound gives up at its first fetch
        (0.0, 2.0, 1.0),
        (1.0, 2.0, 2.0),
        (2.0, 2.0, None),
        (0.0, 0.0, None),  # a bound of 0: no waiting at all
    ],
)
def test_next_fetch(now: float, timeout: float, expected: float | None) -> None:
    """Fetches fall 1, 3, 7, 15, 31, 61, 91 ... s after the arrival, the last at the bound,
    and the wait ends at the bound, whenever (and however late) the previous fetch ran."""
    got = next_fetch(T0, T0 + now, timeout)
    assert got == (None if expected is None else T0 + expected)


def test_a_restart_resumes_the_schedule_of_the_arrival() -> None:
    """The schedule depends on the arrival only, so a service restarted mid-wait fetches when
    the one before it would have and gives up at the same bound."""
    assert next_fetch(T0, T0 + 100.0, 300.0) == T0 + 121.0
    assert next_fetch(T0, T0 + 299.9, 300.0) == T0 + 300.0


def test_the_message_names_the_commit() -> None:
    """The failure names the commit by the 12 digits every other message uses."""
    assert never_appeared("0123456789abcdef" * 2 + "01234567") == (
        "announced commit 0123456789ab never appeared on the remote"
    )
