"""An ssh:// lab host: sshd in a lab host's network namespace whose sessions reach that host's
engine, so that `docker system dial-stdio` run over ssh talks to it (TESTBED.md, "An ssh://
host"), and an `ssh` wrapper that uses this sshd's own client config (never ~/.ssh) and logs
the pid of each ssh process it starts. For the tests and benchmarks of ssh:// hosts."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.lab.manage import LabState

SSH_PORT = 2222
SSHD = Path("/usr/sbin/sshd")
_UP_WITHIN = 10.0  # seconds sshd gets to answer a first session


@dataclass(frozen=True)
class SshHost:
    """A lab host's sshd: `docker_url` (`ssh://root@ADDRESS:PORT`) for a config's `[hosts.*]
    docker`; `bin_dir` holds the `ssh` wrapper to put first on PATH; `starts()` lists the pids
    of the ssh processes started through it so far, in order."""

    address: str
    port: int
    dir: Path

    @property
    def docker_url(self) -> str:
        return f"ssh://root@{self.address}:{self.port}"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    def starts(self) -> list[int]:
        log = self.dir / "starts.log"
        return [int(pid) for pid in log.read_text().split()] if log.exists() else []


def _write_files(d: Path, address: str, port: int, docker_sock: str, before_exec: str) -> None:
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True)  # fmt: skip
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    (d / "sshd_config").write_text(
        f"ListenAddress {address}:{port}\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"SetEnv DOCKER_HOST=unix://{docker_sock}\n"
    )
    host_pub = " ".join((d / "host_key.pub").read_text().split()[:2])
    (d / "known_hosts").write_text(f"[{address}]:{port} {host_pub}\n")
    (d / "ssh_config").write_text(
        f"Host {address}\n  Port {port}\n  IdentityFile {d}/id\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d}/known_hosts\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
    )
    (d / "bin").mkdir()
    wrapper = d / "bin" / "ssh"
    wrapper.write_text(f"#!/bin/sh\necho $$ >> {d}/starts.log\n{before_exec}"
                       f'exec /usr/bin/ssh -F {d}/ssh_config "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)


@contextlib.contextmanager
def ssh_host(
    lab: LabState, dir: Path, *, index: int = 0, port: int = SSH_PORT, before_exec: str = ""
) -> Iterator[SshHost]:
    """sshd on lab host `index`'s address and `port` (its own host key, authorized key and
    config, all in `dir`, which must not exist yet; its log in `dir`/sshd.log), in that host's
    network namespace; stopped at the end. The wrapper runs `before_exec` (shell lines, e.g. a
    gate) after logging its pid. PATH is left to the caller: put `bin_dir` first on it.

    Raises FileNotFoundError without openssh-server (SSHD), RuntimeError when sshd does not
    answer a session within 10 s."""
    if not SSHD.exists():
        raise FileNotFoundError(f"{SSHD} is missing: apt-get install openssh-server")
    host = json.loads((lab.dir / "lab.json").read_text())["hosts"][index]
    address = host["address"]
    dir.mkdir()
    _write_files(dir, address, port, f"{host['dir']}/docker.sock", before_exec)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    log = (dir / "sshd.log").open("wb")  # a file: a pipe nobody reads would stall sshd
    sshd = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{host['namespace']}", str(SSHD), "-D", "-e", "-f",
         str(dir / "sshd_config")], stderr=log,
    )  # fmt: skip
    try:
        probe = [str(dir / "bin" / "ssh"), "-l", "root", "--", address, "true"]
        deadline = time.monotonic() + _UP_WITHIN
        while subprocess.run(probe, capture_output=True, check=False).returncode != 0:
            if time.monotonic() > deadline or sshd.poll() is not None:
                raise RuntimeError(f"sshd on {address}:{port} did not come up: "
                                   f"{(dir / 'sshd.log').read_text(errors='replace')}")  # fmt: skip
            time.sleep(0.2)
        yield SshHost(address, port, dir)
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)
        log.close()
