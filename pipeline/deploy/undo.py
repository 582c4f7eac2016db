"""Putting one host back, and the step records of a rollout: shared by a failing rollout and by
crash recovery, which calls `HostUndo.undo_host` with what `release_hosts` recorded."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from pipeline.deploy.proxy import HostProxy
from pipeline.deploy.steps import UndoKind
from pipeline.errors import PipelineError
from pipeline.hosts.engine import LABEL_PREFIX, Engine
from pipeline.proxy.routes import Route, RouteTable, container_of, switched, without_standby
from pipeline.retry import RetryPolicy
from pipeline.state.steps import StepLog
from pipeline.state.store import PreviousContainer, State

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class HostUndo:
    """Puts a host of `service` back on its recorded previous container; each undo is
    idempotent, and one that fails with an error declared transient is retried by `retry`."""

    state: State
    service: str
    engines: Mapping[str, Engine]
    report: Callable[[str], None]
    retry: RetryPolicy
    steps: StepLog
    # A proxied service: each host's proxy, and the service's route as the config defines it.
    proxies: Mapping[str, HostProxy] = field(default_factory=dict)
    route: Route | None = None

    def undo_host(
        self,
        host: str,
        undos: Sequence[UndoKind],
        prev: PreviousContainer,
        new: str | None,
        release_id: int,
        run_id: int | None,
    ) -> str | None:
        """Apply `undos` (in order) on `host`, `new` being the new container's id or name;
        return None when done, else why it could not be (the host then needs another try)."""
        back_to = (prev.revision or "?")[:12] if prev.container else "nothing"
        record = self.steps.start(run_id, "rollback", host, None, f"back to {back_to}")
        try:
            self.retry.call(
                lambda: self._apply_undos(host, undos, prev, new), f"undo on host {host}"
            )
        except Exception as exc:
            message = f"host {host}: {exc}"
            self.steps.end(record, "failed", error=message)
            log.error("rollback of host failed", service=self.service, host=host, error=str(exc))
            return message
        self.steps.end(record, "succeeded")
        self.state.rollouts.set_host_phase(release_id, host, "undone")
        self.report(f"{self.service}: {host}: rolled back to {back_to}")
        return None

    def _apply_undos(
        self, host: str, undos: Sequence[UndoKind], prev: PreviousContainer, new: str | None
    ) -> None:
        engine = self.engines[host]
        for undo in undos:
            if undo == "route_back" and host in self.proxies:
                self._route_back(host, prev, new)
            elif undo == "remove_new" and new:
                info = engine.containers.inspect(new) if host in self.proxies else None
                engine.containers.remove(new)  # by id or by its release's name; gone is fine
                if host in self.proxies:
                    # The standby route is loaded while the container starts: it may name a
                    # container that was never made (then `new` is its release's name).
                    self._forget(host, info.name if info is not None else new)
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

    def _route_back(self, host: str, prev: PreviousContainer, new: str | None) -> None:
        """Send the host's users back to the previous container (to nothing when there was
        none, or it was not running), in one reload; the new one is no longer reachable."""
        engine, route = self.engines[host], self.route
        assert route is not None
        before = engine.containers.inspect(prev.container) if prev.container else None
        back = before.name if before is not None and prev.running else None
        gone = engine.containers.inspect(new) if new else None

        def change(table: RouteTable) -> RouteTable:
            current = table.route(self.service)
            base = current.defined_as(route) if current else route
            dial = None
            if back is not None:  # on the port it was reached on before, if the table knows it
                known = [d for d in (base.upstream, *base.standby) if d and container_of(d) == back]
                dial = known[0] if known else route.dial(back)
            moved = switched(base, dial)
            return table.put(without_standby(moved, (gone.name,)) if gone else moved)

        self.proxies[host].change(change)

    def _forget(self, host: str, name: str) -> None:
        def change(table: RouteTable) -> RouteTable:
            current = table.route(self.service)
            return table.put(without_standby(current, (name,))) if current else table

        self.proxies[host].change(change)
