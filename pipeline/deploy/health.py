"""Health checks: a probe is one check returning (ok, detail); `wait_healthy` polls it.

Probes never raise: any failure (refused connection, engine error) is a failed check whose detail
says what happened, so the last detail can be shown to a user as the reason a rollout failed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from pipeline.config.model import ServiceSection, parse_port
from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.engine import ContainerInfo, Engine
from pipeline.redact import redact

Probe = Callable[[], tuple[bool, str]]


@dataclass(frozen=True)
class HealthResult:
    """The outcome of waiting: healthy or not, the last check's detail, attempts, seconds waited."""

    healthy: bool
    detail: str
    attempts: int
    elapsed: float


def _refused_or(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return "connection refused" if "refused" in text.lower() else text


def http_probe(url: str, expect: Sequence[int] = (), timeout: float = 2.0) -> Probe:
    """GET `url` without following redirects; ok on a status in `expect`, else on any 2xx/3xx."""
    shown = redact(url)
    wanted = frozenset(expect)

    def check() -> tuple[bool, str]:
        try:
            # trust_env=False: a proxy from the environment must not stand between us and the host.
            with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
                status = client.get(url).status_code
        except httpx.TimeoutException:
            return False, f"GET {shown}: timed out after {timeout:g}s"
        except httpx.HTTPError as exc:
            return False, f"GET {shown}: {_refused_or(exc)}"
        ok = status in wanted if wanted else 200 <= status < 400
        return ok, f"GET {shown} -> {status}"

    return check


def tcp_probe(host: str, port: int, timeout: float = 2.0) -> Probe:
    """Open a TCP connection to host:port; ok when it is accepted."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def check() -> tuple[bool, str]:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True, f"TCP {where} open"
        except TimeoutError:
            return False, f"TCP {where}: timed out after {timeout:g}s"
        except OSError as exc:
            return False, f"TCP {where}: {_refused_or(exc)}"

    return check


def cmd_probe(engine: Engine, container_id: str, cmd: Sequence[str]) -> Probe:
    """Run `cmd` inside the container; ok when it exits 0."""
    shown = " ".join(cmd)

    def check() -> tuple[bool, str]:
        try:
            code, output = engine.containers.exec(container_id, cmd)
        except PipelineError as exc:
            return False, f"{shown}: {exc}"
        last = output.strip().splitlines()[-1:] or [""]
        return code == 0, f"{shown} -> exit {code}" + (f": {last[0][:200]}" if last[0] else "")

    return check


def docker_probe(engine: Engine, container_id: str) -> Probe:
    """Ok when the image's own HEALTHCHECK reports "healthy" ("starting"/"unhealthy" fail)."""

    def check() -> tuple[bool, str]:
        try:
            info = engine.containers.inspect(container_id)
        except PipelineError as exc:
            return False, str(exc)
        if info is None:
            return False, "container is gone"
        if info.health is None:
            return False, "the image has no HEALTHCHECK (configure an http, tcp or cmd check)"
        return info.health == "healthy", f"docker health status: {info.health}"

    return check


def running_probe(engine: Engine, container_id: str) -> Probe:
    """Ok while the container is running (the check used when none is configured)."""

    def check() -> tuple[bool, str]:
        try:
            info = engine.containers.inspect(container_id)
        except PipelineError as exc:
            return False, str(exc)
        return (info is not None and info.status == "running"), _state(info)

    return check


def _state(info: ContainerInfo | None) -> str:
    if info is None:
        return "container is gone"
    if info.exit_code is not None:
        return f"container {info.status} with code {info.exit_code}"
    return f"container {info.status}"


FIRST_PAUSE = 0.05  # seconds before the second probe; doubles until the first success


def wait_healthy(
    probe: Probe,
    *,
    interval: float,
    timeout: float,
    threshold: int,
    alive: Callable[[], str | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    should_stop: Callable[[], bool] | None = None,
) -> HealthResult:
    """Probe at once, then every `interval` s, until `threshold` consecutive successes (healthy)
    or `timeout` s pass (unhealthy); a dead container (`alive()` gives a reason) fails at once.

    Until the first success the pause starts at `FIRST_PAUSE` and doubles up to `interval`: most
    apps answer within a few hundred milliseconds of starting, and a deploy should not wait out
    a whole interval for an app that was ready just after the first probe."""
    start = clock()
    deadline = start + timeout
    attempts = streak = 0
    pause = min(FIRST_PAUSE, interval)
    detail = "not checked"
    while True:
        if should_stop is not None and should_stop():
            return HealthResult(False, "interrupted", attempts, clock() - start)
        reason = alive() if alive is not None else None
        if reason:
            return HealthResult(False, reason, attempts, clock() - start)
        try:
            ok, detail = probe()
        except PipelineError as exc:  # probes should not raise; a custom one might
            ok, detail = False, str(exc)
        attempts += 1
        streak = streak + 1 if ok else 0
        now = clock()
        if streak >= threshold:
            return HealthResult(True, detail, attempts, now - start)
        if now >= deadline:
            return HealthResult(False, detail, attempts, now - start)
        if streak:
            pause = interval  # between consecutive successes: the configured interval
        sleep(max(0.0, min(pause, deadline - now)))
        pause = min(interval, pause * 2)


def _host_port(
    service: ServiceSection, container: ContainerInfo, container_port: int | None
) -> int:
    """The port to reach `container_port` (default: the service's first port) from outside."""
    if container_port is None:
        if service.ports:
            container_port = parse_port(service.ports[0]).container_port
        elif container.ports:
            return next(iter(container.ports.values()))
        else:
            raise StallingError(
                f"service container {container.name}: the health check needs a port "
                "(set health.port or publish one in 'ports')"
            )
    if service.network == "host":
        return container_port
    for key in (f"{container_port}/tcp", f"{container_port}/udp"):
        if key in container.ports:
            return container.ports[key]
    raise StallingError(
        f"service container {container.name}: container port {container_port} is not published "
        f"(published: {', '.join(container.ports) or 'none'})"
    )


def probe_for(
    service: ServiceSection, engine: Engine, container: ContainerInfo, host_address: str
) -> Probe:
    """The probe a service's `[health]` table asks for, aimed at its container on that host."""
    health = service.health
    host = f"[{host_address}]" if ":" in host_address else host_address
    if health.http is not None:
        if health.http.startswith("/"):
            port = _host_port(service, container, health.port)
            url = f"http://{host}:{port}{health.http}"
        else:
            url = health.http
        return http_probe(url, health.expect_status)
    if health.tcp is not None:
        return tcp_probe(host_address, _host_port(service, container, health.tcp))
    if health.cmd is not None:
        return cmd_probe(engine, container.id, health.cmd)
    if health.docker:
        return docker_probe(engine, container.id)
    return running_probe(engine, container.id)
