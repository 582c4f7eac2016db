"""Step records of a run, written as each step starts and ends (the `steps` table): what
`pipeline serve`'s API and the git hook show as a run's progress."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.state.store import State


@dataclass(frozen=True)
class StepLog:
    """The run's step records of one subject (a service's rollout, an image's build and
    push): `steps` rows. Without a run (a rollout outside a pass, recovery) nothing is
    recorded."""

    state: State
    subject: str

    def start(
        self,
        run_id: int | None,
        kind: str,
        host: str | None,
        revision: str | None,
        detail: str | None,
    ) -> int | None:
        """Record step `kind` on `host` (None: the local engine) as running; its id, or None
        without a run."""
        if run_id is None:
            return None
        return self.state.start_step(
            run_id, kind, self.subject, host=host, revision=revision, detail=detail
        )

    def end(
        self, step: int | None, status: str, *, detail: str | None = None, error: str | None = None
    ) -> None:
        """Record how step `step` ended (succeeded, failed, skipped)."""
        if step is not None:
            self.state.finish_step(step, status, detail=detail, error=error)
