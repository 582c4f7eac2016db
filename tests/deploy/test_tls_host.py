"""A tcp:// host behind mutual TLS (tls_ca, tls_cert, tls_key): a real lab engine reached only
through a TLS endpoint that demands a client certificate signed by its CA."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_helpers import one_service_config

from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.operations import status_rows
from pipeline.deploy.runner import Runner
from pipeline.errors import PipelineError
from pipeline.hosts.connection import Connection
from pipeline.hosts.engine import Engine
from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "1", "-subj", "/CN=pipeline test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile",
                 f"{name}.ext", cwd=d)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def tls_endpoint(d: Path, upstream: tuple[str, int]) -> Iterator[int]:
    """Serve mutual TLS on 127.0.0.1 and forward each connection to the engine `upstream`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(d / "server.crt", d / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                conn = ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()  # no or a wrong client certificate: refused
                continue
            engine = socket.create_connection(upstream)
            for a, b in ((conn, engine), (engine, conn)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_deploy_through_mutual_tls(lab: LabState, tmp_path: Path, git_remote: Any) -> None:
    """With tls_ca/tls_cert/tls_key a service deploys through the TLS endpoint; without the
    client certificate the engine refuses the connection."""
    certs = tmp_path / "certs"
    certs.mkdir()
    _certs(certs)
    host = lab.hosts[0]
    upstream = (host.address, int(host.docker_url.rsplit(":", 1)[1]))
    write_sample_app(git_remote.work, "web", "served over tls")
    git_remote.commit_push("app")
    with tls_endpoint(certs, upstream) as port:
        config = tmp_path / "pipeline.toml"
        host_table = (
            f'[hosts.secure]\ndocker = "tcp://127.0.0.1:{port}"\naddress = "{host.address}"\n'
            'tls_ca = "certs/ca.crt"\ntls_cert = "certs/client.crt"\ntls_key = "certs/client.key"'
        )
        config.write_text(
            one_service_config(lab.registry, host_table, git_remote.url, "tlsweb", 18556)
        )
        loaded = load(config)
        runner = Runner(loaded, State.in_dir(loaded.data_dir), Connections(loaded))
        try:
            result = runner.run_pass()
            assert result.ok, result.errors
            assert httpx.get(f"http://{host.address}:18556/", timeout=5).text == "served over tls"
            (row,) = status_rows(runner.state, runner.connections)
            assert row["state"] == "running"
            anonymous = Engine(Connection("anonymous", f"tcp://127.0.0.1:{port}",
                                          tls_ca=str(certs / "ca.crt")))
            with pytest.raises(PipelineError):
                anonymous.ping()
            anonymous.close()
        finally:
            engine = runner.connections.engine("secure")
            for c in engine.containers.managed_containers("tlsweb"):
                engine.containers.remove(c.id)
            runner.connections.close()
