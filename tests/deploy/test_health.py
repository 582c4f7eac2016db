"""pipeline.deploy.health: probes against real containers on the local engine; waiting, pure."""

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

from pipeline.config.model import HostSection, ServiceSection
from pipeline.deploy.health import (
    Probe,
    docker_probe,
    http_probe,
    probe_for,
    tcp_probe,
    wait_healthy,
)
from pipeline.deploy.rollout import Rollout, Target
from pipeline.hosts.connection import Connection
from pipeline.hosts.engine import LABEL_PREFIX, ContainerInfo, ContainerSpec, Engine
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
        probe, interval=1.0, timeout=10.0, threshold=threshold,
        clock=fake.clock, sleep=fake.sleep,
    )
    assert (result.healthy, result.attempts, calls[0]) == (healthy, attempts, attempts)
    assert result.detail == f"check {attempts} {'ok' if healthy else 'failed'}"
    assert result.elapsed == pytest.approx(elapsed)
    assert all(s <= 1.0 for s in fake.sleeps)


def test_wait_healthy_fails_at_once_when_not_alive_or_stopped() -> None:
    """A dead container or a stop request ends the wait before any further probe."""
    fake = FakeTime()
    calls, probe = _scripted([False])
    states = iter([None, "container exited with code 1"])
    result = wait_healthy(
        probe, interval=1.0, timeout=60.0, threshold=1, alive=lambda: next(states),
        clock=fake.clock, sleep=fake.sleep,
    )
    assert (result.healthy, result.detail, result.attempts) == (
        False, "container exited with code 1", 1,
    )
    stop = wait_healthy(
        probe, interval=1.0, timeout=60.0, threshold=1, should_stop=lambda: True,
        clock=fake.clock, sleep=fake.sleep,
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
        id="c1", name="web-1", image="img", status="running", health=None, exit_code=None,
        labels={}, ports=ports, started_at=None,
    )


@pytest.mark.parametrize(
    ("service", "container_port", "target"),
    [
        ({"ports": ["8080"], "health": {"http": "/health"}}, 8080, "GET http://127.0.0.1:{}/health"),
        ({"ports": ["9000", "8080"], "health": {"http": "/h", "port": 8080}}, 8080,
         "GET http://127.0.0.1:{}/h"),
        ({"ports": ["5432"], "health": {"tcp": 5432}}, 5432, "TCP 127.0.0.1:{}"),
    ],
)
def test_probe_for_aims_at_the_published_port(
    service: dict[str, object], container_port: int, target: str
) -> None:
    """probe_for picks the check's kind and the host port that publishes the container port."""
    section = ServiceSection.model_validate({"image": "web", "hosts": ["h"], **service})
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
    host_net = ServiceSection.model_validate(
        {"image": "web", "hosts": ["h"], "network": "host", "health": {"http": "/h", "port": port}}
    )
    assert probe_for(host_net, engine, _info({}), "127.0.0.1")()[1].startswith(
        f"GET http://127.0.0.1:{port}/h:"
    )
    url = ServiceSection.model_validate(
        {"image": "web", "hosts": ["h"], "health": {"http": f"http://127.0.0.1:{port}/x"}}
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
    checked = write_busybox_context(
        tmp_path_factory.mktemp("checked"), SESSION, extra=HEALTHCHECK
    )
    built = {
        "plain": engine.build(plain, "Dockerfile", [f"pl-test-{SESSION}:plain"],
                              labels={}, build_args={}),
        "checked": engine.build(checked, "Dockerfile", [f"pl-test-{SESSION}:checked"],
                                labels={}, build_args={}),
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
            "name": unique_name(), "image": image, "ports": ["127.0.0.1::8080"],
            "labels": {TEST_LABEL: SESSION, f"{LABEL_PREFIX}service": "web"},
            "env": {}, "command": None, "volumes": (), "cpus": None, "memory": None,
            "network": "bridge", "restart": "no",
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
    section = ServiceSection.model_validate(
        {"image": "web", "hosts": ["h"], "ports": ["8080"],
         "health": {"http": "/health"}},
    )
    probe = probe_for(section, engine, info, "127.0.0.1")
    result = wait_healthy(probe, interval=0.1, timeout=10, threshold=2)
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
    spec = ServiceSection.model_validate(
        {"image": "web", "hosts": ["local"], "command": ["/bin/busybox", "false"],
         "restart": "no", "labels": {TEST_LABEL: SESSION},
         "health": {"cmd": ["/bin/busybox", "true"], "timeout": "30s"}},
    )
    rollout = Rollout(
        state=State(f"sqlite:///{tmp_path / 'state.db'}"), service=service, spec=spec,
        hosts={"local": HostSection(docker="unix:///var/run/docker.sock")},
        engines={"local": engine},
    )
    target = Target(revision="a" * 40, digest="sha256:" + "0" * 64,
                    refs={"local": images["plain"]}, spec_hash="test", pull=False)
    started = time.monotonic()
    result = rollout.run(target, run_id=None)
    assert not result.ok
    assert "container exited with code 1" in (result.error or "")
    assert time.monotonic() - started < 10
    assert engine.containers.managed_containers(service) == []  # the failed container was removed


@pytest.mark.docker
def test_docker_probe_follows_the_image_healthcheck(
    engine: Engine, images: dict[str, str], run: Start
) -> None:
    """docker_probe becomes healthy once the image's own HEALTHCHECK passes."""
    info = run(images["checked"])
    result = wait_healthy(docker_probe(engine, info.id), interval=0.2, timeout=20, threshold=1)
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
