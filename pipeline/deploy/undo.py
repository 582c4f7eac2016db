"""Undo of a host and the step records, mixed into `Rollout`: shared by a failing rollout and
by crash recovery, which calls them with what `release_hosts` recorded."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import structlog
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from pipeline.deploy.steps import UndoKind
from pipeline.errors import PipelineError
from pipeline.hosts.engine import LABEL_PREFIX, Engine
from pipeline.state.store import PreviousContainer, State

log = structlog.get_logger(__name__)

T = TypeVar("T")


class UndoSteps:
    """Undo methods of `Rollout`; relies on its state, service, engines, report, sleep and
    attempts."""

    state: State
    service: str
    engines: Mapping[str, Engine]
    report: Callable[[str], None]
    sleep: Callable[[float], None]
    attempts: int

    def undo_host(
        self,
        host: str,
        undos: Sequence[UndoKind],
        prev: PreviousContainer,
        new: str | None,
        release_id: int,
        run_id: int | None,
    ) -> str | None:
        """Put one host back on its recorded previous container (each undo idempotent); return
        None when done, else why it could not be."""
        back_to = (prev.revision or "?")[:12] if prev.container else "nothing"
        record = self._step(run_id, "rollback", host, None, f"back to {back_to}")
        try:
            self._retrying(lambda: self._apply_undos(host, undos, prev, new))
        except Exception as exc:
            message = f"host {host}: {exc}"
            self._end(record, "failed", error=message)
            log.error("rollback of host failed", service=self.service, host=host, error=str(exc))
            return message
        self._end(record, "succeeded")
        self.state.rollouts.set_host_phase(release_id, host, "undone")
        self.report(f"{self.service}: {host}: rolled back to {back_to}")
        return None

    def _apply_undos(
        self, host: str, undos: Sequence[UndoKind], prev: PreviousContainer, new: str | None
    ) -> None:
        engine = self.engines[host]
        for undo in undos:
            if undo == "remove_new" and new:
                engine.containers.remove(new)  # by id or by its release's name; gone is fine
            elif undo == "start_previous" and prev.container and prev.running:
                info = engine.containers.inspect(prev.container)
                if info is None:
                    raise PipelineError(f"previous container {prev.container[:12]} is gone")
                if info.status != "running":
                    engine.containers.start(prev.container)
            elif undo == "restore_record":
                info = engine.containers.inspect(prev.container) if prev.container else None
                if info is None:
                    self.state.forget_deployment(self.service, host)
                else:
                    labels = info.labels
                    self.state.set_deployment(
                        self.service,
                        host,
                        revision=labels.get(f"{LABEL_PREFIX}revision", ""),
                        digest=labels.get(f"{LABEL_PREFIX}digest", ""),
                        ref=info.image,
                        spec_hash=labels.get(f"{LABEL_PREFIX}spec", ""),
                        container_id=info.id,
                        release_id=int(labels.get(f"{LABEL_PREFIX}release", "0") or 0) or None,
                    )

    def _retrying(self, call: Callable[[], T]) -> T:
        """Call, again (with backoff) while it fails with an error declared `retry`."""
        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.attempts)),
            wait=wait_exponential(multiplier=0.5, max=5),
            retry=retry_if_exception(lambda e: isinstance(e, PipelineError) and e.retry),
            sleep=self.sleep,
            reraise=True,
        )
        return retrying(call)

    def _step(
        self, run_id: int | None, kind: str, host: str, revision: str | None, detail: str | None
    ) -> int | None:
        if run_id is None:
            return None
        return self.state.start_step(
            run_id, kind, self.service, host=host, revision=revision, detail=detail
        )

    def _end(
        self, step: int | None, status: str, *, detail: str | None = None, error: str | None = None
    ) -> None:
        if step is not None:
            self.state.finish_step(step, status, detail=detail, error=error)
