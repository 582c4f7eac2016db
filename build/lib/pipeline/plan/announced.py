"""When to fetch again for a commit a trigger announced but the remote does not show yet: pure
logic over the event's arrival time, the time now and the configured bound.

Hosting services replicate a push to the servers that answer fetches with a lag, and may send
the webhook before they caught up. Fleet met it and settled on the same rule (rancher/fleet#4842,
#5218): the repository's head is the truth, the announced commit is waited for a bounded time
(5 minutes by default there too), and a commit that never shows is reported. The event waits:
fetches follow at 1, 2, 4, 8, 16 s, then every 30 s, counted from the event's arrival (so a
restarted service resumes the same schedule), with a last one at the bound (`[server]
announced_commit_timeout`), after which the event fails.
"""

from __future__ import annotations

from pipeline.retry import capped_doubling

FIRST_WAIT = 1.0  # seconds between the arrival's fetch and the next one
MAX_WAIT = 30.0  # the longest wait between two fetches


def never_appeared(sha: str) -> str:
    """The message an event ends with when its commit `sha` never showed on the remote."""
    return f"announced commit {sha[:12]} never appeared on the remote"


def next_fetch(
    received: float,
    now: float,
    timeout: float,
    *,
    first: float = FIRST_WAIT,
    cap: float = MAX_WAIT,
) -> float | None:
    """When (epoch seconds) to fetch again for the commit of an event received at `received`
    that a fetch at `now` did not bring; None when it has waited `timeout` seconds (give up).

    The fetches fall at `received` + 1, 3, 7, 15, 31, 61, 91, ... s (`first` doubling up to
    `cap` between two), the last one exactly at `received` + `timeout`."""
    deadline = received + timeout
    if now >= deadline:
        return None
    offset, count = 0.0, 0
    while received + offset <= now:
        count += 1
        offset += capped_doubling(first, count, cap)
    return min(received + offset, deadline)
