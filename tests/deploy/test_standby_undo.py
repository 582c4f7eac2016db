"""Undo of a proxied host whose new container was never made (pure: doubles for the engine and
the proxy; the real proxy's undo is covered by tests/deploy/test_proxy.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

from pipeline.deploy.proxy import HostProxy
from pipeline.deploy.undo import HostUndo
from pipeline.hosts.engine import Engine
from pipeline.proxy.routes import Route, RouteTable
from pipeline.retry import RetryPolicy
from pipeline.state.steps import StepLog
from pipeline.state.store import PreviousContainer, State


class _Containers:
    def __init__(self) -> None:
        self.removed: list[str] = []

    def inspect(self, _ref: str) -> None:
        return None  # the engine refused to create it: there is nothing to inspect

    def remove(self, ref: str) -> None:
        self.removed.append(ref)


class _Engine:
    def __init__(self) -> None:
        self.containers = _Containers()


class _Proxy:
    """A host proxy holding a route table in memory."""

    def __init__(self, table: RouteTable) -> None:
        self.table = table

    def change(self, change: Callable[[RouteTable], RouteTable]) -> RouteTable:
        self.table = change(self.table)
        return self.table


def test_a_standby_route_to_a_container_never_made_is_dropped_on_undo(tmp_path: Path) -> None:
    """The standby route is loaded while the container starts; when the engine never made the
    container, undoing the host still drops the route naming it (by its release's name), so
    `proxy status` lists no upstream that does not exist."""
    route = Route("web", ("web.test",), "/", 8080, "off", upstream="web-old-r1:8080",
                  standby=("web-new-r2:8080",))  # fmt: skip
    proxy = _Proxy(RouteTable("t0ken", (route,)))
    engine = _Engine()
    state = State.in_dir(tmp_path)
    phases: list[tuple[int, str, str]] = []
    state.rollouts.set_host_phase = lambda rel, host, phase, **_: phases.append(  # type: ignore[method-assign]
        (rel, host, phase)
    )
    undo = HostUndo(
        state=state,
        service="web",
        engines={"h1": cast(Engine, engine)},
        report=lambda _line: None,
        retry=RetryPolicy(sleep=lambda _s: None),
        steps=StepLog(state, "web"),
        proxies={"h1": cast(HostProxy, proxy)},
        route=route,
    )
    previous = PreviousContainer("h1", container=None, running=False, revision=None, digest=None)
    assert undo.undo_host("h1", ("remove_new",), previous, "web-new-r2", 1, None) is None
    assert engine.containers.removed == ["web-new-r2"] and phases == [(1, "h1", "undone")]
    kept = proxy.table.route("web")
    assert kept is not None and kept.standby == () and kept.upstream == "web-old-r1:8080"
