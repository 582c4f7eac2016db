"""An engine double for rollout tests: a fake of the `Engine` methods a rollout uses, keeping
containers and images in memory, with faults injectable at any call on any host.

A fault fires once, at the n-th call of a method on a host, with a kind: an error the engine
declares transient or stalling, an unexpected exception (a bug), a stop request, a lost lease,
or a crash (`Crash`, a BaseException standing in for kill -9: from then on every call of every
double raises it, until `World.restart()`, as if the process were gone).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.config.model import ServiceSection
from pipeline.deploy.health import Probe
from pipeline.errors import StallingError
from pipeline.hosts.engine import LABEL_PREFIX, ContainerInfo, ContainerSpec, EngineError

KINDS = ("transient", "stalling", "unexpected", "stop", "lease_lost", "crash_before", "crash_after")


class Crash(BaseException):  # noqa: N818 - named for what it simulates
    """The process died here (kill -9): nothing after it runs, no undo, no record."""


@dataclass
class Fault:
    host: str
    method: str  # an engine method, "probe", "probe_build", or "set_deployment" (the state)
    kind: str
    after: str | None = None  # fires at the first call once a call of this method was seen
    fired: bool = False


@dataclass
class Clock:
    """Monotonic time that only moves when the code under test sleeps."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclass
class FakeLease:
    """A held lease that is lost when a fault of kind lease_lost fires."""

    lost: bool = False

    def check(self) -> None:
        from pipeline.state.leases import LeaseLost

        if self.lost:
            raise LeaseLost("service:web: lease lost to thief:9 while held; stopping")


@dataclass
class World:
    """Every double of one test, the faults, and what the probes answer."""

    faults: list[Fault] = field(default_factory=list)
    crashed: bool = False
    stop_requested: bool = False
    lease: FakeLease = field(default_factory=FakeLease)
    bad_images: set[str] = field(default_factory=set)  # their /health answers 404...
    bad_hosts: set[str] = field(default_factory=set)  # ...on these hosts (all when empty)
    exiting_images: set[str] = field(default_factory=set)  # their containers exit at once
    calls: list[tuple[str, str]] = field(default_factory=list)
    hosts: dict[str, EngineDouble] = field(default_factory=dict)

    def engine(self, host: str) -> EngineDouble:
        return self.hosts.setdefault(host, EngineDouble(host, self))

    def restart(self) -> None:
        """The process is started again: calls work, faults are spent."""
        self.crashed = False
        self.stop_requested = False
        for f in self.faults:
            f.fired = True

    def count(self, host: str, method: str) -> int:
        return sum(1 for h, m in self.calls if h == host and m == method)

    def call(self, host: str, method: str, perform: Callable[[], Any]) -> Any:
        """Record a call, fire a due fault, else perform it."""
        if self.crashed:
            raise Crash(f"{host}.{method}: the process is gone")
        self.calls.append((host, method))
        for f in self.faults:
            if f.fired or f.host != host or f.method != method:
                continue
            if f.after is not None and not any(m == f.after for _h, m in self.calls[:-1]):
                continue
            f.fired = True
            where = f"host {host}: {method}"
            if f.kind == "transient":
                raise EngineError(f"{where}: connection reset by peer")
            if f.kind == "stalling":
                raise StallingError(f"{where}: refused by the engine")
            if f.kind == "unexpected":
                raise RuntimeError(f"{where}: a bug")
            if f.kind == "stop":
                self.stop_requested = True
            elif f.kind == "lease_lost":
                self.lease.lost = True
            elif f.kind == "crash_before":
                self.crashed = True
                raise Crash(f"{where}: killed before it ran")
            elif f.kind == "crash_after":
                result = perform()
                self.crashed = True
                raise Crash(f"{where}: killed after it ran ({result!r})")
        return perform()

    # -- what the hosts run ---------------------------------------------------------------
    def running(self, service: str) -> dict[str, list[ContainerInfo]]:
        """Host -> the service's running containers."""
        return {
            name: [c for c in eng.boxes.values() if c.status == "running"
                   and c.labels.get(f"{LABEL_PREFIX}service") == service]
            for name, eng in self.hosts.items()
        }  # fmt: skip


_ids = itertools.count(1)


class EngineDouble:
    """The `Engine` methods a rollout calls, over in-memory containers and images."""

    def __init__(self, name: str, world: World) -> None:
        self.name = name
        self.world = world
        self.boxes: dict[str, ContainerInfo] = {}
        self.images: set[str] = set()
        self.ports = itertools.count(32768)
        self.progress = None  # as an Engine nobody shows progress for (`Engine.progress`)

    def _call(self, method: str, perform: Callable[[], Any]) -> Any:
        return self.world.call(self.name, method, perform)

    def _find(self, ref: str) -> ContainerInfo | None:
        if ref in self.boxes:
            return self.boxes[ref]
        return next((c for c in self.boxes.values() if c.name == ref), None)

    # -- set-up by tests ------------------------------------------------------------------
    def add(self, spec: ContainerSpec, status: str = "running") -> ContainerInfo:
        """A container as a previous rollout left it."""
        self.images.add(spec.image)
        info = self._create(spec, status)
        return info

    def _create(self, spec: ContainerSpec, status: str) -> ContainerInfo:
        cid = f"c{next(_ids):04d}{'0' * 60}"
        ports = {"8080/tcp": next(self.ports)} if status == "running" else {}
        info = ContainerInfo(
            id=cid, name=spec.name, image=spec.image, status=status, health=None,
            exit_code=3 if status == "exited" else None,
            labels={**spec.labels, f"{LABEL_PREFIX}managed": "true"}, ports=ports,
            started_at=f"2026-01-01T00:00:{next(_ids) % 60:02d}Z",
        )  # fmt: skip
        self.boxes[cid] = info
        return info

    def _set(self, cid: str, **changes: Any) -> None:
        self.boxes[cid] = replace(self.boxes[cid], **changes)

    # -- the Engine methods ---------------------------------------------------------------
    def has_image(self, ref: str) -> bool:
        return bool(self._call("has_image", lambda: ref in self.images))

    def pull(self, ref: str, *, auth: Mapping[str, str] | None) -> str:
        def perform() -> str:
            self.images.add(ref)
            return f"sha256:{abs(hash(ref)):x}"

        return str(self._call("pull", perform))

    @property
    def containers(self) -> EngineDouble:
        """The container half of the `Engine` interface (`engine.containers`): the double."""
        return self

    def last_exit_code(self, container_id: str) -> int | None:
        info = self._find(container_id)
        return info.exit_code if info is not None else None

    def managed_containers(self, service: str | None = None, *, all: bool = True) -> list[Any]:
        def perform() -> list[ContainerInfo]:
            key = f"{LABEL_PREFIX}service"
            return [c for c in self.boxes.values() if service in (None, c.labels.get(key))]

        return list(self._call("managed_containers", perform))

    def inspect(self, container_id: str) -> ContainerInfo | None:
        return self._call("inspect", lambda: self._find(container_id))  # type: ignore[no-any-return]

    def ensure_network(self, name: str) -> None:
        self._call("ensure_network", lambda: None)

    def stop(self, container_id: str, timeout: int = 10) -> None:
        def perform() -> None:
            c = self._find(container_id)
            if c is not None:
                self._set(c.id, status="exited", exit_code=0, ports={})

        self._call("stop", perform)

    def start(self, container_id: str) -> None:
        def perform() -> None:
            c = self._find(container_id)
            if c is None:
                raise StallingError(f"host {self.name}: container {container_id} is gone")
            self._set(c.id, status="running", exit_code=None, ports={"8080/tcp": next(self.ports)})

        self._call("start", perform)

    def run(self, spec: ContainerSpec) -> ContainerInfo:
        def perform() -> ContainerInfo:
            existing = self._find(spec.name)
            if existing is not None:
                del self.boxes[existing.id]
            if spec.image not in self.images:
                raise StallingError(f"host {self.name}: no such image {spec.image}")
            status = "exited" if spec.image in self.world.exiting_images else "running"
            return self._create(spec, status)

        return self._call("run", perform)  # type: ignore[no-any-return]

    def remove(self, container_id: str) -> None:
        def perform() -> None:
            c = self._find(container_id)
            if c is not None:
                del self.boxes[c.id]

        self._call("remove", perform)

    def logs_tail(self, container_id: str, lines: int = 20) -> str:
        return str(self._call("logs_tail", lambda: "GET /health 404"))

    def images_labelled(self, label: str, value: str) -> list[tuple[str, int]]:
        return list(self._call("images_labelled", lambda: []))

    def remove_image(self, ref: str) -> None:
        self._call("remove_image", lambda: None)


def probe_for(world: World) -> Callable[[ServiceSection, Any, ContainerInfo, str], Probe]:
    """A probe factory over the doubles: like the real one, it cannot be built for a container
    without its port published; the probe answers 404 for `bad_images`, else 200."""

    def build(spec: ServiceSection, engine: Any, container: ContainerInfo, address: str) -> Probe:
        def make() -> Probe:
            if "8080/tcp" not in container.ports:
                raise StallingError(
                    f"service container {container.name}: container port 8080 is not published "
                    "(published: none)"
                )

            def probe() -> tuple[bool, str]:
                def answer() -> tuple[bool, str]:
                    current = engine._find(container.id)
                    if current is None or current.status != "running":
                        return False, "connection refused"
                    bad = current.image in world.bad_images and (
                        not world.bad_hosts or engine.name in world.bad_hosts
                    )
                    return (not bad), f"GET /health -> {404 if bad else 200}"

                result: tuple[bool, str] = world.call(engine.name, "probe", answer)
                return result

            return probe

        built: Probe = world.call(engine.name, "probe_build", make)
        return built

    return build


def spec_of(service: str, revision: str, release: int, image: str) -> ContainerSpec:
    """The spec of a container a rollout of `revision` (release `release`) would have made."""
    return ContainerSpec(
        name=f"{service}-{revision[:12]}-r{release}",
        image=image,
        labels={
            f"{LABEL_PREFIX}service": service,
            f"{LABEL_PREFIX}revision": revision,
            f"{LABEL_PREFIX}digest": f"sha256:{revision[:8]}",
            f"{LABEL_PREFIX}release": str(release),
            f"{LABEL_PREFIX}spec": "spec-old",
        },
        ports=["8080"],
    )
