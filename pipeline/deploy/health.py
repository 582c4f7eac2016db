"""Health checks: a probe is one check returning (ok, detail); `wait_healthy` is the gate a new
container must pass: its check passes within `timeout`, then it stays up, unrestarted and passing
for the `monitor` window; a crash (exited, dead, restarting, OOM-killed, restarted) fails at once.

Probes never raise: any failure (refused connection, engine error) is a failed check whose detail
says what happened, so the last detail can be shown to a user as the reason a rollout failed.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import requests

from pipeline.config.model import ServiceSection, parse_port
from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.engine import ContainerInfo, Engine
from pipeline.redact import redact

Probe = Callable[[], tuple[bool, str]]
# The health gate's verdicts: the application-failure half of `pipeline.errors.FailureKind`.
GateFailure = Literal["crashed", "unhealthy"]
CRASHED: GateFailure = "crashed"  # exited, dead, restarting, OOM-killed or restarted
UNHEALTHY: GateFailure = "unhealthy"  # kept running, but its check did not pass (or stopped)
ContainerState = Callable[[], ContainerInfo | None]  # None: gone; PipelineError: no news
LOG_LINES = 50  # container log lines shown with a failure
STATE_POLL = 0.25  # seconds between looks at the container while probes are further apart
FIRST_PAUSE = 0.05  # seconds before the second probe; doubles until the first success


class ProbeTargetError(StallingError):
    """The check has nothing to aim at (the port it needs is not published): a failure of this
    revision's settings, kept out like an unhealthy one, not retried as infrastructure."""

    failure_kind = "unhealthy"


@dataclass(frozen=True)
class HealthResult:
    """The gate's outcome: healthy or not; `detail` says why it failed (or what passed);
    `last_check` is the probe's last result; `failure_kind` is None when healthy or interrupted."""

    healthy: bool
    detail: str
    attempts: int
    elapsed: float
    failure_kind: GateFailure | None = None
    last_check: str = "not checked"


def _refused_or(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return "connection refused" if "refused" in text.lower() else text


def http_probe(
    url: str,
    expect: Sequence[int] = (),
    timeout: float = 2.0,
    headers: Mapping[str, str] | None = None,
    shown: str | None = None,
) -> Probe:
    """GET `url` (with `headers`, e.g. the Host a proxy routes by) without following redirects;
    ok on a status in `expect`, else on any 2xx/3xx. `shown` names the target in the result's
    detail when the URL alone would mislead (a proxy's address that reaches the container
    under check only by a Host header no one else sends), else the URL; redacted either way."""
    shown = redact(shown or url)
    sent = dict(headers or {})
    wanted = frozenset(expect)
    plain = url.startswith("http://")

    def check() -> tuple[bool, str]:
        try:
            # requests, not httpx: the docker SDK has loaded it already, and a rollback should
            # not pay for importing a second HTTP stack before its first probe (~0.3 s here).
            # trust_env=False: a proxy from the environment must not stand between us and the host.
            # A plain-http URL never uses TLS: no CA bundle to load (~20 ms a probe).
            with requests.Session() as session:
                session.trust_env = False
                status = session.get(url, headers=sent, timeout=timeout, allow_redirects=False,
                                     verify=not plain).status_code  # fmt: skip
        except requests.Timeout:
            return False, f"GET {shown}: timed out after {timeout:g}s"
        except requests.RequestException as exc:
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


def crash_reason(info: ContainerInfo | None, restarts: int = 0) -> str | None:
    """Why a container counts as crashed, or None: gone, exited, dead, restarting, OOM-killed, or
    restarted more often than the `restarts` it had when the gate began."""
    if info is None:
        return "container is gone"
    code = "exit code unknown" if info.exit_code is None else f"exit code {info.exit_code}"
    if info.oom_killed:
        code = f"OOMKilled: out of memory, {code}"
    times = f"{info.restart_count} time{'' if info.restart_count == 1 else 's'}"
    if info.status in ("exited", "dead"):
        return f"container {info.status} ({code})"
    if info.status == "restarting":
        return f"container exited and is restarting ({code}; restarted {times})"
    if info.restart_count > restarts:
        return f"container exited and was restarted ({code}; restarted {times})"
    if info.oom_killed:
        return f"container was killed ({code})"
    return None


def _state(info: ContainerInfo | None) -> str:
    if info is None:
        return "container is gone"
    if info.exit_code is not None:
        return f"container {info.status} with code {info.exit_code}"
    return f"container {info.status}"


def _observe(state: ContainerState | None) -> tuple[bool, ContainerInfo | None, str]:
    """(known, info, why not known): an engine error is no news, not a crash."""
    if state is None:
        return False, None, "not watched"
    try:
        return True, state(), ""
    except PipelineError as exc:
        return False, None, str(exc)


def _run_probe(
    probe: Probe | None, known: bool, info: ContainerInfo | None, why: str
) -> tuple[bool | None, str]:
    """Run the probe; with none configured the check is "the container runs" (None: no news)."""
    if probe is None:
        if not known:
            return None, f"container state unknown: {why}"
        return info is not None and info.status == "running", _state(info)
    try:
        return probe()
    except PipelineError as exc:  # probes should not raise; a custom one might
        return False, str(exc)


def wait_healthy(
    probe: Probe | None,
    *,
    interval: float,
    timeout: float,
    threshold: int,
    monitor: float = 0.0,
    state: ContainerState | None = None,
    restarts: int = 0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    should_stop: Callable[[], bool] | None = None,
) -> HealthResult:
    """The health gate, pure: probe at once, then every `interval` s, until `threshold`
    consecutive passes (or `timeout` s: unhealthy); then, for `monitor` s, the probe must keep
    passing and the container keep running with no restart beyond `restarts`.

    `state()` reports the container (None: gone; a PipelineError is no news). It is looked at
    before every probe and at least every `STATE_POLL` s: exited, dead, restarting, OOM-killed or
    restarted fails at once as "crashed", during the wait and during the window. A probe failing
    in the window fails at once as "unhealthy". With no probe (`probe` None) the check is that
    the container runs, so the window is the whole check.

    Until the first success the pause starts at `FIRST_PAUSE` and doubles up to `interval`: most
    apps answer within a few hundred milliseconds of starting, and a deploy should not wait out
    a whole interval for an app that was ready just after the first probe."""
    if probe is None and state is None:
        raise ValueError("wait_healthy needs a probe or the container's state")
    start = clock()
    deadline = start + timeout
    attempts = streak = 0
    pause = min(FIRST_PAUSE, interval)
    last = "not checked"
    passed_at: float | None = None  # when the check passed: the monitoring window opened
    next_probe = start

    def end(healthy: bool, detail: str, kind: GateFailure | None) -> HealthResult:
        return HealthResult(healthy, detail, attempts, clock() - start, kind, last)

    def unhealthy(detail: str) -> HealthResult:
        # A dying app fails its probe a moment before the engine reports it exited: look again
        # shortly, so that a crash is told as one.
        if state is not None:
            sleep(STATE_POLL)
            known, info, _why = _observe(state)
            reason = crash_reason(info, restarts) if known else None
            if reason:
                return end(False, reason, CRASHED)
        return end(False, detail, UNHEALTHY)

    while True:
        if should_stop is not None and should_stop():
            return end(False, "interrupted", None)
        known, info, why = _observe(state)
        reason = crash_reason(info, restarts) if known else None
        if reason:
            return end(False, reason, CRASHED)
        now = clock()
        if passed_at is not None and now - passed_at >= monitor:
            return end(True, f"{last}; up {monitor:g}s with no restart", None)
        if now >= next_probe:
            ok, last = _run_probe(probe, known, info, why)
            attempts += 1
            now = clock()
            if passed_at is not None:
                if ok is False:
                    return unhealthy(f"failed within the {monitor:g}s window: {last}")
                next_probe = now + interval
            else:
                streak = streak + 1 if ok else 0
                if streak >= threshold and monitor <= 0:
                    return end(True, last, None)
                if streak >= threshold:
                    passed_at, next_probe = now, now + interval
                elif now >= deadline:
                    return unhealthy(last)
                else:
                    if streak:
                        pause = interval  # between consecutive successes: the configured interval
                    next_probe = min(now + pause, deadline)
                    pause = min(interval, pause * 2)
        wake = next_probe if passed_at is None else min(next_probe, passed_at + monitor)
        if state is not None:
            wake = min(wake, now + STATE_POLL)
        sleep(max(0.0, wake - now))


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
            raise ProbeTargetError(
                f"service container {container.name}: the health check needs a port "
                "(set health.port or publish one in 'ports')"
            )
    if service.network == "host":
        return container_port
    for key in (f"{container_port}/tcp", f"{container_port}/udp"):
        if key in container.ports:
            return container.ports[key]
    raise ProbeTargetError(
        f"service container {container.name}: container port {container_port} is not published "
        f"(published: {', '.join(container.ports) or 'none'})"
    )


def network_probe(
    service: ServiceSection, address: str, host_port: Callable[[int | None], int]
) -> Probe | None:
    """The service's http or tcp check aimed at `address`, the port a container port is
    published on given by `host_port` (None: the service's first port); None for other checks.
    `host_port` raises ProbeTargetError when the port is not published."""
    health = service.health
    host = f"[{address}]" if ":" in address else address
    if health.http is not None:
        url = health.http
        if url.startswith("/"):
            url = f"http://{host}:{host_port(health.port)}{url}"
        return http_probe(url, health.expect_status)
    if health.tcp is not None:
        return tcp_probe(address, host_port(health.tcp))
    return None


def probe_for(
    service: ServiceSection, engine: Engine, container: ContainerInfo, host_address: str
) -> Probe | None:
    """The probe a service's `[health]` table asks for, aimed at its container on that host;
    None when it asks for none (the container must then keep running)."""
    health = service.health
    probe = network_probe(service, host_address, lambda p: _host_port(service, container, p))
    if probe is not None:
        return probe
    if health.cmd is not None:
        return cmd_probe(engine, container.id, health.cmd)
    if health.docker:
        return docker_probe(engine, container.id)
    return None


def container_state(engine: Engine, container: ContainerInfo) -> ContainerState:
    """A `state` callable for wait_healthy: the container as its engine reports it now, with the
    code it last exited with even when a restart policy has started it again."""
    restarts = container.restart_count

    def state() -> ContainerInfo | None:
        info = engine.containers.inspect(container.id)
        if info is not None and info.exit_code is None and info.restart_count > restarts:
            with contextlib.suppress(PipelineError):  # the exit code is a courtesy
                info = replace(info, exit_code=engine.containers.last_exit_code(container.id))
        return info

    return state


def check_container(
    service: ServiceSection,
    engine: Engine,
    container: ContainerInfo,
    host_address: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    should_stop: Callable[[], bool] | None = None,
    probe_for: Callable[[ServiceSection, Engine, ContainerInfo, str], Probe | None] = probe_for,
) -> HealthResult:
    """Hold a just-started container (as `Engine.run` returned it) to the gate its service's
    `[health]` table describes: `wait_healthy` with the table's settings. Raises only an engine
    error met while aiming the check (its declared kind decides how the rollout records it).
    `probe_for` makes the check (injected by tests of the rollout with an engine double)."""
    state = container_state(engine, container)
    restarts = container.restart_count

    def look() -> tuple[ContainerInfo | None, HealthResult | None]:
        known, info, _why = _observe(state)
        reason = crash_reason(info, restarts) if known else None
        return info, (HealthResult(False, reason, 0, 0.0, CRASHED) if reason else None)

    # A container that died at once has no published port to aim a probe at: say it died.
    now, died = look()
    if died is not None:
        return died
    try:
        probe = probe_for(service, engine, now or container, host_address)
    except PipelineError as exc:
        died = look()[1]
        if died is not None:
            return died
        if isinstance(exc, ProbeTargetError):
            return HealthResult(False, str(exc), 0, 0.0, UNHEALTHY, str(exc))
        raise
    h = service.health
    return wait_healthy(
        probe,
        interval=h.interval,
        timeout=h.timeout,
        threshold=h.healthy_threshold,
        monitor=h.monitor,
        state=state,
        restarts=restarts,
        clock=clock,
        sleep=sleep,
        should_stop=should_stop,
    )


def container_logs(engine: Engine, container_id: str, lines: int = LOG_LINES) -> str:
    """The container's last `lines` log lines (stdout and stderr), secrets redacted; a note
    instead when the engine cannot give them."""
    try:
        return redact(engine.containers.logs_tail(container_id, lines).rstrip())
    except PipelineError as exc:
        return f"(logs unavailable: {exc})"


def failure_text(result: HealthResult, container_name: str, logs: str) -> str:
    """A failed gate told to a user: what happened and after how long, the check's last result
    and the container's last log lines ("crashed after 2.1s: container exited (exit code 1)…")."""
    verb = "crashed" if result.failure_kind == CRASHED else "is unhealthy"
    if result.attempts == 0:
        text = f"{verb} before its first check: {result.detail}"
    else:
        text = f"{verb} after {result.elapsed:.1f}s: {result.detail}"
        if result.failure_kind is not None and result.last_check != result.detail:
            text += f"; last check: {result.last_check}"
    if logs:
        text += f"\n--- last {LOG_LINES} log lines of {container_name} ---\n{logs}"
    return text
