"""The lab's TLS registry: its own CA and server certificate (openssl), the trust every engine
gets through /etc/docker/certs.d, its config file, starting it, and asking whether it answers.

`LabError` lives here, the lowest lab module that raises it; `pipeline.lab.manage` re-exports it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.errors import StallingError
from pipeline.lab import net as lab_net

REGISTRY_PORT = 5000
CERTS_D = Path("/etc/docker/certs.d")


class LabError(StallingError):
    """The lab cannot be built or torn down as asked; the message says what to change."""


class RunningRegistry(NamedTuple):
    """A registry `start_registry` spawned: its address, TLS dir, pid and log file."""

    address: str
    tls: Path
    pid: int
    log: Path


def start_registry(
    reg_dir: Path, gateway: str, name: str, record: Callable[[str, Any], None]
) -> RunningRegistry:
    """Certify, trust, configure and spawn the registry on `gateway`, calling `record(key,
    value)` for each resource just before creating it, so a crash leaves it removable."""
    address = f"{gateway}:{REGISTRY_PORT}"
    record("registry", address)
    record("registry_insecure", False)
    tls = reg_dir / "tls"
    make_certs(tls, gateway, name)
    certs_d = CERTS_D / address
    record("certs_d", str(certs_d))
    certs_d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tls / "ca.crt", certs_d / "ca.crt")
    config = write_config(reg_dir, address, tls)
    log = reg_dir / "registry.log"
    pid = lab_net.spawn(["docker-registry", "serve", str(config)], log)
    record("registry_pid", pid)
    return RunningRegistry(address=address, tls=tls, pid=pid, log=log)


def untrust(certs_d: Path) -> None:
    """Remove the lab CA from the engines' certs.d directory, and the directory if now empty."""
    (certs_d / "ca.crt").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        certs_d.rmdir()  # only when empty: someone else's files stay


def write_config(reg_dir: Path, address: str, tls: Path) -> Path:
    """Write the registry's config.yml (TLS on `address`, storage below `reg_dir`); return it."""
    config = reg_dir / "config.yml"
    # JSON is YAML, and the registry reads YAML: no YAML library needed to write it.
    settings = {
        "version": "0.1",
        "log": {"level": "warn"},
        "storage": {
            "filesystem": {"rootdirectory": str(reg_dir / "data")},
            "delete": {"enabled": True},
        },
        "http": {
            "addr": address,
            "secret": secrets.token_hex(16),
            "tls": {"certificate": str(tls / "server.crt"), "key": str(tls / "server.key")},
        },
    }
    config.write_text(json.dumps(settings, indent=2) + "\n")
    return config


def registry_answers(address: str, ca_file: Path) -> bool:
    """True when the registry at address answers `GET /v2/` over TLS trusted by ca_file."""
    host, port = address.rsplit(":", 1)
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=3)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False


# -- certificates ---------------------------------------------------------------------------


def make_certs(dir: Path, address: str, name: str) -> None:
    """A CA of the lab's own and a server certificate for `address` signed by it."""
    dir.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = _run_openssl
    run(["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
         "-subj", f"/CN=pipeline lab {name} CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"], dir)  # fmt: skip
    run(["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={address}"], dir)
    (dir / "server.ext").write_text(
        f"subjectAltName=IP:{address}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    run(["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "3650",
         "-extfile", "server.ext"], dir)  # fmt: skip


def _run_openssl(args: list[str], cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise LabError(f"openssl {args[0]} failed in {cwd}: {res.stderr.strip()[-500:]}")
