"""Which revision of a service is kept out of automatic rollouts, why, and until when: pure logic
over the service's release records (`failure_kind` says why each one failed).

* an application failure (`unhealthy`, `crashed`, or a failure recorded before kinds were, whose
  `failure_kind` is NULL) keeps its revision out until a newer commit or `pipeline deploy`;
* an `infrastructure` failure (registry or engine unreachable, lease lost) is retried on a later
  pass, not before `backoff(n)` seconds after the n-th consecutive one of that revision;
* an `interrupted` rollout (crash, stop) gets one fresh attempt; a second interrupted attempt in
  a row is treated as an application failure, so a revision that kills its rollout cannot loop;
* a manual rollback keeps the revision it left out, as an application failure would;
* a commit announced by a trigger that never appeared on the remote (`never_appeared`) was no
  attempt: it keeps nothing out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.retry import capped_doubling
from pipeline.timeutil import utc

INFRASTRUCTURE_BACKOFF = 30.0  # seconds after the first infrastructure failure of a revision
INFRASTRUCTURE_BACKOFF_MAX = 600.0
_UNTIL_NEWER = "waiting for a newer commit or `pipeline deploy`"


@dataclass(frozen=True)
class ReleaseFact:
    """One release of a service as this decision needs it (a row of `releases`, plain data)."""

    revision: str
    digest: str
    spec_hash: str
    kind: str  # deploy | rollback
    status: str  # running | succeeded | rolled_back | failed | superseded | interrupted
    failure_kind: str | None  # unhealthy | crashed | infrastructure | interrupted | None
    finished_at: float | None  # epoch seconds


@dataclass(frozen=True)
class Blocked:
    """A revision of a service not to roll out automatically, and why; `until` (epoch seconds)
    is when it may be retried, None for "until a newer commit or `pipeline deploy`"."""

    revision: str
    digest: str
    spec_hash: str
    why: str  # completes "revision <sha> ...", e.g. "failed its health check; waiting for ..."
    until: float | None = None
    failure_kind: str | None = None


def infrastructure_backoff(failures: int) -> float:
    """Seconds to wait after `failures` consecutive infrastructure failures: 30, 60, 120, ...
    up to 10 minutes."""
    return capped_doubling(INFRASTRUCTURE_BACKOFF, failures, INFRASTRUCTURE_BACKOFF_MAX)


def effective_kind(release: ReleaseFact) -> str | None:
    """Why a failed release failed; None for a failure recorded before kinds were (which is
    handled as an application failure, as it was then)."""
    if release.failure_kind:
        return release.failure_kind
    return "interrupted" if release.status == "interrupted" else None


def _clock_time(epoch: float) -> str:
    return utc(epoch).strftime("%H:%M:%S")


def blocked_revision(releases: Sequence[ReleaseFact], now: float) -> Blocked | None:
    """The revision of one service kept out at `now`, given its releases newest first; None
    when nothing is (its last attempt succeeded, or a retry is due)."""
    attempts = [
        r
        for r in releases
        if r.status not in ("running", "superseded") and r.failure_kind != "never_appeared"
    ]
    if not attempts:
        return None
    last = attempts[0]
    if last.status == "succeeded":
        if last.kind != "rollback":
            return None
        # Rolling back pins the service: the deploy it left is not re-deployed automatically.
        left = next(
            (r for r in attempts[1:] if r.kind == "deploy" and r.status == "succeeded"), None
        )
        if left is None:
            return None
        return _blocked(left, f"was rolled back by hand; {_UNTIL_NEWER}")

    kind = effective_kind(last)
    run = 0  # consecutive attempts of this revision, newest first, that failed like the last
    for r in attempts:
        if r.revision != last.revision or r.status == "succeeded" or effective_kind(r) != kind:
            break
        run += 1
    if kind == "infrastructure":
        failed_at = last.finished_at
        if failed_at is None:
            return None  # no time to count from: retry
        until = failed_at + infrastructure_backoff(run)
        if now >= until:
            return None
        why = (
            f"failed for an infrastructure reason at {_clock_time(failed_at)} UTC "
            f"({run} in a row); retrying after {_clock_time(until)} UTC "
            "(`pipeline deploy` retries now)"
        )
        return _blocked(last, why, until=until, kind=kind)
    if kind == "interrupted":
        if run < 2:
            return None  # one fresh attempt
        return _blocked(last, f"was interrupted {run} times in a row; {_UNTIL_NEWER}", kind=kind)
    what = {
        "unhealthy": "failed its health check",
        "crashed": "crashed (its container exited)",
    }.get(kind or "", "failed before")
    return _blocked(last, f"{what}; {_UNTIL_NEWER}", kind=kind)


def infrastructure_retry(releases: Sequence[ReleaseFact]) -> Blocked | None:
    """The revision of one service waiting out an infrastructure failure, with the `until` when
    a pass may retry it, whether or not that time has come (given its releases newest first);
    None when its last attempt did not fail for an infrastructure reason."""
    # Seen from before any backoff could end, the last failure is always still waiting.
    blocked = blocked_revision(releases, now=float("-inf"))
    if blocked is None or blocked.failure_kind != "infrastructure":
        return None
    return blocked


def _blocked(
    release: ReleaseFact, why: str, *, until: float | None = None, kind: str | None = None
) -> Blocked:
    return Blocked(release.revision, release.digest, release.spec_hash, why, until, kind)
