"""The lab: real target Docker hosts on this machine, each a network namespace with its own
dockerd, joined by a bridge, plus a TLS registry on the bridge address that every engine trusts.

`DIR/lab.json` records each resource just before it is created, so `lab_down` removes exactly
what exists, after a crash too, and can run any number of times.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import docker
import structlog

from pipeline.lab import net as lab_net
from pipeline.lab import proxy_image

# CERTS_D, REGISTRY_PORT, LabError and registry_answers stay importable from here.
from pipeline.lab.registry import CERTS_D as CERTS_D
from pipeline.lab.registry import REGISTRY_PORT as REGISTRY_PORT
from pipeline.lab.registry import LabError, registry_answers, start_registry, untrust

log = structlog.get_logger(__name__)

DOCKER_PORT = 2375
STATE_FILE = "lab.json"
TOML_FILE = "pipeline.lab.toml"
REQUIRED_TOOLS = ("ip", "dockerd", "docker-registry", "openssl", "nsenter", "umount")
# A unix socket path longer than this is refused by the kernel (sun_path is 108 bytes).
_MAX_SOCK_PATH = 100
_STOP_GRACE = 15.0


class LabNeedsRootError(LabError):
    """Namespaces, links and other engines need root; the CLI exits 2 on this."""


class LabHost(NamedTuple):
    """One target host of the lab, unpackable as (name, docker_url, address)."""

    name: str
    docker_url: str
    address: str


@dataclass(frozen=True)
class LabState:
    """A running lab: where it lives, its hosts, its registry and the TOML tables describing it."""

    dir: Path
    name: str
    subnet: str
    bridge: str
    registry: str
    registry_insecure: bool
    hosts: tuple[LabHost, ...]
    toml: str
    proxy_image: str | None = None  # the lab registry's caddy image; None without caddy

    @property
    def ca_file(self) -> Path:
        """The lab CA's certificate, for clients other than dockerd (which read certs.d)."""
        return self.dir / "registry" / "tls" / "ca.crt"


@dataclass(frozen=True)
class HostStatus:
    """Whether one host's engine answers, and its version when it does."""

    host: LabHost
    answers: bool
    version: str | None


@dataclass(frozen=True)
class LabStatus:
    """What `lab status` reports: the recorded lab (None if there is none) and what answers."""

    state: LabState | None
    hosts: tuple[HostStatus, ...]
    registry_answers: bool

    @property
    def alive(self) -> bool:
        """True when a lab is recorded and its registry and every engine answer."""
        return (
            self.state is not None and self.registry_answers and all(h.answers for h in self.hosts)
        )


# -- checks ---------------------------------------------------------------------------------


def require_root(euid: int | None = None) -> None:
    """Raise LabNeedsRootError unless running as root (`euid` injectable for tests)."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        raise LabNeedsRootError(
            "pipeline lab needs root: it creates network namespaces, a bridge and dockerds "
            f"(running as uid {euid}); run it with sudo or as root"
        )


def missing_tools(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The programs the lab runs that are not on PATH."""
    return [tool for tool in REQUIRED_TOOLS if which(tool) is None]


def parse_subnet(subnet: str, hosts: int) -> ipaddress.IPv4Network:
    """Validate a lab subnet: IPv4, private, room for the bridge plus `hosts` addresses."""
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise LabError(f"lab subnet {subnet!r}: {exc}") from exc
    if not isinstance(net, ipaddress.IPv4Network):
        raise LabError(f"lab subnet {subnet!r}: only IPv4 subnets are supported")
    if not net.is_private:
        # The lab must never route traffic to addresses that belong to someone else.
        raise LabError(f"lab subnet {subnet!r} is not private (use e.g. 10.88.0.0/24)")
    if hosts < 1:
        raise LabError(f"lab hosts: need at least 1, got {hosts}")
    if net.num_addresses - 2 < hosts + 1:
        raise LabError(f"lab subnet {subnet!r} has no room for a bridge and {hosts} hosts")
    return net


def default_name(dir: Path) -> str:
    """A short prefix unique to the lab directory: `pl` + 4 hex chars of its path's hash."""
    digest = hashlib.sha256(str(dir.resolve()).encode()).hexdigest()
    return "pl" + digest[:4]


def _check_name(name: str) -> str:
    # The longest derived link name is NAME + "v" + host number; links allow 15 chars.
    if not (name.isascii() and name.isalnum() and 1 <= len(name) <= 8):
        raise LabError(f"lab name {name!r}: use 1-8 ASCII letters or digits")
    return name


# -- the state file -------------------------------------------------------------------------


class _Record:
    """The state file, rewritten after every change so a crash leaves an accurate list."""

    def __init__(self, dir: Path, data: dict[str, Any]) -> None:
        self.path = dir / STATE_FILE
        self.data = data

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def append(self, key: str, value: Any) -> None:
        self.data.setdefault(key, []).append(value)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def _load(dir: Path) -> dict[str, Any] | None:
    path = dir / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabError(f"{path}: unreadable lab state ({exc}); remove it by hand") from exc
    return data if isinstance(data, dict) else None


def _state_from(dir: Path, data: dict[str, Any]) -> LabState | None:
    try:
        hosts = tuple(LabHost(h["name"], h["docker_url"], h["address"]) for h in data["hosts"])
        return LabState(
            dir=dir,
            name=data["name"],
            subnet=data["subnet"],
            bridge=data["bridge"],
            registry=data["registry"],
            registry_insecure=bool(data.get("registry_insecure", False)),
            hosts=hosts,
            toml=render_toml(
                data["registry"],
                bool(data.get("registry_insecure")),
                hosts,
                data.get("proxy_image"),
            ),
            proxy_image=data.get("proxy_image"),
        )
    except (KeyError, TypeError):
        return None  # a lab that crashed while coming up: not usable, only removable


def render_toml(
    registry: str, insecure: bool, hosts: Iterable[LabHost], proxy: str | None = None
) -> str:
    """The `[registry]`, `[proxy]` (with the lab's caddy image, when it has one) and `[hosts.*]`
    tables describing a lab, for a pipeline config."""
    lines = [
        "# Written by `pipeline lab up`: the lab's registry, proxy image and target hosts.",
        "[registry]",
        f'address = "{registry}"',
        f"insecure = {'true' if insecure else 'false'}",
    ]
    if proxy:
        lines += ["", "[proxy]", f'image = "{proxy}"', "http_port = 80", "https_port = 443",
                  'network = "pipeline"']  # fmt: skip
    for host in hosts:
        lines += [
            "",
            f"[hosts.{host.name}]",
            f'docker = "{host.docker_url}"',
            f'address = "{host.address}"',
        ]
    return "\n".join(lines) + "\n"


# -- processes ------------------------------------------------------------------------------


def _wait_until(
    what: str,
    check: Callable[[], bool],
    alive: Callable[[], bool],
    logfile: Path,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not alive():
            tail = logfile.read_text(errors="replace")[-1500:] if logfile.exists() else ""
            raise LabError(f"{what} exited while starting; end of {logfile}:\n{tail}")
        if time.monotonic() > deadline:
            raise LabError(f"{what} did not answer within {timeout:.0f}s; see {logfile}")
        sleep(0.2)


def _alive(pid: int) -> bool:
    return not lab_net.gone(pid)


def _engine_up(docker_url: str) -> bool:
    return engine_answers(docker_url) is not None


def engine_answers(docker_url: str) -> str | None:
    """The engine's version when the Docker engine at docker_url answers a ping, else None."""
    try:
        client = docker.DockerClient(base_url=docker_url, timeout=3)
        try:
            client.ping()
            return str(client.version().get("Version", "?"))
        finally:
            client.close()
    except Exception:  # any failure to connect or answer means "not answering"
        return None


# -- up, down, status -----------------------------------------------------------------------


def lab_up(
    dir: Path,
    hosts: int = 2,
    subnet: str = "10.88.0.0/24",
    name: str | None = None,
    *,
    timeout: float = 30.0,
) -> LabState:
    """Bring up a lab of `hosts` engines and a registry in `dir`, and write its TOML tables.

    A lab already alive in `dir` with the same shape is returned as is; a dead or different one
    is taken down first. A failure while coming up takes down whatever was made.
    """
    require_root()
    missing = missing_tools()
    if missing:
        raise LabError(f"pipeline lab needs these programs on PATH: {', '.join(missing)}")
    net = parse_subnet(subnet, hosts)
    dir = dir.resolve()
    name = _check_name(name or default_name(dir))
    if _load(dir) is not None:
        status = lab_status(dir)
        st = status.state
        if status.alive and st and (st.subnet, len(st.hosts), st.name) == (str(net), hosts, name):
            log.info("lab.already_up", dir=str(dir), hosts=hosts)
            return st
        log.info("lab.replace", dir=str(dir), reason="not alive or different shape")
        lab_down(dir)
    clashes = lab_net.subnet_in_use(net)
    if clashes:
        raise LabError(
            f"lab subnet {net} is already in use on link(s) {', '.join(clashes)}: "
            "another lab? pick another --subnet or take that lab down"
        )
    taken = [
        n
        for n in (f"{name}br", *(f"{name}v{i}" for i in range(1, hosts + 1)))
        if lab_net.link_exists(n)
    ]
    if taken:
        raise LabError(f"lab name {name!r}: links {', '.join(taken)} already exist")
    dir.mkdir(parents=True, exist_ok=True)
    rec = _Record(dir, {"name": name, "subnet": str(net), "dir": str(dir)})
    rec.save()
    try:
        return _build(dir, rec, net, name, hosts, timeout)
    except BaseException:
        log.error("lab.up_failed", dir=str(dir))
        lab_down(dir)
        raise


def _build(
    dir: Path, rec: _Record, net: ipaddress.IPv4Network, name: str, count: int, timeout: float
) -> LabState:
    addrs = [str(a) for a in net.hosts()]
    gateway = addrs[0]
    bridge = f"{name}br"
    rec.set("bridge", bridge)
    lab_net.create_bridge(bridge, gateway, net.prefixlen)
    log.info("lab.bridge", bridge=bridge, address=f"{gateway}/{net.prefixlen}")

    reg = start_registry(dir / "registry", gateway, name, rec.set)

    hosts: list[dict[str, str]] = []
    logs: list[tuple[int, Path]] = []
    for i in range(1, count + 1):
        ns, veth, address = f"{name}-h{i}", f"{name}v{i}", addrs[i]
        hdir = dir / f"h{i}"
        hdir.mkdir(exist_ok=True)
        if len(str(hdir / "exec" / "containerd" / "containerd.sock.ttrpc")) > _MAX_SOCK_PATH:
            raise LabError(f"lab dir {dir}: path too long for the engines' unix sockets")
        rec.append("namespaces", ns)
        lab_net.create_namespace(ns)
        rec.append("veths", veth)
        lab_net.create_veth(veth, ns, bridge, address, net.prefixlen, gateway)
        # /etc/docker/daemon.json is read by every dockerd: each host gets its own, empty.
        (hdir / "daemon.json").write_text("{}\n")
        url = f"tcp://{address}:{DOCKER_PORT}"
        argv = [
            "nsenter", f"--net={lab_net.namespace_path(ns)}", "--",  # only the netns: see TESTBED
            "dockerd", "--config-file", str(hdir / "daemon.json"),
            "--data-root", str(hdir / "data"), "--exec-root", str(hdir / "exec"),
            "--pidfile", str(hdir / "dockerd.pid"),
            "-H", f"unix://{hdir / 'docker.sock'}", "-H", url, "--tls=false",
            "--containerd-namespace", f"{ns}", "--containerd-plugins-namespace", f"{ns}p",
        ]  # fmt: skip
        pid = lab_net.spawn(argv, hdir / "dockerd.log")
        rec.append("dockerds", {"pid": pid, "data_root": str(hdir / "data")})
        logs.append((pid, hdir / "dockerd.log"))
        hosts.append(
            {
                "name": f"lab-{i}",
                "docker_url": url,
                "address": address,
                "namespace": ns,
                "veth": veth,
                "dir": str(hdir),
            }
        )
        log.info("lab.host", host=f"lab-{i}", namespace=ns, docker=url, pid=pid)

    _wait_until(
        "registry",
        lambda: registry_answers(reg.address, reg.tls / "ca.crt"),
        partial(_alive, reg.pid),
        reg.log,
        timeout,
    )
    for host, (pid, logfile) in zip(hosts, logs, strict=True):
        _wait_until(
            f"dockerd of {host['name']}",
            partial(_engine_up, host["docker_url"]),
            partial(_alive, pid),
            logfile,
            timeout,
        )
    try:
        rec.set("proxy_image", proxy_image.build_and_push(reg.address))
    except LabError as exc:  # proxied services need it; everything else works without
        log.warning("lab.no_proxy_image", reason=str(exc))
    rec.set("hosts", hosts)  # last: a lab with "hosts" recorded came up completely
    state = _state_from(dir, rec.data)
    assert state is not None
    (dir / TOML_FILE).write_text(state.toml)
    log.info("lab.up", dir=str(dir), registry=reg.address, hosts=count)
    return state


def lab_down(dir: Path, *, grace: float = _STOP_GRACE) -> None:
    """Remove every resource recorded for the lab in `dir`; missing ones are skipped."""
    require_root()
    dir = dir.resolve()
    data = _load(dir)
    if data is None:
        log.info("lab.down_nothing", dir=str(dir))
        return
    pids = [
        int(d["pid"])
        for d in data.get("dockerds", [])
        if lab_net.is_ours(int(d["pid"]), "dockerd", str(d["data_root"]))
    ]
    reg_pid = data.get("registry_pid")
    if reg_pid and lab_net.is_ours(int(reg_pid), "docker-registry", str(dir)):
        pids.append(int(reg_pid))
    for d in data.get("dockerds", []):
        _kill_containers(Path(d["data_root"]).parent / "docker.sock")
    lab_net.stop(pids, grace)
    # A dockerd killed with SIGKILL leaves its containerd and shims: find them by their argv.
    lab_net.stop(lab_net.strays(dir), 5.0)
    lab_net.unmount_below(dir)
    for veth in data.get("veths", []):
        lab_net.delete_link(veth)
    for ns in data.get("namespaces", []):
        lab_net.delete_namespace(ns)
    if data.get("bridge"):
        lab_net.delete_link(data["bridge"])
    if data.get("certs_d"):
        untrust(Path(data["certs_d"]))
    (dir / STATE_FILE).unlink(missing_ok=True)
    log.info("lab.down", dir=str(dir))


def _kill_containers(sock: Path) -> None:
    """Kill the engine's running containers, so its shutdown does not wait 10 s on each."""
    if not sock.is_socket():
        return
    # The unix socket, not tcp://: it works even when the lab's links are already gone.
    with contextlib.suppress(Exception):
        client = docker.DockerClient(base_url=f"unix://{sock}", timeout=5)
        try:
            for container in client.containers.list():
                with contextlib.suppress(Exception):
                    container.kill()
        finally:
            client.close()


def lab_status(dir: Path) -> LabStatus:
    """What the lab recorded in `dir` is and whether its engines and registry answer."""
    dir = dir.resolve()
    data = _load(dir)
    state = _state_from(dir, data) if data else None
    if state is None:
        return LabStatus(state=None, hosts=(), registry_answers=False)
    if not lab_net.link_exists(state.bridge):
        # Without the bridge, the lab's addresses would route out of the machine: don't ask.
        down = tuple(HostStatus(host=h, answers=False, version=None) for h in state.hosts)
        return LabStatus(state=state, hosts=down, registry_answers=False)
    hosts = []
    for host in state.hosts:
        version = engine_answers(host.docker_url)
        hosts.append(HostStatus(host=host, answers=version is not None, version=version))
    reg_ok = registry_answers(state.registry, state.ca_file)
    return LabStatus(state=state, hosts=tuple(hosts), registry_answers=reg_ok)
