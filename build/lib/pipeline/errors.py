"""Error kinds: each error declares how it is handled, so callers decide once, centrally.

Modelled on Flux's reconcile errors: a *stalling* error needs a human and is not retried, a
*transient* error is retried with backoff. Messages name a location (file:line, header, host).
"""

from __future__ import annotations

from typing import Literal

# Why a release failed, as `history --json` shows it in `failure_kind`; it decides whether the
# revision is tried again: an application failure (unhealthy, crashed) waits for a newer commit
# or `pipeline deploy`; an infrastructure failure is retried on the next pass with backoff; an
# interrupted rollout (crash, kill -9, SIGTERM) gets one fresh attempt. A commit a trigger
# announced that never appeared on the remote (`never_appeared`) was never rolled out at all:
# it keeps nothing out.
FailureKind = Literal["unhealthy", "crashed", "infrastructure", "interrupted", "never_appeared"]
FAILURE_KINDS: tuple[FailureKind, ...] = (
    "unhealthy",
    "crashed",
    "infrastructure",
    "interrupted",
    "never_appeared",
)


class PipelineError(Exception):
    """Base of every error pipeline raises on purpose; its message is safe to show a user.

    `failure_kind` says what a rollout that failed on this error records: engine, registry and
    lease errors are infrastructure unless a subclass says otherwise."""

    retry: bool = False
    failure_kind: FailureKind = "infrastructure"


class StallingError(PipelineError):
    """Needs a human: bad config, auth refused, a failed health check. Never retried."""


class TransientError(PipelineError):
    """May succeed later: a network blip, a registry 5xx. Retried with capped backoff."""

    retry = True


class ConfigError(StallingError):
    """A configuration that does not validate; carries every problem found, not only the first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class LockedError(TransientError):
    """Another run holds the lock of a service; try again once it is released or expired."""
