"""The lab's system plumbing: a bridge, namespaces and veths (pyroute2), processes and mounts.

Every function is idempotent in the direction it goes (create skips what exists, delete skips
what is missing), so `lab down` can replay a half-written state file after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from pyroute2 import IPRoute, NetlinkError, NetNS, netns

log = structlog.get_logger(__name__)

NETNS_DIR = Path("/var/run/netns")
# The interface name inside each namespace; only the outside end needs a unique name.
INSIDE_IFNAME = "eth0"
_OCTAL = re.compile(r"\\([0-7]{3})")


def link_exists(ifname: str) -> bool:
    """True when a link of that name exists in the machine's own namespace."""
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def namespace_exists(name: str) -> bool:
    """True when a named network namespace exists (as `ip netns` sees it)."""
    return name in netns.listnetns()


def subnet_in_use(subnet: ipaddress.IPv4Network) -> list[str]:
    """Links of the machine's namespace holding an address inside `subnet` (a clash)."""
    clashes: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: str(link.get("ifname")) for link in ipr.get_links()}
        for addr in ipr.get_addr(family=2):
            address = addr.get("IFA_ADDRESS")
            if address and ipaddress.ip_address(address) in subnet:
                clashes.append(names.get(addr["index"], str(addr["index"])))
    return clashes


def create_bridge(ifname: str, address: str, prefixlen: int) -> None:
    """Create a bridge holding `address/prefixlen` and set it up."""
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=ifname):
            ipr.link("add", ifname=ifname, kind="bridge")
        index = ipr.link_lookup(ifname=ifname)[0]
        have = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)}
        if address not in have:
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")


def create_namespace(name: str) -> None:
    """Create a named network namespace unless it exists."""
    if not namespace_exists(name):
        netns.create(name)


def create_veth(
    outside: str, namespace: str, bridge: str, address: str, prefixlen: int, gateway: str
) -> None:
    """Join `namespace` to `bridge` with a veth pair; address the inside end, route via gateway.

    Brings up lo inside too, since a dockerd publishes ports on it and resolves localhost.
    """
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=outside):
            ipr.link(
                "add",
                ifname=outside,
                kind="veth",
                peer={"ifname": INSIDE_IFNAME, "net_ns_fd": namespace},
            )
        index = ipr.link_lookup(ifname=outside)[0]
        master = ipr.link_lookup(ifname=bridge)[0]
        ipr.link("set", index=index, master=master, state="up")
    with NetNS(namespace) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")
        eth = ns.link_lookup(ifname=INSIDE_IFNAME)[0]
        have = {a.get("IFA_ADDRESS") for a in ns.get_addr(index=eth, family=2)}
        if address not in have:
            ns.addr("add", index=eth, address=address, prefixlen=prefixlen)
        ns.link("set", index=eth, state="up")
        try:
            ns.route("add", dst="default", gateway=gateway)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


def delete_link(ifname: str) -> None:
    """Delete a link of the machine's namespace if it exists (a veth takes its peer along)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])


def delete_namespace(name: str) -> None:
    """Delete a named network namespace if it exists."""
    if namespace_exists(name):
        netns.remove(name)


def namespace_path(name: str) -> Path:
    """The bind-mounted file `nsenter --net=` takes for a named namespace."""
    return NETNS_DIR / name


# -- processes and mounts --------------------------------------------------------------------


def cmdline(pid: int) -> list[str]:
    """A process's argv from /proc; empty when it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_ours(pid: int, program: str, marker: str) -> bool:
    """True when pid runs `program` with `marker` (a path under the lab dir) in its argv."""
    argv = cmdline(pid)  # empty for a zombie or a vanished pid
    return bool(argv) and Path(argv[0]).name == program and any(marker in a for a in argv)


def gone(pid: int) -> bool:
    """True when pid no longer exists; reaps it first if it is a child of ours."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
    # Not "cmdline is empty": a dockerd whose main thread has exited shows as a zombie with
    # no cmdline while its other threads are still shutting down and holding mounts.
    return not Path(f"/proc/{pid}").exists()


def stop(
    pids: list[int], grace: float, sleep: Callable[[float], None] = time.sleep
) -> None:
    """SIGTERM every pid, wait up to `grace` seconds, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        alive = [p for p in pids if not gone(p)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            sleep(0.1)
            alive = [p for p in alive if not gone(p)]
        if not alive:
            return
        log.warning("lab.stop_escalate", pids=alive, signal=sig.name)


def spawn(argv: list[str], logfile: Path) -> int:
    """Start a daemon in its own session, output appended to logfile; returns its pid."""
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the CLI and its terminal's Ctrl-C
        )
    return proc.pid


_STRAY_PROGRAMS = {"dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2",
                   "docker-registry", "docker-proxy"}


def strays(dir: Path) -> list[int]:
    """Pids of engine or registry programs whose argv names a path below `dir`."""
    marker = str(dir) + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            argv = cmdline(int(entry.name))
            if argv and Path(argv[0]).name in _STRAY_PROGRAMS and any(marker in a for a in argv):
                found.append(int(entry.name))
    return found


def mounts_below(dir: Path) -> list[str]:
    """Mount points strictly below `dir`, deepest first (from /proc/mounts)."""
    prefix = str(dir.resolve()) + "/"
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 1:
            # /proc/mounts escapes space, tab, newline and backslash as octal.
            point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
            if point.startswith(prefix):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_below(dir: Path) -> None:
    """Unmount everything mounted below `dir`, lazily when a plain unmount is refused."""
    for point in mounts_below(dir):
        res = subprocess.run(["umount", "--", point], capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["umount", "--lazy", "--", point], capture_output=True, text=True)
        log.info("lab.unmount", path=point)
