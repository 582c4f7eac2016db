"""How a rollout fails: the errors its steps raise and the one place (`failure_of`) that
decides, from an error's declared kind, what the release records and says."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.deploy.steps import StepKind
from pipeline.errors import FailureKind, PipelineError


class RolloutFailed(PipelineError):
    """A host's new container failed its check (unhealthy, or it crashed)."""

    def __init__(self, message: str, failure_kind: FailureKind) -> None:
        super().__init__(message)
        self.failure_kind = failure_kind


class Interrupted(PipelineError):
    """The rollout was asked to stop (a newer commit waits, the service stops) at a step
    boundary; it is undone, and the revision stays eligible."""

    failure_kind: FailureKind = "interrupted"


class Aborted(Exception):
    """Another host of the same batch failed: this one stops at its next step boundary."""


class HostFailed(Exception):
    """A step of a host raised `cause` (or, `before` it, a boundary check did): carries where,
    for the one place that decides."""

    def __init__(self, host: str, step: StepKind, cause: Exception, *, before: bool = False):
        super().__init__(f"host {host}: {step}: {cause}")
        self.host, self.step, self.cause, self.before = host, step, cause, before


@dataclass(frozen=True)
class Failure:
    """How a rollout failed: what the release records (`status`, `kind`) and says (`message`)."""

    kind: FailureKind
    status: str  # rolled_back | superseded | interrupted
    message: str


_DOING: Mapping[StepKind, str] = {
    "pull": "pull of the image",
    "stop": "stopping the old container",
    "start": "could not start the new container",
    "health": "health check",
    "route": "switching the proxy's route",
    "switch": "recording the deployment",
    "retire": "retiring the old container",
}


def failure_of(exc: BaseException) -> Failure:
    """The one place deciding how a failed rollout is recorded, from the error's declared
    kind: a failed check is unhealthy or crashed, a stop request or Ctrl-C interrupted, any
    other PipelineError what it declares (engine, registry, lease: infrastructure), and an
    unexpected exception (a bug) infrastructure."""
    where, cause = "", exc
    if isinstance(exc, HostFailed):
        cause = exc.cause
        if exc.before:
            where = f"host {exc.host}: stopped before {exc.step}"
        else:
            where = f"host {exc.host}: {_DOING[exc.step]}"
            where = where if exc.step == "start" else f"{where} failed"
    if isinstance(cause, KeyboardInterrupt):
        return Failure("interrupted", "interrupted", "interrupted (Ctrl-C); rolled back")
    if isinstance(cause, Interrupted):
        return Failure("interrupted", "superseded", str(cause))
    if isinstance(cause, RolloutFailed):
        return Failure(cause.failure_kind, "rolled_back", str(cause))
    if isinstance(cause, PipelineError):
        text = f"{where}: {cause}" if where else str(cause)
        return Failure(cause.failure_kind, "rolled_back", text)
    text = f"unexpected error {type(cause).__name__}: {cause}"
    return Failure("infrastructure", "rolled_back", f"{where}: {text}" if where else text)
