"""Rolling a service out to its hosts behind health checks; undone on every host on any failure.

A rollout is the ordered list of per-host steps `steps.plan_rollout` decides up front (pull,
stop old, start new, check, switch; then retire once every host passed). Before any host is
touched, each host's previous container is recorded (`release_hosts`); each step's completion
is recorded as the host's phase. Any exception in any step (an error of any kind, a bug, a stop
request, a lost lease) undoes the steps every touched host reached, so the service ends on one
revision everywhere, and the release ends in a terminal state with its reason and failure kind.
A crash (kill -9) leaves the records; `recover` puts the hosts back from them.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import structlog

from pipeline.config.envfile import env_values
from pipeline.config.model import HostSection, ProxySection, ServiceSection
from pipeline.deploy.failures import (
    Aborted,
    HostFailed,
    Interrupted,
    RolloutFailed,
    failure_of,
)
from pipeline.deploy.health import (
    Probe,
    check_container,
    container_logs,
    failure_text,
    http_probe,
    probe_for,
)
from pipeline.deploy.proxy import HostProxy, recorded_routes, route_of
from pipeline.deploy.steps import (
    PHASE_AFTER,
    HostSteps,
    StepKind,
    plan_rollout,
    undo_for,
)
from pipeline.deploy.undo import HostUndo
from pipeline.errors import FailureKind, PipelineError
from pipeline.hosts.engine import LABEL_PREFIX, ContainerInfo, ContainerSpec, Engine
from pipeline.hosts.proxy import PROXY_NAME
from pipeline.proxy.routes import (
    Route,
    RouteTable,
    container_of,
    switched,
    with_standby,
    without_standby,
)
from pipeline.retry import RetryPolicy
from pipeline.state.leases import HeldLease, default_owner
from pipeline.state.rollbacks import ServiceSettings
from pipeline.state.steps import StepLog
from pipeline.state.store import PreviousContainer, State

log = structlog.get_logger(__name__)

ProbeFactory = Callable[[ServiceSection, Engine, ContainerInfo, str], Probe | None]


@dataclass(frozen=True)
class Target:
    """What a service is rolled out to: one image revision, addressed per host."""

    revision: str
    digest: str
    refs: Mapping[str, str]  # host -> image reference to run (registry@digest, or a local tag)
    spec_hash: str
    pull: bool  # False when the image was built on the host itself
    auth: Mapping[str, str] | None = None
    env_file: str | None = None  # the text of the service's env_file that spec_hash covers
    settings: ServiceSettings | None = None  # recorded with the release, for a later rollback
    restores: int | None = None  # a rollback: the release it brings back


@dataclass
class RolloutResult:
    service: str
    ok: bool
    release_id: int
    error: str | None = None
    hosts: list[str] = field(default_factory=list)
    superseded: bool = False  # gave way to a newer commit at a safe point; not a failure
    failure_kind: FailureKind | None = None  # why it failed (see `pipeline.errors.FailureKind`)
    locked: bool = False  # never started: another owner held the service's lease


def container_name(service: str, revision: str, release_id: int) -> str:
    return f"{service}-{revision[:12]}-r{release_id}"


def service_container_spec(
    service: str, spec: ServiceSection, target: Target, ref: str, release_id: int
) -> ContainerSpec:
    """The container a rollout starts for `service` at `target` (image `ref`): the env file's
    values overlaid by `env`, the config's labels plus pipeline's, ports, volumes, resources,
    network and restart policy. `pipeline exec --new` starts its one-off from the same spec."""
    env = env_values(target.env_file) if target.env_file is not None else {}
    env.update(spec.env)
    labels = dict(spec.labels)
    labels.update(
        {
            f"{LABEL_PREFIX}managed": "true",
            f"{LABEL_PREFIX}service": service,
            f"{LABEL_PREFIX}revision": target.revision,
            f"{LABEL_PREFIX}digest": target.digest,
            f"{LABEL_PREFIX}release": str(release_id),
            f"{LABEL_PREFIX}spec": target.spec_hash,
        }
    )
    return ContainerSpec(
        name=container_name(service, target.revision, release_id),
        image=ref,
        labels=labels,
        env=env,
        command=spec.command,
        ports=spec.ports,
        volumes=spec.volumes,
        cpus=spec.cpus,
        memory=spec.memory,
        network=spec.network,
        restart=spec.restart,
    )


@dataclass
class _Pass:
    """One rollout's working state: the records it keeps in memory beside `release_hosts`."""

    target: Target
    release_id: int
    run_id: int | None
    lease: HeldLease | None
    previous: dict[str, PreviousContainer] = field(default_factory=dict)
    new: dict[str, ContainerInfo] = field(default_factory=dict)
    reached: dict[str, list[StepKind]] = field(default_factory=dict)
    abort: threading.Event = field(default_factory=threading.Event)
    # A proxied service: hosts whose "new" container is a retained one started again (a
    # rollback), never removed on undo; when each host's route moved (its drain starts then).
    reused: set[str] = field(default_factory=set)
    containers: dict[str, list[ContainerInfo]] = field(default_factory=dict)  # seen by observe
    routed_at: dict[str, float] = field(default_factory=dict)
    standby: set[str] = field(default_factory=set)  # hosts whose proxy reaches the new one


@dataclass
class Rollout:
    """Executes one service's rollout; engines, probes, health timing and the clock are injected."""

    state: State
    service: str
    spec: ServiceSection
    hosts: Mapping[str, HostSection]
    engines: Mapping[str, Engine]
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    should_stop: Callable[[], bool] | None = None
    report: Callable[[str], None] = lambda _line: None
    keep_images: int = 3  # images of the service kept on each host for an instant rollback
    probe_for: ProbeFactory = probe_for
    attempts: int = 3  # tries of a step (pulls excepted) or an undo on an error declared retry
    proxy: ProxySection | None = None  # the `[proxy]` table, for a service with its own proxy table
    auth: Mapping[str, str] | None = None  # registry credentials (the proxy's image)
    # The Swarm manager that makes the service's `network` an attachable overlay (its hosts are
    # members of one Swarm: `pipeline.deploy.placement`); None: a bridge on each host.
    overlay: Engine | None = None
    # Every service of the config: a proxy made anew on a host starts with their recorded
    # routes (`proxy.recorded_routes`), not only this service's.
    services: Mapping[str, ServiceSection] = field(default_factory=dict)
    # `FILE:LINE` of a config key, for errors about the config (`LoadedConfig.locate`).
    config_at: Callable[..., str] = lambda *_key: "pipeline.toml"
    # The PEM of `[proxy] acme_ca_root`, for a host whose routes ask for ACME certificates
    # (`LoadedConfig.acme_ca_root_pem`; raises ConfigError).
    acme_root: Callable[[], bytes | None] = lambda: None

    def __post_init__(self) -> None:
        # A proxied service: each host's proxy, and its route as the config defines it.
        self.proxies: dict[str, HostProxy] = {}
        self.route: Route | None = None
        if self.spec.proxy is not None and self.proxy is not None:
            self.route = route_of(self.service, self.spec)
            self.proxies = {
                h: HostProxy(h, self.engines[h], self.proxy, self.hosts[h].reach_address,
                             self.auth, self.clock, self.sleep, self._proxy_lease(h),
                             self._seed(h), self.acme_root)
                for h in self.spec.hosts if h in self.engines
            }  # fmt: skip
        # Steps and undos are retried under the shared policy, fewer tries than a pull: they
        # talk to an engine that just answered, and a rollout should not hang on one.
        self.retry = RetryPolicy(
            attempts=max(1, self.attempts), maximum=5.0, sleep=self.sleep, clock=self.clock
        )
        self.steps = StepLog(self.state, self.service)
        self.undo = HostUndo(
            self.state,
            self.service,
            self.engines,
            self.report,
            self.retry,
            self.steps,
            self.proxies,
            self.route,
        )

    def run(
        self,
        target: Target,
        *,
        run_id: int | None,
        kind: str = "deploy",
        reason: str | None = None,
        lease: HeldLease | None = None,
    ) -> RolloutResult:
        """Roll `target` out to every host of the service; on any failure, undo every host."""
        release_id = self.state.start_release(
            self.service,
            target.revision,
            target.digest,
            target.refs.get(self.spec.hosts[0], ""),
            target.spec_hash,
            kind=kind,
            reason=reason,
            run_id=run_id,
            settings=target.settings,
            restores=target.restores,
        )
        p = _Pass(target, release_id, run_id, lease)
        p.reached = {h: [] for h in self.spec.hosts}
        bound = log.bind(service=self.service, revision=target.revision[:12], run_id=run_id)
        # A proxied service is switched by its proxy whatever `strategy` says (never stopped first).
        how = "proxy switch" if self.proxies else self.spec.strategy
        bound.info("rollout started", hosts=self.spec.hosts, strategy=how)
        try:
            self._observe(p)
            plan = plan_rollout(
                self.spec.hosts,
                strategy=self.spec.strategy,
                max_parallel=self.spec.max_parallel,
                pull=target.pull,
                previous_running={h: prev.running for h, prev in p.previous.items()},
                proxied=bool(self.proxies),
                switch_back=kind == "rollback"
                and bool(self.proxies)
                and all(self._retained(h, p) is not None for h in self.spec.hosts),
            )
            for batch in plan.batches:
                self._batch(batch, p)
        except (Exception, KeyboardInterrupt) as exc:
            # Anything else (SystemExit, a kill -9) ends the process: recovery's job.
            result = self._fail(p, exc, bound)
            if isinstance(exc, KeyboardInterrupt):
                raise
            return result
        # Every host passed its check: the point of no return.
        try:
            for host in plan.retire:
                self.retire(
                    host,
                    p.new[host],
                    release_id,
                    run_id,
                    target.revision,
                    keep=p.previous[host].container,
                    routed_at=p.routed_at.get(host),
                )
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM while the old containers drain: every host serves the new
            # release and passed its check, so the release succeeded; the old containers not
            # retired yet are left as they are (reachable by pipeline only), not undone.
            self.state.finish_release(release_id, "succeeded")
            bound.warning("rollout interrupted while retiring the old containers")
            raise
        self.state.finish_release(release_id, "succeeded")
        bound.info("rollout succeeded", hosts=self.spec.hosts)
        return RolloutResult(self.service, True, release_id, None, list(self.spec.hosts))

    def _fail(self, p: _Pass, exc: BaseException, bound: Any) -> RolloutResult:
        failure = failure_of(exc)
        cause = getattr(exc, "cause", exc)
        if not isinstance(cause, PipelineError | KeyboardInterrupt):
            bound.error(  # a bug: its traceback, as plain text
                "rollout failed on an unexpected error",
                traceback="".join(traceback.format_exception(cause)),
            )
        touched = [h for h in self.spec.hosts if undo_for(p.reached.get(h, ()))]
        problems = self._undo(p, touched)
        status, message = failure.status, failure.message
        if failure.status == "rolled_back" and not touched:
            status = "failed"  # nothing had been changed yet
        if failure.status == "superseded":
            message = f"superseded before it was healthy; rolled back ({message})"
        if problems:
            status = "failed"
            message += "\nnot put back: " + "; ".join(problems)
        self.state.finish_release(p.release_id, status, message, failure_kind=failure.kind)
        bound.error("rollout failed, rolled back", error=message, failure_kind=failure.kind,
                    hosts_rolled_back=touched)  # fmt: skip
        return RolloutResult(
            self.service,
            False,
            p.release_id,
            message,
            touched,
            failure.status == "superseded",
            failure.kind,
        )

    # -- before anything is touched ---------------------------------------------------------
    def _observe(self, p: _Pass) -> None:
        """Record every host's previous container (`release_hosts`, phase planned)."""
        hosts = self.spec.hosts
        # Each host asked at once: a round trip to every engine, where a rollback's switch waits.
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            found = list(pool.map(lambda host: self._previous(host, p), hosts))
        for host, info in zip(hosts, found, strict=True):
            labels = info.labels if info else {}
            p.previous[host] = PreviousContainer(
                host=host,
                container=info.id if info else None,
                running=info is not None and info.status == "running",
                revision=labels.get(f"{LABEL_PREFIX}revision"),
                digest=labels.get(f"{LABEL_PREFIX}digest"),
            )
        self.state.rollouts.plan_release_hosts(p.release_id, p.previous.values())

    def _previous(self, host: str, p: _Pass | None = None) -> ContainerInfo | None:
        """The container the host returns to on undo: the recorded deployment's when it runs,
        else the newest running container of the service, else the recorded one (stopped)."""
        containers = self.engines[host].containers.managed_containers(self.service)
        if p is not None:
            p.containers[host] = containers
        record = self.state.deployment(self.service, host)
        recorded = [c for c in containers if record is not None and c.id == record.container_id]
        running = [c for c in containers if c.status == "running"]
        running.sort(key=lambda c: (c in recorded, c.started_at or ""), reverse=True)
        found = running or recorded
        return found[0] if found else None

    # -- moving hosts -----------------------------------------------------------------------
    def _batch(self, batch: Sequence[HostSteps], p: _Pass) -> None:
        if len(batch) == 1:
            self._host(batch[0], p)
            return

        def guarded(hs: HostSteps) -> None:
            try:
                self._host(hs, p)
            except BaseException:
                p.abort.set()  # the others stop at their next step boundary
                raise

        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            for fut in [pool.submit(guarded, hs) for hs in batch]:
                try:
                    fut.result()
                except BaseException as exc:
                    errors.append(exc)
        crash = [e for e in errors if not isinstance(e, Exception)]
        causes = [e for e in errors if not isinstance(e, Aborted)]
        if crash or causes:
            raise (crash or causes)[0]

    def _boundary(self, p: _Pass) -> None:
        """Between two steps: stop when a sibling failed, the lease was lost, or stop is asked."""
        if p.abort.is_set():
            raise Aborted()
        if p.lease is not None:
            p.lease.check()
        if self.should_stop is not None and self.should_stop():
            raise Interrupted(f"{self.service}: asked to stop")

    def _host(self, hs: HostSteps, p: _Pass) -> None:
        for step in hs.steps:
            try:
                self._boundary(p)
            except Aborted:
                raise
            except Exception as exc:
                raise HostFailed(hs.host, step, exc, before=True) from exc
            p.reached[hs.host].append(step)
            about = self._about(step, hs.host, p)
            record = self.steps.start(p.run_id, step, hs.host, p.target.revision, about)
            try:
                detail = self._do(step, hs.host, p)
            except Aborted:
                self.steps.end(record, "failed", error="stopped: another host of the batch failed")
                raise
            except KeyboardInterrupt:
                self.steps.end(record, "failed", error="interrupted (Ctrl-C)")
                raise
            except Exception as exc:
                self.steps.end(record, "failed", error=str(exc) or type(exc).__name__)
                raise HostFailed(hs.host, step, exc) from exc
            self.steps.end(record, "succeeded", detail=detail)
            new = p.new.get(hs.host)
            self.state.rollouts.set_host_phase(
                p.release_id, hs.host, PHASE_AFTER[step], new_container=new.id if new else None
            )

    def _about(self, step: StepKind, host: str, p: _Pass) -> str | None:
        prev = p.previous[host].container
        new = p.new.get(host)
        return {
            "pull": p.target.refs[host],
            "stop": f"container {(prev or '')[:12]}",
            "start": f"strategy {self.spec.strategy}; replacing {(prev or '')[:12] or 'nothing'}",
            "health": new.name if new else None,
            "route": f"{new.name if new else '?'} (was {(prev or '')[:12] or 'nothing'})",
            "switch": new.name if new else None,
        }.get(step)

    def _do(self, step: StepKind, host: str, p: _Pass) -> str | None:
        engine, target = self.engines[host], p.target
        ref = target.refs[host]
        if step == "pull":
            # Not retried here: the engine retries its own pulls.
            if engine.has_image(ref):
                return "already on the host"
            self.report(f"{self.service}: {host}: pulling {ref}")
            engine.pull(ref, auth=target.auth)
            return None
        if step == "stop":
            prev = p.previous[host].container
            assert prev is not None
            grace = max(0, round(self.spec.stop_timeout))
            self.retry.call(lambda: engine.containers.stop(prev, timeout=grace), f"stop on {host}")
            return None
        if step == "start" and self.proxies:
            return self._start_proxied(host, p)
        if step == "start":
            network = self.spec.network
            if network not in ("bridge", "host", "none") and self.overlay is not None:
                manager = self.overlay
                self.retry.call(lambda: manager.swarm.ensure_overlay(network), "overlay network")
            elif network not in ("bridge", "host", "none"):
                self.retry.call(
                    lambda: engine.containers.ensure_network(network), f"network on {host}"
                )
            spec = self._container_spec(target, ref, p.release_id)
            new = self.retry.call(lambda: engine.containers.run(spec), f"start on {host}")
            p.new[host] = new
            self.report(f"{self.service}: {host}: started {new.name}, checking health")
            return f"container {new.name}"
        if step == "health":
            if self.proxies and host not in p.standby:
                self._reachable(host, p.new[host].name)
            return self._check(host, p)
        if step == "route":
            new = p.new[host]
            self.retry.call(lambda: self.route_to(host, new), f"route on {host}")
            p.routed_at[host] = self.clock()
            self.report(f"{self.service}: {host}: proxy routes to {new.name}")
            return f"routed to {new.name}"
        if step == "switch":
            new = p.new[host]
            self.retry.call(
                lambda: self.record_deployment(host, new, target, p.release_id),
                f"record on {host}",
            )
            return None
        raise AssertionError(f"unknown step {step}")

    def record_deployment(
        self, host: str, new: ContainerInfo, target: Target, release_id: int
    ) -> None:
        """Record `new` as what the host runs for the service (the switch step)."""
        self.state.set_deployment(
            self.service,
            host,
            revision=target.revision,
            digest=target.digest,
            ref=target.refs.get(host, new.image),
            spec_hash=target.spec_hash,
            container_id=new.id,
            release_id=release_id,
        )

    # -- a proxied service ------------------------------------------------------------------
    def _start_proxied(self, host: str, p: _Pass) -> str:
        """Start the new container on the proxy's network with no host port (or start again
        the retained container that ran this very release: a rollback is a switch), after
        making sure the host's proxy runs and the image exposes the routed port; the proxy's
        standby route to it (pipeline's own way in, for the check) is loaded meanwhile."""
        engine, target = self.engines[host], p.target
        assert self.proxy is not None and self.spec.proxy is not None
        network, port = self.proxy.network, self.spec.proxy.port
        tls = self.spec.proxy.tls != "off"
        retained = self._retained(host, p)
        if retained is None:  # checked before anything is made on the host, the proxy too
            exposed = engine.exposed_ports(target.refs[host])
            if exposed is not None and f"{port}/tcp" not in exposed:
                key = ("services", self.service, "proxy", "port")
                raise RolloutFailed(
                    f"{self.config_at(*key)}: {'.'.join(key)}: {port} is not a port the image "
                    f"exposes (EXPOSE: {', '.join(exposed) or 'none'}); host {host}: nothing "
                    "was started or switched",
                    "unhealthy",
                )
        if retained is None or tls:  # else the standby route makes it, one question fewer
            self.retry.call(lambda: self.proxies[host].ensure(tls), f"proxy on {host}")
        spec: ContainerSpec | None = None
        if retained is None:
            self.retry.call(lambda: engine.containers.ensure_network(network), f"network on {host}")
            spec = replace(self._container_spec(target, target.refs[host], p.release_id),
                           network=network)  # fmt: skip
        # The standby route is loaded while the engine starts the container: Caddy resolves an
        # upstream per request, so a route to a container not running yet is harmless, and the
        # two round trips (a reload by exec; a start) overlap instead of adding up. They are
        # most of a rollback's time per host.
        name = retained.name if retained is not None else spec.name if spec else ""
        with ThreadPoolExecutor(1, thread_name_prefix=f"standby-{host}") as pool:
            standby = pool.submit(self._reachable, host, name)
            try:
                detail = self._start_on_proxy_network(host, p, retained, spec)
            finally:
                failed = standby.exception()  # waits: the route change is never left halfway
        if failed is not None:
            raise failed
        p.standby.add(host)
        return detail

    def _start_on_proxy_network(
        self, host: str, p: _Pass, retained: ContainerInfo | None, spec: ContainerSpec | None
    ) -> str:
        engine = self.engines[host]
        if retained is not None:
            info = retained
            if retained.status != "running":
                paused = retained.status == "paused"
                self.retry.call(
                    lambda: engine.containers.start(retained.id, managed=True, paused=paused),
                    f"start on {host}",
                )
                # Unpaused, it is what it was, running (one engine call fewer); started again,
                # its start time and restart count are new.
                info = (
                    replace(retained, status="running")
                    if paused
                    else engine.containers.inspect(retained.id) or retained
                )
            p.new[host] = info
            p.reused.add(host)
            how = "resumed" if retained.status == "paused" else "started"
            self.report(f"{self.service}: {host}: {how} retained {info.name}, checking")
            return f"retained container {info.name}"
        assert spec is not None
        new = self.retry.call(lambda: engine.containers.run(spec), f"start on {host}")
        p.new[host] = new
        self.report(f"{self.service}: {host}: started {new.name}, checking health")
        return f"container {new.name}"

    def _seed(self, host: str) -> Callable[[], tuple[Route, ...]]:
        """The recorded routes a proxy made anew on `host` starts with (this service's too)."""
        services = {**self.services, self.service: self.spec}
        return lambda: recorded_routes(services, self.state, self.engines[host], host)

    def _proxy_lease(self, host: str) -> Callable[[], AbstractContextManager[None]]:
        """The lease `proxy:HOST` a change of the host's route table holds, so that another
        process changing another service's route on the same proxy waits instead of
        overwriting this change (or having this one overwrite its own)."""
        owner = default_owner()
        return lambda: self.state.leases.waiting(f"proxy:{host}", owner, sleep=self.sleep)

    def _retained(self, host: str, p: _Pass) -> ContainerInfo | None:
        """A container of the service on the host that ran this release's image and settings
        before (kept paused or stopped after it was switched away from), other than the one
        serving."""
        seen = p.containers.get(host)
        if seen is None:
            seen = self.engines[host].containers.managed_containers(self.service)
        for c in seen:
            labels = c.labels
            if (
                c.id != p.previous[host].container
                and labels.get(f"{LABEL_PREFIX}digest") == p.target.digest
                and labels.get(f"{LABEL_PREFIX}spec") == p.target.spec_hash
            ):
                return c
        return None

    def _table_change(self, host: str, change: Callable[[Route], Route]) -> RouteTable:
        """Change the service's route on the host's proxy (defined as the config says now)."""
        route = self.route
        assert route is not None

        def apply(table: RouteTable) -> RouteTable:
            current = table.route(self.service)
            return table.put(change(current.defined_as(route) if current else route))

        return self.proxies[host].change(apply)

    def _reachable(self, host: str, name: str) -> None:
        """Let pipeline, and only pipeline, reach container `name` through the host's proxy."""
        assert self.route is not None
        dial = self.route.dial(name)
        self.retry.call(
            lambda: self._table_change(host, lambda r: with_standby(r, dial)), f"proxy on {host}"
        )

    def route_to(self, host: str, new: ContainerInfo) -> None:
        """Send the host's users to `new` in one reload of its proxy (the route switch)."""
        assert self.route is not None
        dial = self.route.dial(new.name)
        self._table_change(host, lambda r: switched(r, dial))

    def _counted(self, host: str, factory: ProbeFactory) -> ProbeFactory:
        """`factory`'s probes, each attempt told to whoever shows progress (the CLI's terminal
        view: "web: lab-1: health: attempt 3" beside the elapsed time)."""
        progress = self.engines[host].progress
        if progress is None:
            return factory

        def make(
            service: ServiceSection, engine: Engine, container: ContainerInfo, address: str
        ) -> Probe | None:
            probe = factory(service, engine, container, address)
            if probe is None:
                return None
            attempts = itertools.count(1)

            def counted() -> tuple[bool, str]:
                progress(f"{self.service}: {host}: health", next(attempts), None)
                return probe()

            return counted

        return make

    def _proxied_probe(self, host: str) -> ProbeFactory:
        """An http check on a path goes through the host's proxy, by the Host that only reaches
        the container under check: it needs no published port and works on any host."""
        hp = self.proxies[host]

        def factory(
            service: ServiceSection, engine: Engine, container: ContainerInfo, address: str
        ) -> Probe | None:
            http = service.health.http
            if http is None or not http.startswith("/"):
                return self.probe_for(service, engine, container, address)
            return http_probe(
                hp.url(http),
                service.health.expect_status,
                headers=hp.probe_headers(hp.token, container.name),
                shown=f"{http} of {container.name} through {PROXY_NAME} on {hp.url('')}",
            )

        return factory

    def _check(self, host: str, p: _Pass) -> str:
        """Hold the new container to its health gate; raise RolloutFailed (unhealthy or crashed)
        with the check's last result and the container's last log lines."""
        engine, new = self.engines[host], p.new[host]

        def stop() -> bool:
            return (
                p.abort.is_set()
                or (p.lease is not None and p.lease.lost)
                or (self.should_stop is not None and self.should_stop())
            )

        spec = self.spec
        if host in p.reused:  # known good: it passed its window when it was first deployed
            spec = msgspec.structs.replace(
                spec, health=msgspec.structs.replace(spec.health, monitor=0.0)
            )
        result = check_container(
            spec,
            engine,
            new,
            self.hosts[host].reach_address,
            clock=self.clock,
            sleep=self.sleep,
            should_stop=stop,
            probe_for=self._counted(
                host, self._proxied_probe(host) if self.proxies else self.probe_for
            ),
        )
        if result.healthy:
            self.report(f"{self.service}: {host}: healthy ({result.detail})")
            log.info("host healthy", service=self.service, host=host, container=new.name,
                     detail=result.detail)  # fmt: skip
            return result.detail
        if result.failure_kind is None and stop():
            self._boundary(p)  # raises what asked the check to stop
        kind: FailureKind = result.failure_kind or "unhealthy"
        log.error("health check failed", service=self.service, host=host, detail=result.detail,
                  kind=kind)  # fmt: skip
        raise RolloutFailed(
            f"host {host}: {self.service} at {p.target.revision[:12]} "
            + failure_text(result, new.name, container_logs(engine, new.id)),
            kind,
        )

    def _container_spec(self, target: Target, ref: str, release_id: int) -> ContainerSpec:
        return service_container_spec(self.service, self.spec, target, ref, release_id)

    # -- after every host passed ------------------------------------------------------------
    def retire(
        self,
        host: str,
        new: ContainerInfo,
        release_id: int,
        run_id: int | None,
        revision: str,
        *,
        keep: str | None = None,
        routed_at: float | None = None,
    ) -> None:
        """Remove the service's other containers on the host and prune its old images; past
        the point of no return, so a failure here is a warning, not a rollback. A proxied
        service's previous container (`keep`) is first drained (until the proxy has no request
        in flight to it, or `drain` after `routed_at`), then paused or stopped (`retain`) and kept
        for a rollback."""
        engine = self.engines[host]
        record = self.steps.start(run_id, "retire", host, revision, None)
        problems: list[str] = []
        kept: str | None = None
        try:
            if self.proxies and keep:
                kept = self._drain_and_retain(host, keep, new, routed_at, problems)
            for c in engine.containers.managed_containers(self.service):
                if c.id != new.id and c.id != kept:
                    try:
                        engine.containers.remove(c.id)
                    except PipelineError as exc:
                        problems.append(f"could not remove {c.name}: {exc}")
            for image_id, _created in engine.images_labelled("dev.pipeline.image", self.spec.image)[
                self.keep_images :
            ]:
                try:
                    engine.remove_image(image_id)  # one still in use is left alone
                except PipelineError as exc:
                    problems.append(f"could not prune image {image_id}: {exc}")
        except Exception as exc:  # past the point of no return: a warning, whatever it is
            problems.append(str(exc) or type(exc).__name__)
        for problem in problems:
            log.warning("retire incomplete", service=self.service, host=host, problem=problem)
        self.steps.end(record, "succeeded", detail="; ".join(problems) or None)
        self.state.rollouts.set_host_phase(release_id, host, "retired")

    def _drain_and_retain(
        self,
        host: str,
        keep: str,
        new: ContainerInfo,
        routed_at: float | None,
        problems: list[str],
    ) -> str | None:
        """Wait out the old container's requests in flight (up to `drain`), pause or stop it
        (`retain`), and leave it reachable by pipeline alone (a rollback checks it there);
        return its id."""
        assert self.spec.proxy is not None
        engine, hp = self.engines[host], self.proxies[host]
        old = engine.containers.inspect(keep)
        if old is None or old.id == new.id:
            return None
        table = hp.table()
        route = table.route(self.service) if table else None
        dials = [d for d in (route.standby if route else ()) if container_of(d) == old.name]
        left = None
        if table is not None and dials and old.status == "running":
            until = (routed_at if routed_at is not None else self.clock()) + self.spec.proxy.drain
            busy = hp.in_flight(table.token, dials[0])
            if busy:  # a wait of up to `drain` the user should not have to guess at
                self.report(
                    f"{self.service}: {host}: draining {old.name}: {busy} request(s) in flight, "
                    f"waiting up to {max(0.0, until - self.clock()):.0f}s"
                )
            left = hp.drain(table.token, dials[0], until) if busy != 0 else 0
            if left:
                problems.append(
                    f"{old.name}: {left} request(s) still in flight after the drain: stopped, "
                    "not paused"
                )
        # Paused, a container would hold its requests still in flight open for ever (their
        # clients hang); stopped, its app ends them (SIGTERM) and their clients get an answer.
        self._retain(host, old, pause=not left)
        kept = dials[:1]
        self._table_change(
            host,
            lambda r: replace(r, standby=tuple(kept)) if r.upstream else without_standby(r),
        )
        return old.id

    def _retain(self, host: str, old: ContainerInfo, *, pause: bool = True) -> None:
        """Keep `old` for a rollback as `retain` says: paused (frozen, resumed in milliseconds)
        or stopped (SIGTERM, then SIGKILL after `stop_timeout`); stopped whatever it says when
        not `pause`."""
        assert self.spec.proxy is not None
        containers = self.engines[host].containers
        paused = pause and self.spec.proxy.retain == "paused"
        if old.status == "running" and paused:
            containers.pause(old.id)
        elif old.status in ("running", "paused") and not paused:
            containers.stop(old.id, timeout=max(0, round(self.spec.stop_timeout)))

    # -- undo -------------------------------------------------------------------------------
    def _undo(self, p: _Pass, hosts: Sequence[str]) -> list[str]:
        """Undo, host by host (the last moved first), the steps each reached; return what
        could not be put back."""
        problems = []
        for host in reversed(hosts):
            new = p.new.get(host)
            fresh = new.id if new else container_name(self.service, p.target.revision, p.release_id)
            error = self.undo.undo_host(
                host,
                undo_for(p.reached[host]),
                p.previous[host],
                None if host in p.reused else fresh,  # a retained container stays retained
                p.release_id,
                p.run_id,
            )
            if error:
                problems.append(error)
            elif host in p.reused and new is not None and self.proxies:
                # A retained container that failed its check again goes back to being retained
                # (its route was switched back first), not left running beside the serving one.
                try:
                    self._retain(host, new)
                except PipelineError as exc:
                    problems.append(f"host {host}: {new.name} could not be retained again: {exc}")
        return problems
