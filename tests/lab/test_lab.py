"""The lab: real engines in network namespaces, a TLS registry they and the local engine trust,
and a teardown that leaves nothing behind."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import docker
import httpx
import pytest
from docker.errors import APIError, NotFound
from lab_subnets import SECOND_TEST_LAB_SUBNET
from pyroute2 import IPRoute

from pipeline.lab import net as lab_net
from pipeline.lab.manage import (
    LabError,
    LabHost,
    LabNeedsRootError,
    LabState,
    default_name,
    lab_down,
    lab_status,
    lab_up,
    parse_subnet,
    render_toml,
    require_root,
)

PUBLISHED_PORT = 18080

# -- pure checks ----------------------------------------------------------------------------


def test_require_root_refuses_other_users() -> None:
    """A non-root user gets a clear 'pipeline lab needs root' error; root passes."""
    with pytest.raises(LabNeedsRootError, match="^pipeline lab needs root: .*uid 1000"):
        require_root(euid=1000)
    require_root(euid=0)


@pytest.mark.parametrize(
    ("subnet", "hosts", "problem"),
    [
        ("8.8.8.0/24", 2, "not private"),
        ("10.88.0.0/30", 2, "no room"),
        ("10.88.0.1/24", 2, "host bits"),
        ("fd00::/64", 2, "only IPv4"),
        ("10.88.0.0/24", 0, "at least 1"),
    ],
)
def test_parse_subnet_refuses_unusable_subnets(subnet: str, hosts: int, problem: str) -> None:
    """A public, too small, malformed or IPv6 subnet is refused before anything is created."""
    with pytest.raises(LabError, match=problem):
        parse_subnet(subnet, hosts)


def test_default_name_is_short_and_stable(tmp_path: Path) -> None:
    """The name prefix is 6 chars, the same for a directory every time, different across dirs."""
    a, b = default_name(tmp_path / "a"), default_name(tmp_path / "b")
    assert len(a) == 6 and a.startswith("pl") and a == default_name(tmp_path / "a") and a != b


def test_render_toml_is_valid_toml_with_the_lab_tables() -> None:
    """The printed tables parse as TOML with a registry and one table per host."""
    hosts = [LabHost("lab-1", "tcp://10.88.0.2:2375", "10.88.0.2")]
    doc = tomllib.loads(render_toml("10.88.0.1:5000", False, hosts))
    assert doc["registry"] == {"address": "10.88.0.1:5000", "insecure": False}
    assert doc["hosts"]["lab-1"] == {"docker": "tcp://10.88.0.2:2375", "address": "10.88.0.2"}


# -- the session lab ------------------------------------------------------------------------


@pytest.mark.lab
def test_every_host_engine_answers(lab: LabState) -> None:
    """Each lab host's own dockerd answers a ping and reports its version over tcp://."""
    assert len(lab.hosts) == 2
    for _name, url, address in lab.hosts:
        assert url == f"tcp://{address}:2375"
        client = docker.DockerClient(base_url=url, timeout=10)
        try:
            assert client.ping() is True
            assert client.version()["Version"]
        finally:
            client.close()
    written = tomllib.loads((lab.dir / "pipeline.lab.toml").read_text())
    assert written["registry"]["address"] == lab.registry == (
        f"{next(ipaddress.ip_network(lab.subnet).hosts())}:5000"
    )
    assert sorted(written["hosts"]) == ["lab-1", "lab-2"]
    assert lab_status(lab.dir).alive


@pytest.mark.lab
def test_lab_up_again_returns_the_live_lab(lab: LabState) -> None:
    """`lab up` on a lab that is alive returns it unchanged (same engines, nothing restarted)."""
    pids = [d["pid"] for d in json.loads((lab.dir / "lab.json").read_text())["dockerds"]]
    again = lab_up(lab.dir, hosts=2, subnet=lab.subnet)
    assert again == lab
    assert pids == [d["pid"] for d in json.loads((lab.dir / "lab.json").read_text())["dockerds"]]


@contextmanager
def _local_image(engine: docker.DockerClient, context: Path, repo: str) -> Iterator[str]:
    """Build context as repo:<random tag> on the local engine; remove the image afterwards."""
    ref = f"{repo}:{uuid.uuid4().hex[:12]}"
    # No cache: other test sessions on this engine remove their images, and a cached step
    # whose image vanished mid-build fails it ("unknown parent image ID").
    engine.images.build(path=str(context), tag=ref, rm=True, nocache=True)
    try:
        yield ref
    finally:
        with suppress(NotFound):
            engine.images.remove(ref, force=True)


def _push(engine: docker.DockerClient, ref: str) -> None:
    repo, tag = ref.rsplit(":", 1)
    for line in engine.images.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in line, f"push of {ref} failed: {line}"


def _get_until_200(url: str, timeout: float = 15.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            resp = httpx.get(url, timeout=2, trust_env=False)
            if resp.status_code == 200:
                return resp
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout}s")
        time.sleep(0.1)


def _run_from_registry(url: str, ref: str, check: Callable[[str], None]) -> None:
    """Pull ref on the engine at url, run it publishing 8080, call check(address), clean up."""
    client = docker.DockerClient(base_url=url, timeout=60)
    name = f"labtest-{uuid.uuid4().hex[:8]}"
    try:
        repo, tag = ref.rsplit(":", 1)
        client.images.pull(repo, tag=tag)
        client.containers.run(ref, name=name, detach=True, ports={"8080/tcp": PUBLISHED_PORT})
        check(url.removeprefix("tcp://").rsplit(":", 1)[0])
    finally:
        with suppress(NotFound):
            client.containers.get(name).remove(force=True)
        with suppress(NotFound, APIError):
            client.images.remove(ref, force=True)
        client.close()


@pytest.mark.lab
def test_image_pushed_to_lab_registry_serves_on_every_host(
    lab: LabState, local_engine: docker.DockerClient, sample_app: Callable[..., Path]
) -> None:
    """An image built and pushed by the local engine is pulled over TLS by each host and its
    container answers HTTP 200 with the app's content on the host's address."""
    content = f"hello from the lab {uuid.uuid4().hex[:6]}"
    with _local_image(local_engine, sample_app(content=content), f"{lab.registry}/labtest/web") \
            as ref:
        _push(local_engine, ref)

        def check(address: str) -> None:
            resp = _get_until_200(f"http://{address}:{PUBLISHED_PORT}/")
            assert resp.text == content

        for _name, url, _address in lab.hosts:
            _run_from_registry(url, ref, check)


# -- a lab of its own, taken down -----------------------------------------------------------


def _leftovers(lab_dir: Path, name: str, certs_d: Path) -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line}" for line in netns.splitlines() if line.startswith(name)]
    with IPRoute() as ipr:
        ifnames = [str(link.get("ifname")) for link in ipr.get_links()]
    found += [f"link {ifname}" for ifname in ifnames if ifname.startswith(name)]
    marker = f"{lab_dir}/"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            argv = lab_net.cmdline(int(proc.name))
            if argv and any(marker in a for a in argv):
                found.append(f"process {proc.name}: {' '.join(argv)[:120]}")
    found += [f"mount {point}" for point in lab_net.mounts_below(lab_dir)]
    if certs_d.exists():
        found.append(f"certs.d {certs_d}")
    return found


@pytest.mark.lab
@pytest.mark.slow
def test_lab_down_leaves_nothing_behind(
    lab_prereqs: None,
    tmp_path_factory: pytest.TempPathFactory,
    local_engine: docker.DockerClient,
    sample_app: Callable[..., Path],
) -> None:
    """Down of a lab with a running container leaves no namespace, link, engine process,
    mount or certs.d entry behind, and a second down succeeds."""
    lab_dir = tmp_path_factory.mktemp("lab_down")
    try:
        own = lab_up(lab_dir, hosts=1, subnet=SECOND_TEST_LAB_SUBNET)
        ((_host, url, _address),) = own.hosts
        client = docker.DockerClient(base_url=url, timeout=60)
        app = sample_app(content=f"down {uuid.uuid4().hex}")
        with _local_image(local_engine, app, f"{own.registry}/labtest/down") as ref:
            _push(local_engine, ref)
            repo, tag = ref.rsplit(":", 1)
            client.images.pull(repo, tag=tag)
            # Left running on purpose: down must cope with a busy engine.
            client.containers.run(ref, detach=True, ports={"8080/tcp": PUBLISHED_PORT})
        client.close()
        assert lab_net.mounts_below(lab_dir), "a running container should hold mounts"
    finally:
        lab_down(lab_dir)
    assert _leftovers(lab_dir, own.name, Path("/etc/docker/certs.d") / own.registry) == []
    assert not (lab_dir / "lab.json").exists()
    lab_down(lab_dir)
