"""pipeline.hosts.engine against the real local Docker engine and a real registry on loopback."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest
from docker_helpers import (
    TEST_LABEL,
    Registry,
    free_port,
    make_htpasswd,
    remove_test_images,
    run_registry,
    unique_name,
    write_busybox_context,
)

from pipeline.errors import StallingError
from pipeline.hosts.connection import Connection
from pipeline.hosts.containers import container_info, port_bindings, restart_policy
from pipeline.hosts.engine import (
    LABEL_PREFIX,
    ContainerSpec,
    Engine,
    EngineError,
    ImageNotFound,
    RegistryAuthError,
)

SESSION = uuid.uuid4().hex[:8]
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def sdk() -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    yield client
    client.close()


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine.local()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def image(
    engine: Engine, sdk: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One busybox httpd image shared by the module; removed with every tag at the end."""
    context = write_busybox_context(tmp_path_factory.mktemp("ctx"), SESSION)
    image_id = engine.build(
        context, "Dockerfile", [f"pl-test-{SESSION}:base"], labels={}, build_args={}
    )
    yield image_id
    remove_test_images(sdk, SESSION)


@pytest.fixture(autouse=True)
def _remove_test_containers(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("docker") is None:
        yield  # pure tests need no engine
        return
    sdk: docker.DockerClient = request.getfixturevalue("sdk")
    yield
    for container in sdk.containers.list(all=True, filters={"label": f"{TEST_LABEL}={SESSION}"}):
        container.remove(force=True, v=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def _spec(image: str, **changes: object) -> ContainerSpec:
    labels = {TEST_LABEL: SESSION, f"{LABEL_PREFIX}service": "web"}
    fields: dict[str, object] = {
        "name": unique_name(),
        "image": image,
        "labels": labels,
        "env": {},
        "command": None,
        "ports": (),
        "volumes": (),
        "cpus": None,
        "memory": None,
        "network": "bridge",
        "restart": "no",
    }
    fields.update(changes)
    return ContainerSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.docker
def test_build_streams_output_and_labels_image(
    engine: Engine, sdk: docker.DockerClient, tmp_path: Path
) -> None:
    """A busybox FROM-scratch build returns an image id, streams its output and sets labels."""
    context = write_busybox_context(
        tmp_path / "ctx", SESSION, files={"index.html": str(uuid.uuid4())}
    )
    lines: list[str] = []
    tag = f"pl-test-{SESSION}:labelled"
    image_id = engine.build(
        context,
        "Dockerfile",
        [tag, f"pl-test-{SESSION}:second"],
        labels={f"{LABEL_PREFIX}revision": "abc123"},
        build_args={},
        on_output=lines.append,
    )
    try:
        assert image_id.startswith("sha256:")
        assert any("COPY busybox" in line for line in lines)
        assert sdk.images.get(tag).labels[f"{LABEL_PREFIX}revision"] == "abc123"
        assert engine.has_image(f"pl-test-{SESSION}:second")
    finally:
        engine.remove_image(f"pl-test-{SESSION}:second")
        engine.remove_image(image_id)
    assert not engine.has_image(tag)


@pytest.mark.docker
def test_build_failure_raises_stalling_error_with_output_tail(
    engine: Engine, tmp_path: Path
) -> None:
    """A failing RUN step raises StallingError carrying the build's last output lines."""
    context = write_busybox_context(
        tmp_path / "ctx",
        SESSION,
        extra='RUN ["/bin/busybox", "echo", "about-to-fail"]\nRUN ["/bin/busybox", "false"]',
    )
    with pytest.raises(StallingError, match="build failed") as caught:
        engine.build(context, "Dockerfile", [f"pl-test-{SESSION}:broken"], labels={}, build_args={})
    assert "about-to-fail" in str(caught.value)
    assert "host local (unix:///var/run/docker.sock)" in str(caught.value)


@pytest.mark.docker
def test_push_digest_matches_registry_and_pull_by_digest(
    engine: Engine, sdk: docker.DockerClient, image: str, registry: Registry
) -> None:
    """A push returns the registry's manifest digest, and pulling repo@digest yields the image."""
    repository = f"{registry.address}/pl-test/web"
    engine.tag(image, repository, "v1")
    pushed: list[str] = []
    digest = engine.push(repository, "v1", auth=None, on_output=pushed.append)
    response = httpx.get(
        f"{registry.url}/v2/pl-test/web/manifests/v1",
        headers={"Accept": MANIFEST_V2},
        trust_env=False,
    )
    assert response.status_code == 200
    assert digest == response.headers["Docker-Content-Digest"]
    assert pushed
    engine.remove_image(f"{repository}:v1")
    assert engine.pull(f"{repository}@{digest}", auth=None) == image
    assert f"{repository}@{digest}" in sdk.images.get(image).attrs["RepoDigests"]


@pytest.mark.docker
def test_pull_of_unknown_digest_raises_image_not_found(
    engine: Engine, image: str, registry: Registry
) -> None:
    """Pulling a digest the registry does not hold raises ImageNotFound naming the engine."""
    ref = f"{registry.address}/pl-test/web@sha256:{'0' * 64}"
    with pytest.raises(ImageNotFound, match="host local"):
        engine.pull(ref, auth=None)


@pytest.mark.docker
def test_push_with_wrong_password_raises_registry_auth_error(
    engine: Engine, image: str, tmp_path: Path
) -> None:
    """An htpasswd registry accepts the right password and refuses a wrong one as an auth error."""
    htpasswd = tmp_path / "htpasswd"
    problem = make_htpasswd(htpasswd, "deployer", "right-horse-battery")
    if problem:
        pytest.skip(problem)
    with run_registry(tmp_path / "reg", htpasswd=htpasswd) as reg:
        repository = f"{reg.address}/pl-test/private"
        engine.tag(image, repository, "v1")
        try:
            good = {"username": "deployer", "password": "right-horse-battery"}
            assert engine.push(repository, "v1", auth=good).startswith("sha256:")
            bad = {"username": "deployer", "password": "wrong-staple-guess"}
            with pytest.raises(RegistryAuthError) as caught:
                engine.push(repository, "v1", auth=bad)
            assert "wrong-staple-guess" not in str(caught.value)
            assert reg.address in str(caught.value)
        finally:
            engine.remove_image(f"{repository}:v1")


@pytest.mark.docker
def test_run_applies_settings_and_serves_http(
    engine: Engine, image: str, sdk: docker.DockerClient, tmp_path: Path
) -> None:
    """run() publishes ports and sets env, labels, limits, restart policy and volumes as given."""
    port = free_port()
    network = unique_name("pl-test-net")
    volume = unique_name("pl-test-vol")
    (tmp_path / "shared").mkdir()
    spec = _spec(
        image,
        ports=[f"127.0.0.1:{port}:8080", "9090"],
        env={"GREETING": "hi"},
        memory="64m",
        cpus=0.5,
        restart="on-failure:3",
        network=network,
        volumes=[f"{volume}:/data", f"{tmp_path / 'shared'}:/shared:ro"],
        labels={TEST_LABEL: SESSION, f"{LABEL_PREFIX}service": "web"},
    )
    engine.containers.ensure_network(network)
    engine.containers.ensure_network(network)  # idempotent
    try:
        info = engine.containers.run(spec)
        assert info.status == "running" and info.managed
        assert info.ports["8080/tcp"] == port and info.ports["9090/tcp"] > 0
        attrs = sdk.api.inspect_container(info.id)
        host = attrs["HostConfig"]
        assert host["PortBindings"]["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
        assert "GREETING=hi" in attrs["Config"]["Env"]
        assert attrs["Config"]["Labels"][f"{LABEL_PREFIX}managed"] == "true"
        assert host["Memory"] == 64 * 1024 * 1024
        assert host["NanoCpus"] == 500_000_000
        assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
        assert host["NetworkMode"] == network
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        assert mounts["/data"]["Name"] == volume and mounts["/shared"]["RW"] is False
        assert httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).text == "ok\n"
        greeting = ["/bin/busybox", "sh", "-c", "echo $GREETING"]
        assert engine.containers.exec(info.id, greeting) == (0, "hi\n")
    finally:
        for container in sdk.containers.list(all=True, filters={"name": spec.name}):
            container.remove(force=True, v=True)
        sdk.volumes.get(volume).remove(force=True)
        sdk.networks.get(network).remove()


@pytest.mark.docker
def test_run_replaces_a_managed_container_of_the_same_name(engine: Engine, image: str) -> None:
    """run() removes a managed container that holds the name before starting the new one."""
    spec = _spec(image)
    first = engine.containers.run(spec)
    second = engine.containers.run(spec)
    assert second.id != first.id
    assert engine.containers.inspect(first.id) is None


@pytest.mark.docker
def test_run_refuses_to_replace_an_unmanaged_container(
    engine: Engine, image: str, sdk: docker.DockerClient
) -> None:
    """run() raises StallingError and leaves alone a same-named container without the label."""
    name = unique_name()
    foreign = sdk.containers.create(image, name=name, labels={TEST_LABEL: SESSION})
    with pytest.raises(StallingError, match="not created by pipeline"):
        engine.containers.run(_spec(image, name=name))
    assert sdk.containers.get(name).id == foreign.id


@pytest.mark.docker
def test_remove_stop_and_rename_refuse_an_unmanaged_container(
    engine: Engine, image: str, sdk: docker.DockerClient
) -> None:
    """remove(), stop() and rename() raise StallingError for a container pipeline did not create."""
    foreign = sdk.containers.create(image, name=unique_name(), labels={TEST_LABEL: SESSION})
    containers = engine.containers
    for action in (
        containers.remove,
        containers.stop,
        lambda cid: containers.rename(cid, unique_name()),
    ):
        with pytest.raises(StallingError, match="not created by pipeline"):
            action(foreign.id)
    assert engine.containers.inspect(foreign.id) is not None


@pytest.mark.docker
def test_managed_containers_filters_by_service(engine: Engine, image: str) -> None:
    """managed_containers() lists only pipeline's containers, of one service when asked."""
    web = engine.containers.run(_spec(image))
    api_labels = {TEST_LABEL: SESSION, f"{LABEL_PREFIX}service": "api"}
    api = engine.containers.run(_spec(image, labels=api_labels))
    engine.containers.stop(api.id, timeout=0)
    assert {c.id for c in engine.containers.managed_containers("web")} >= {web.id}
    assert api.id not in {c.id for c in engine.containers.managed_containers("web")}
    assert api.id in {c.id for c in engine.containers.managed_containers("api")}
    assert api.id not in {c.id for c in engine.containers.managed_containers("api", all=False)}
    stopped = engine.containers.inspect(api.id)
    assert stopped is not None and stopped.status == "exited" and stopped.exit_code is not None


@pytest.mark.docker
def test_logs_tail_and_rename(engine: Engine, image: str) -> None:
    """logs_tail() returns the container's output and rename() changes its name."""
    echo = ["/bin/busybox", "echo", "hello-from-container"]
    info = engine.containers.run(_spec(image, command=echo))
    new_name = unique_name()
    engine.containers.rename(info.id, new_name)
    renamed = engine.containers.inspect(new_name)
    assert renamed is not None and renamed.id == info.id
    assert "hello-from-container" in engine.containers.logs_tail(info.id, lines=5)


@pytest.mark.parametrize(
    ("state", "restarts", "expected"),
    [
        ({"Status": "running", "ExitCode": 0}, 0, ("running", None, 0, False)),
        ({"Status": "exited", "ExitCode": 1}, 0, ("exited", 1, 0, False)),
        ({"Status": "restarting", "ExitCode": 3}, 2, ("restarting", 3, 2, False)),
        ({"Status": "running", "ExitCode": 0, "OOMKilled": True}, 1, ("running", None, 1, True)),
        ({"Status": "exited", "ExitCode": 137, "OOMKilled": True}, 0, ("exited", 137, 0, True)),
    ],
)
def test_container_info_reads_exit_code_restarts_and_oom(
    state: dict[str, object], restarts: int, expected: tuple[object, ...]
) -> None:
    """container_info keeps the exit code of a stopped or restarting container, the restart
    count and OOMKilled from `docker inspect` output."""
    info = container_info({"Id": "c", "Name": "/c", "State": state, "RestartCount": restarts})
    assert (info.status, info.exit_code, info.restart_count, info.oom_killed) == expected


@pytest.mark.docker
def test_crash_looping_container_reports_restarts_exit_code_and_logs(
    engine: Engine, image: str
) -> None:
    """A container that keeps exiting under a restart policy shows a growing restart count, its
    exit code while restarting (and in the event log), and every run's output in logs_tail."""
    info = engine.containers.run(
        _spec(
            image,
            restart="unless-stopped",
            command=["/bin/busybox", "sh", "-c", "echo FATAL: run >&2; exit 3"],
        )
    )
    seen = set()
    for _ in range(100):
        now = engine.containers.inspect(info.id)
        assert now is not None
        seen.add((now.status, now.exit_code))
        if now.restart_count >= 2 and ("restarting", 3) in seen:
            break
        time.sleep(0.05)
    assert now.restart_count >= 2 and ("restarting", 3) in seen, seen
    assert engine.containers.logs_tail(info.id, 50).count("FATAL: run") >= 2
    assert engine.containers.last_exit_code(info.id) == 3


def test_unreachable_engine_raises_engine_error_naming_the_host() -> None:
    """An engine that does not answer raises a transient EngineError naming host and URL."""
    url = f"tcp://127.0.0.1:{free_port()}"
    eng = Engine(Connection("lab-9", url, timeout=2))
    with pytest.raises(EngineError, match=rf"host lab-9 \({url}\): connect: .*refused"):
        eng.ping()


@pytest.mark.docker
def test_run_of_a_missing_image_raises_image_not_found(engine: Engine) -> None:
    """Creating a container from an image the engine lacks raises ImageNotFound."""
    with pytest.raises(ImageNotFound):
        engine.containers.run(_spec(f"pl-test-missing-{SESSION}:nope"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080", {"8080/tcp": [None]}),
        ("18080:8080", {"8080/tcp": [18080]}),
        ("127.0.0.1:80:8080/udp", {"8080/udp": [("127.0.0.1", 80)]}),
        ("127.0.0.1::8080", {"8080/tcp": [("127.0.0.1", None)]}),
    ],
)
def test_port_bindings_from_config_syntax(text: str, expected: dict[str, list[object]]) -> None:
    """Config port strings become the docker SDK's port bindings."""
    assert port_bindings([text]) == expected


def test_bad_port_and_restart_policy_are_stalling_errors() -> None:
    """Malformed ports or restart policies are refused as StallingError, not passed to Docker."""
    with pytest.raises(StallingError):
        port_bindings(["80:80:80:80"])
    with pytest.raises(StallingError):
        restart_policy("always:3")
    assert restart_policy("no") == {"Name": "no"}


def _named(sdk: docker.DockerClient, name: str) -> list[str]:
    return [n["Id"] for n in sdk.api.networks(names=[name]) if n["Name"] == name]


@pytest.fixture
def network_name(sdk: docker.DockerClient) -> Iterator[str]:
    """A network name no one else uses; every network of that name removed afterwards."""
    name = unique_name("pl-test-net")
    yield name
    for net_id in _named(sdk, name):
        with contextlib.suppress(docker.errors.APIError):
            sdk.api.remove_network(net_id)


@pytest.mark.docker
def test_concurrent_ensures_of_a_network_leave_exactly_one(network_name: str) -> None:
    """Eight rollouts ensuring the same network at once (each with its own connection) leave one
    network of that name, not several that make the name ambiguous (Docker's duplicate check is
    best effort)."""
    engines = [Engine.local() for _ in range(8)]
    start = threading.Barrier(len(engines))

    def ensure(engine: Engine) -> None:
        start.wait()
        engine.containers.ensure_network(network_name)

    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(ensure, engines))
    finally:
        for e in engines:
            e.close()
    sdk = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        assert len(_named(sdk, network_name)) == 1
    finally:
        sdk.close()


@pytest.mark.docker
def test_duplicate_networks_made_elsewhere_are_removed_keeping_the_one_in_use(
    engine: Engine, sdk: docker.DockerClient, image: str, network_name: str
) -> None:
    """Networks of one name that another process made at once are cut back to one: the one a
    running container is attached to stays; when each has containers, the error names them."""
    ids = [sdk.api.create_network(network_name, check_duplicate=False)["Id"] for _ in range(3)]
    used = sdk.containers.run(image, labels={TEST_LABEL: SESSION}, detach=True)
    sdk.api.connect_container_to_network(used.id, ids[1])  # by id: the name is ambiguous
    engine.containers.ensure_network(network_name)
    assert _named(sdk, network_name) == [ids[1]]
    other = sdk.api.create_network(network_name, check_duplicate=False)["Id"]
    more = sdk.containers.run(image, labels={TEST_LABEL: SESSION}, detach=True)
    sdk.api.connect_container_to_network(more.id, other)
    with pytest.raises(StallingError, match=rf"2 networks are named '{network_name}'.*rm ID"):
        engine.containers.ensure_network(network_name)
    assert sorted(_named(sdk, network_name)) == sorted([ids[1], other])
    for c in (used, more):
        c.remove(force=True)
