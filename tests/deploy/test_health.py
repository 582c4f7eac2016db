"""pipeline.deploy.health: the gate as pure logic on fake time; probes, the gate and a rollout
against real containers on the local engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from docker_helpers import (
    TEST_LABEL,
    free_port,
    remove_test_images,
    unique_name,
    write_busybox_context,
)

from pipeline.config.model import HostSection, ServiceSection, decode
from pipeline.deploy.health import (
    CRASHED,
    STATE_POLL,
    UNHEALTHY,
    HealthResult,
    Probe,
    check_container,
    container_state,
    docker_probe,
    failure_text,
    http_probe,
    probe_for,
    tcp_probe,
    wait_healthy,
)
from pipeline.deploy.rollout import Rollout, Target
from pipeline.hosts.connection import Connection
from pipeline.hosts.engine import LABEL_PREFIX, ContainerInfo, ContainerSpec, Engine, EngineError
from pipeline.state.store import State

Start = Callable[..., ContainerInfo]

SESSION = uuid.uuid4().hex[:8]
HEALTHCHECK = (
    "HEALTHCHECK --interval=1s --timeout=2s --retries=3 "
    'CMD ["/bin/busybox", "wget", "-q", "-O-", "http://127.0.0.1:8080/health"]'
)


class FakeTime:
    """A clock and sleep for wait_healthy: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _scripted(results: list[bool]) -> tuple[list[int], Probe]:
    calls = [0]

    def probe() -> tuple[bool, str]:
        ok = results[min(calls[0], len(results) - 1)]
        calls[0] += 1
        return ok, f"check {calls[0]} {'ok' if ok else 'failed'}"

    return calls, probe


@pytest.mark.parametrize(
    ("results", "threshold", "healthy", "attempts", "elapsed"),
    [
        ([True], 1, True, 1, 0.0),  # first probe at once, no sleep needed
        ([False, False, True], 1, True, 3, 0.15),  # fast re-probes before the first success
        ([True, False, True, True, True], 3, True, 5, 4.0),  # a failure resets the streak
        # 10 s timeout, 1 s interval: 0.05, 0.1, 0.2, 0.4, 0.8 s pauses, then every second
        ([False], 1, False, 15, 10.0),
        ([True, False], 2, False, 11, 10.0),
    ],
)
def test_wait_healthy_honours_threshold_and_deadline(
    results: list[bool], threshold: int, healthy: bool, attempts: int, elapsed: float
) -> None:
    """wait_healthy needs `threshold` consecutive successes, re-probes fast until the first
    success, and stops at the deadline."""
    fake = FakeTime()
    calls, probe = _scripted(results)
    result = wait_healthy(
        probe,
        interval=1.0,
        timeout=10.0,
        threshold=threshold,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert (result.healthy, result.attempts, calls[0]) == (healthy, attempts, attempts)
    assert result.detail == f"check {attempts} {'ok' if healthy else 'failed'}"
    assert result.elapsed == pytest.approx(elapsed)
    assert all(s <= 1.0 for s in fake.sleeps)


def test_wait_healthy_fails_at_once_when_the_container_exits_or_on_stop() -> None:
    """A container that exited ends the wait before any further probe; so does a stop request."""
    fake = FakeTime()
    calls, probe = _scripted([False])
    states = iter([_box("running"), _box("exited", 1)])
    result = wait_healthy(
        probe,
        interval=1.0,
        timeout=60.0,
        threshold=1,
        state=lambda: next(states),
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert (result.healthy, result.detail, result.attempts, result.failure_kind) == (
        False,
        "container exited (exit code 1)",
        1,
        CRASHED,
    )
    stop = wait_healthy(
        probe,
        interval=1.0,
        timeout=60.0,
        threshold=1,
        should_stop=lambda: True,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert (stop.healthy, stop.detail, stop.attempts) == (False, "interrupted", 0)


def test_tcp_probe_of_a_closed_port_is_refused() -> None:
    """A TCP probe of a port nobody listens on fails with "refused" in its detail."""
    port = free_port()
    ok, detail = tcp_probe("127.0.0.1", port)()
    assert not ok
    assert "refused" in detail and f"127.0.0.1:{port}" in detail


def _info(ports: dict[str, int]) -> ContainerInfo:
    return ContainerInfo(
        id="c1",
        name="web-1",
        image="img",
        status="running",
        health=None,
        exit_code=None,
        labels={},
        ports=ports,
        started_at=None,
    )


def _box(
    status: str, code: int | None = None, restarts: int = 0, oom: bool = False
) -> ContainerInfo:
    """A container as the engine would report it."""
    return ContainerInfo(
        id="c1",
        name="web-1",
        image="img",
        status=status,
        health=None,
        exit_code=code,
        labels={},
        ports={},
        started_at=None,
        restart_count=restarts,
        oom_killed=oom,
    )


UP = _box("running")
BLIP = EngineError("host h: inspect container c1: connection reset")
# From time t (seconds after the gate began) on: what the container is, what the probe says.
Timeline = list[tuple[float, "ContainerInfo | EngineError"]]
Checks = list[tuple[float, bool]] | None


def _gate(checks: Checks, states: Timeline, **settings: float) -> HealthResult:
    """Run wait_healthy on fake time: probe results and container states follow the tables."""
    fake = FakeTime()
    start = fake.now

    def at(table: list[tuple[float, object]]) -> object:
        return [v for t, v in table if fake.now - start >= t - 1e-9][-1]

    def state() -> ContainerInfo | None:
        now = at(list(states))
        if isinstance(now, EngineError):
            raise now
        return now  # type: ignore[return-value]

    def probe() -> tuple[bool, str]:
        ok = bool(at(list(checks or [])))
        return ok, f"GET /health -> {200 if ok else 503}"

    options: dict[str, float] = {"interval": 1.0, "timeout": 10.0, "monitor": 5.0, **settings}
    return wait_healthy(
        probe if checks is not None else None,
        interval=options["interval"],
        timeout=options["timeout"],
        threshold=1,
        monitor=options["monitor"],
        state=state,
        clock=fake.clock,
        sleep=fake.sleep,
    )


@pytest.mark.parametrize(
    ("checks", "states", "kind", "ends_at", "detail"),
    [
        # crash during the wait: the check never passed, the container exits at 2 s
        (
            [(0, False)],
            [(0, UP), (2, _box("exited", 1))],
            CRASHED,
            2.0,
            "container exited (exit code 1)",
        ),
        # crash during the window: passed at once, then restarting after exiting with 1
        (
            [(0, True)],
            [(0, UP), (3, _box("restarting", 1, restarts=1))],
            CRASHED,
            3.0,
            "container exited and is restarting (exit code 1; restarted 1 time)",
        ),
        # the restart count grows between two looks: running again, still a crash
        (
            [(0, True)],
            [(0, UP), (1.5, _box("running", None, restarts=1))],
            CRASHED,
            1.5,
            "container exited and was restarted (exit code unknown; restarted 1 time)",
        ),
        # killed for lack of memory and restarted by its policy
        (
            [(0, True)],
            [(0, UP), (1, _box("running", 137, restarts=1, oom=True))],
            CRASHED,
            1.0,
            "container exited and was restarted (OOMKilled: out of memory, exit code 137; "
            "restarted 1 time)",
        ),
        (
            [(0, False)],
            [(0, UP), (0.5, _box("exited", 137, oom=True))],
            CRASHED,
            0.5,
            "container exited (OOMKilled: out of memory, exit code 137)",
        ),
        (
            [(0, False)],
            [(0, UP), (4, _box("dead", 2))],
            CRASHED,
            4.0,
            "container dead (exit code 2)",
        ),
        ([(0, False)], [(0, UP), (1, None)], CRASHED, 1.0, "container is gone"),
        # the probe flaps in the window while the container stays up
        (
            [(0, True), (2, False), (2.5, True)],
            [(0, UP)],
            UNHEALTHY,
            2.0,
            "failed within the 5s window: GET /health -> 503",
        ),
        # the probe fails as the app dies, a moment before the engine says it exited
        (
            [(0, True), (2, False)],
            [(0, UP), (2.1, _box("exited", 1))],
            CRASHED,
            2.0,
            "container exited (exit code 1)",
        ),
        # the probe never passes: unhealthy only when the timeout is spent
        ([(0, False)], [(0, UP)], UNHEALTHY, 10.0, "GET /health -> 503"),
        # healthy through the window; an engine blip on the way is no news
        (
            [(0, False), (0.3, True)],
            [(0, UP), (2, BLIP), (2.6, UP)],
            None,
            5.35,
            "GET /health -> 200; up 5s with no restart",
        ),
        # no probe: the container must run through the window
        (None, [(0, UP)], None, 5.0, "container running; up 5s with no restart"),
        (
            None,
            [(0, UP), (2, _box("restarting", 1, restarts=1))],
            CRASHED,
            2.0,
            "container exited and is restarting (exit code 1; restarted 1 time)",
        ),
    ],
    ids=[
        "crash-in-wait",
        "crash-in-window",
        "restart-count-grows",
        "oom-restarted",
        "oom-exited",
        "dead",
        "gone",
        "probe-flaps-in-window",
        "probe-fails-as-it-dies",
        "never-passes",
        "healthy-through-window",
        "no-probe-healthy",
        "no-probe-crash-loop",
    ],
)
def test_health_gate_table(
    checks: Checks, states: Timeline, kind: str | None, ends_at: float, detail: str
) -> None:
    """The gate fails at once (within one STATE_POLL of the event) as "crashed" when the container
    exits, dies, restarts or is OOM-killed, during the wait or the window; as "unhealthy" when the
    check never passes or fails in the window; and passes after the whole window otherwise."""
    result = _gate(checks, states)
    assert (result.healthy, result.failure_kind, result.detail) == (kind is None, kind, detail)
    assert ends_at <= result.elapsed + 1e-9 <= ends_at + STATE_POLL + 1e-9, result.elapsed


def test_health_gate_without_window_passes_at_the_first_success() -> None:
    """With `monitor` 0 the gate is the old one: healthy at the first passing check."""
    result = _gate([(0, False), (0.1, True)], [(0, UP)], monitor=0)
    assert (result.healthy, result.attempts, result.detail) == (True, 3, "GET /health -> 200")
    assert result.elapsed == pytest.approx(0.15)


def test_health_gate_counts_restarts_from_the_container_start() -> None:
    """A container reported with restarts it already had is not taken for a crash."""
    fake = FakeTime()
    result = wait_healthy(
        None,
        interval=1.0,
        timeout=10.0,
        threshold=1,
        monitor=1.0,
        restarts=2,
        state=lambda: _box("running", restarts=2),
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert result.healthy, result.detail


def test_failure_text_names_exit_code_last_check_and_logs() -> None:
    """A failure message says crashed or unhealthy, when, why, the last check and the logs."""
    crashed = HealthResult(
        False, "container exited (exit code 1)", 3, 2.25, CRASHED, "GET /health -> 503"
    )
    assert failure_text(crashed, "web-1", "FATAL: no db") == (
        "crashed after 2.2s: container exited (exit code 1); last check: GET /health -> 503\n"
        "--- last 50 log lines of web-1 ---\nFATAL: no db"
    )
    at_once = HealthResult(False, "container exited (exit code 1)", 0, 0.0, CRASHED)
    assert failure_text(at_once, "web-1", "") == (
        "crashed before its first check: container exited (exit code 1)"
    )
    slow = HealthResult(False, "GET /health -> 503", 9, 10.0, UNHEALTHY, "GET /health -> 503")
    assert failure_text(slow, "web-1", "") == "is unhealthy after 10.0s: GET /health -> 503"


@pytest.mark.parametrize(
    ("service", "container_port", "target"),
    [
        (
            {"ports": ["8080"], "health": {"http": "/health"}},
            8080,
            "GET http://127.0.0.1:{}/health",
        ),
        (
            {"ports": ["9000", "8080"], "health": {"http": "/h", "port": 8080}},
            8080,
            "GET http://127.0.0.1:{}/h",
        ),
        ({"ports": ["5432"], "health": {"tcp": 5432}}, 5432, "TCP 127.0.0.1:{}"),
    ],
)
def test_probe_for_aims_at_the_published_port(
    service: dict[str, object], container_port: int, target: str
) -> None:
    """probe_for picks the check's kind and the host port that publishes the container port."""
    section = decode(ServiceSection, {"image": "web", "hosts": ["h"], **service})
    published = free_port()  # nothing listens there: the probe fails at once, naming its target
    ports = {"9000/tcp": 1, f"{container_port}/tcp": published}
    unused = Engine(Connection("unused", "tcp://127.0.0.1:1"))
    probe = probe_for(section, unused, _info(ports), "127.0.0.1")
    ok, detail = probe()
    assert not ok and detail.startswith(target.format(published) + ": connection refused")


def test_probe_for_host_network_and_full_url() -> None:
    """With network "host" the container port itself is probed; a full URL is used as given."""
    engine = Engine(Connection("unused", "tcp://127.0.0.1:1"))
    port = free_port()
    host_net = decode(
        ServiceSection,
        {"image": "web", "hosts": ["h"], "network": "host", "health": {"http": "/h", "port": port}},
    )
    assert probe_for(host_net, engine, _info({}), "127.0.0.1")()[1].startswith(
        f"GET http://127.0.0.1:{port}/h:"
    )
    url = decode(
        ServiceSection,
        {"image": "web", "hosts": ["h"], "health": {"http": f"http://127.0.0.1:{port}/x"}},
    )
    assert probe_for(url, engine, _info({}), "10.0.0.5")()[1].startswith(
        f"GET http://127.0.0.1:{port}/x:"
    )


# -- against the local engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine.local()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def images(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A plain busybox httpd image and one with a HEALTHCHECK, shared by the module."""
    plain = write_busybox_context(tmp_path_factory.mktemp("plain"), SESSION)
    checked = write_busybox_context(tmp_path_factory.mktemp("checked"), SESSION, extra=HEALTHCHECK)
    built = {
        "plain": engine.build(
            plain, "Dockerfile", [f"pl-test-{SESSION}:plain"], labels={}, build_args={}
        ),
        "checked": engine.build(
            checked, "Dockerfile", [f"pl-test-{SESSION}:checked"], labels={}, build_args={}
        ),
    }
    yield built
    sdk = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        for label in sdk.containers.list(all=True, filters={"label": f"{TEST_LABEL}={SESSION}"}):
            label.remove(force=True, v=True)
        remove_test_images(sdk, SESSION)
    finally:
        sdk.close()


@pytest.fixture
def run(engine: Engine) -> Iterator[Start]:
    """Start a managed test container from an image; every one is removed after the test."""
    started: list[str] = []

    def start(image: str, **changes: object) -> ContainerInfo:
        fields: dict[str, object] = {
            "name": unique_name(),
            "image": image,
            "ports": ["127.0.0.1::8080"],
            "labels": {TEST_LABEL: SESSION, f"{LABEL_PREFIX}service": "web"},
            "env": {},
            "command": None,
            "volumes": (),
            "cpus": None,
            "memory": None,
            "network": "bridge",
            "restart": "no",
        }
        fields.update(changes)
        info = engine.containers.run(ContainerSpec(**fields))  # type: ignore[arg-type]
        started.append(info.id)
        return info

    yield start
    for container_id in started:
        engine.containers.remove(container_id)


@pytest.mark.docker
def test_http_probe_is_healthy_when_health_endpoint_serves(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """An HTTP check of busybox httpd's /health through probe_for becomes healthy."""
    info = run(images["plain"])
    section = decode(
        ServiceSection,
        {"image": "web", "hosts": ["h"], "ports": ["8080"], "health": {"http": "/health"}},
    )
    probe = probe_for(section, engine, info, "127.0.0.1")
    result = wait_healthy(
        probe, interval=0.1, timeout=10, threshold=2, state=container_state(engine, info)
    )
    assert result.healthy, result.detail
    assert result.detail == f"GET http://127.0.0.1:{info.ports['8080/tcp']}/health -> 200"


@pytest.mark.docker
def test_http_probe_of_a_missing_path_is_unhealthy_with_the_status(
    images: dict[str, str], run: Start
) -> None:
    """An HTTP check of a path the server lacks stays unhealthy and reports the 404."""
    info = run(images["plain"])
    probe = http_probe(f"http://127.0.0.1:{info.ports['8080/tcp']}/missing")
    result = wait_healthy(probe, interval=0.1, timeout=0.5, threshold=1)
    assert not result.healthy
    assert "-> 404" in result.detail and result.attempts >= 2


@pytest.mark.docker
def test_a_rollout_whose_container_exits_fails_at_once(
    engine: Engine, images: dict[str, str], tmp_path: Path
) -> None:
    """A new container whose command exits fails its rollout at once, long before the health
    timeout, and the failure says how it exited."""
    service = unique_name()
    spec = decode(
        ServiceSection,
        {
            "image": "web",
            "hosts": ["local"],
            "command": ["/bin/busybox", "false"],
            "restart": "no",
            "labels": {TEST_LABEL: SESSION},
            "health": {"cmd": ["/bin/busybox", "true"], "timeout": "30s"},
        },
    )
    rollout = Rollout(
        state=State(f"sqlite:///{tmp_path / 'state.db'}"),
        service=service,
        spec=spec,
        hosts={"local": HostSection(docker="unix:///var/run/docker.sock")},
        engines={"local": engine},
    )
    target = Target(
        revision="a" * 40,
        digest="sha256:" + "0" * 64,
        refs={"local": images["plain"]},
        spec_hash="test",
        pull=False,
    )
    started = time.monotonic()
    result = rollout.run(target, run_id=None)
    assert not result.ok
    assert "container exited (exit code 1)" in (result.error or "")
    assert time.monotonic() - started < 10
    assert engine.containers.managed_containers(service) == []  # the failed container was removed


@pytest.mark.docker
def test_an_exiting_container_fails_at_once(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """A container whose command exits fails the wait at once, long before the timeout."""
    info = run(images["plain"], command=["/bin/busybox", "false"], ports=[])
    started = time.monotonic()
    result = wait_healthy(
        tcp_probe("127.0.0.1", free_port()),
        interval=0.1,
        timeout=30,
        threshold=1,
        state=container_state(engine, info),
    )
    assert not result.healthy
    assert (result.failure_kind, result.detail) == (CRASHED, "container exited (exit code 1)")
    assert time.monotonic() - started < 5


@pytest.mark.docker
def test_docker_probe_follows_the_image_healthcheck(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """docker_probe becomes healthy once the image's own HEALTHCHECK passes."""
    info = run(images["checked"])
    result = wait_healthy(
        docker_probe(engine, info.id),
        interval=0.2,
        timeout=20,
        threshold=1,
        state=container_state(engine, info),
    )
    assert result.healthy, result.detail
    assert result.detail == "docker health status: healthy"


@pytest.mark.docker
def test_docker_probe_without_healthcheck_fails_with_a_clear_detail(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """docker_probe of an image without HEALTHCHECK fails and says so."""
    info = run(images["plain"])
    ok, detail = docker_probe(engine, info.id)()
    assert not ok and "no HEALTHCHECK" in detail


FATAL = ["/bin/busybox", "sh", "-c", "echo 'FATAL: DATABASE_URL is not set' >&2; exit 1"]


def _service(health: dict[str, object], **keys: object) -> ServiceSection:
    return decode(
        ServiceSection,
        {"image": "web", "hosts": ["h"], "ports": ["8080"], "health": health, **keys},
    )


@pytest.mark.docker
@pytest.mark.parametrize(
    ("restart", "health"),
    [
        ("no", {"http": "/health"}),
        ("unless-stopped", {"tcp": 8080}),
        ("unless-stopped", {}),
    ],
    ids=["restart-no-http", "default-restart-tcp", "default-restart-no-check"],
)
def test_check_container_of_an_app_dying_at_once_says_it_crashed(
    engine: Engine, images: dict[str, str], run: Start, restart: str, health: dict[str, object]
) -> None:
    """A container that exits 1 at once is "crashed" with its exit code, under any restart
    policy and check (not "port not published"), well before its timeout."""
    info = run(images["plain"], command=FATAL, restart=restart, ports=["127.0.0.1::8080"])
    service = _service({**health, "timeout": "20s", "monitor": "3s"}, restart=restart)
    started = time.monotonic()
    result = check_container(service, engine, info, "127.0.0.1")
    assert (result.healthy, result.failure_kind) == (False, CRASHED), result
    assert "exit code 1" in result.detail and "not published" not in result.detail
    assert time.monotonic() - started < 10  # the timeout is 20 s


@pytest.mark.docker
def test_check_container_catches_a_crash_in_the_window_with_its_exit_code(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """An app that serves, then exits 3 after a second under unless-stopped, passes its http
    check but crashes within the window; the exit code comes through its restart."""
    command = [
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox httpd -f -p 8080 -h /www & /bin/busybox sleep 1; exit 3",
    ]
    info = run(images["plain"], command=command, restart="unless-stopped")
    service = _service({"http": "/health", "interval": "100ms", "monitor": "4s"})
    result = check_container(service, engine, info, "127.0.0.1")
    assert (result.healthy, result.failure_kind) == (False, CRASHED), result
    assert "exit code 3" in result.detail, result.detail
    # The probe's last result: a pass, or the app going down ("refused", "reset"...).
    assert result.last_check.startswith(f"GET http://127.0.0.1:{info.ports['8080/tcp']}/health")
    assert 0.9 < result.elapsed < 4


@pytest.mark.docker
def test_check_container_of_an_oom_killed_app_says_so(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """An app killed for lack of memory is "crashed" and the detail says OOMKilled."""
    hog = [
        "/bin/busybox",
        "sh",
        "-c",
        "a=$(/bin/busybox head -c 100000000 /dev/zero | /bin/busybox tr '\\0' x)",
    ]
    info = run(images["plain"], command=hog, memory="8m", restart="unless-stopped")
    result = check_container(_service({"monitor": "3s"}), engine, info, "127.0.0.1")
    assert (result.healthy, result.failure_kind) == (False, CRASHED), result
    assert "OOMKilled" in result.detail


@pytest.mark.docker
def test_check_container_passes_a_steady_app_after_the_window(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """A serving app passes its check, then the window, and is healthy no sooner than that."""
    info = run(images["plain"])
    result = check_container(
        _service({"http": "/health", "interval": "100ms", "monitor": "1s"}),
        engine,
        info,
        "127.0.0.1",
    )
    assert result.healthy and result.failure_kind is None, result
    assert result.elapsed >= 1.0


@pytest.mark.docker
@pytest.mark.parametrize(
    ("command", "health", "kind", "shown"),
    [
        (FATAL, {"http": "/health"}, CRASHED, "FATAL: DATABASE_URL is not set"),
        (None, {"http": "/missing", "timeout": "1s"}, UNHEALTHY, "-> 404"),
    ],
    ids=["crashed", "unhealthy"],
)
def test_rollout_result_carries_the_failure_kind(
    engine: Engine,
    images: dict[str, str],
    tmp_path: Path,
    command: list[str] | None,
    health: dict[str, object],
    kind: str,
    shown: str,
) -> None:
    """A rollout whose new container fails the gate is rolled back, and its result says whether
    it crashed or was unhealthy, with the reason in its error; each check attempt is told to
    whoever shows progress (the terminal view's "health: attempt N")."""
    name = f"gate{uuid.uuid4().hex[:6]}"
    spec = decode(
        ServiceSection,
        {
            "image": "web",
            "hosts": ["local"],
            "ports": ["127.0.0.1::8080"],
            "command": command,
            "restart": "no",
            "labels": {TEST_LABEL: SESSION},
            "health": {**health, "interval": "100ms", "monitor": "300ms"},
        },
    )
    rollout = Rollout(
        state=State.in_dir(tmp_path / "data"),
        service=name,
        spec=spec,
        hosts={"local": HostSection(docker="unix:///var/run/docker.sock")},
        engines={"local": engine},
    )
    target = Target(
        revision="a" * 40,
        digest="sha256:" + "0" * 64,
        refs={"local": images["plain"]},
        spec_hash="h",
        pull=False,
    )
    seen: list[tuple[str, int]] = []
    engine.progress = lambda what, done, _total: seen.append((what, done))
    try:
        result = rollout.run(target, run_id=None)
    finally:
        engine.progress = None
        for c in engine.containers.managed_containers(name):
            engine.containers.remove(c.id)
    assert (result.ok, result.failure_kind) == (False, kind), result.error
    assert shown in (result.error or "")
    if kind == UNHEALTHY:
        assert seen[:2] == [(f"{name}: local: health", 1), (f"{name}: local: health", 2)], seen


@pytest.mark.docker
def test_check_container_of_a_running_app_on_an_unpublished_port_is_unhealthy_at_once(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """A check aimed at a port the running container does not publish fails at once as
    "unhealthy" and names the port, instead of escaping the rollout as an exception."""
    info = run(images["plain"])
    service = _service({"http": "/health", "port": 9999, "timeout": "20s"})
    result = check_container(service, engine, info, "127.0.0.1")
    assert (result.healthy, result.failure_kind, result.attempts) == (False, UNHEALTHY, 0)
    assert "container port 9999 is not published (published: 8080/tcp)" in result.detail
