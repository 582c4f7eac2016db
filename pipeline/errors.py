"""Error kinds: each error declares how it is handled, so callers decide once, centrally.

Modelled on Flux's reconcile errors: a *stalling* error needs a human and is not retried, a
*transient* error is retried with backoff. Messages name a location (file:line, header, host).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error pipeline raises on purpose; its message is safe to show a user."""

    retry: bool = False


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
