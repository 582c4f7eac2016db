"""The `pipeline-proxy` container of one engine: created, inspected, and given a new config
through the Docker API only (files uploaded with `put_archive`, `caddy reload` run with exec),
so it works on `unix://`, `tcp://` (TLS too) and `ssh://` hosts with no extra port opened.

The container runs the proxy's image (one that behaves like the official `caddy:2`:
`/usr/bin/caddy`) with `net.ipv4.tcp_migrate_req=1` in its network namespace: Caddy opens a
new listening socket on each config load and closes the old one, and without this sysctl the
kernel resets the connections still queued on the old socket (measured in TESTBED.md, "A
reverse proxy"; kernel doc: Documentation/networking/ip-sysctl.rst, tcp_migrate_req). Caddy's
data directory, /data, is the named volume `pipeline-proxy-data` (the official image's docs,
https://hub.docker.com/_/caddy: /data holds certificates and keys and must be persisted).
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import docker.errors
import structlog

from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.connection import Connection, ImageNotFound
from pipeline.hosts.containers import LABEL_PREFIX, MANAGED_LABEL

log = structlog.get_logger(__name__)

PROXY_NAME = "pipeline-proxy"
CADDY = "/usr/bin/caddy"
CONFIG_DIR = "/etc/caddy"
CADDY_JSON = f"{CONFIG_DIR}/pipeline.json"  # the Caddy config the proxy runs
ROUTES_JSON = f"{CONFIG_DIR}/pipeline-routes.json"  # pipeline's route table it was made from
ACME_CA_ROOT = f"{CONFIG_DIR}/pipeline-acme-ca-root.pem"  # `[proxy] acme_ca_root`, uploaded
# Caddy's storage (XDG_DATA_HOME=/data in the official image): certificates, ACME accounts, its
# own CA. A named volume, so that a proxy made anew (another image, other ports) serves the
# certificates it had instead of ordering them again (Let's Encrypt limits duplicate orders to
# 5 a week) or making a new CA; the official image's anonymous /data volume would be left behind.
DATA_VOLUME = "pipeline-proxy-data"
DATA_DIR = "/data"
PROXY_LABEL = LABEL_PREFIX + "proxy"
TOKEN_LABEL = LABEL_PREFIX + "proxy.token"
SPEC_LABEL = LABEL_PREFIX + "proxy.spec"
_START_WAIT = 10.0  # seconds a just-started proxy gets to answer its first reload
_EXEC_WAIT = 30.0  # seconds a `caddy reload` gets to finish


@dataclass(frozen=True)
class ProxySpec:
    """What the proxy container must be: its image, the host ports it publishes for the
    container's 80 and 443 (`https_port` None: HTTPS not published) and its network."""

    image: str
    http_port: int
    https_port: int | None
    network: str

    @property
    def key(self) -> str:
        """The spec as recorded in a label: a container with another key is made anew."""
        return f"{self.image}|{self.http_port}|{self.https_port or '-'}|{self.network}"


@dataclass(frozen=True)
class ProxyInfo:
    """The proxy container as the engine reports it."""

    id: str
    status: str
    token: str
    spec_key: str
    image: str


def _tar(files: Mapping[str, bytes]) -> bytes:
    """A tar of `files` (absolute paths under CONFIG_DIR) to extract at /etc."""
    out = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=out, mode="w") as tar:
        folder = tarfile.TarInfo("caddy")
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, now
        tar.addfile(folder)
        for path, data in files.items():
            if not path.startswith(CONFIG_DIR + "/"):
                raise ValueError(f"{path}: the proxy's files live in {CONFIG_DIR}")
            info = tarfile.TarInfo("caddy/" + path[len(CONFIG_DIR) + 1 :])
            info.size, info.mode, info.mtime = len(data), 0o644, now
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class ProxyContainer:
    """The proxy container of the engine behind `conn`; errors are pipeline's kinds."""

    def __init__(self, conn: Connection, sleep: Callable[[float], None] = time.sleep) -> None:
        self._conn = conn
        self._sleep = sleep

    def inspect(self) -> ProxyInfo | None:
        """The proxy container, or None when there is none. Raises StallingError when a
        container of that name exists that pipeline did not create."""
        with self._conn.calling(f"inspect container {PROXY_NAME}"):
            try:
                attrs = self._conn.client.api.inspect_container(PROXY_NAME)
            except docker.errors.NotFound:
                return None
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        if labels.get(PROXY_LABEL) != "true":
            raise StallingError(
                f"{self._conn.where}: container {PROXY_NAME!r} exists and was not created by "
                f"pipeline (no {PROXY_LABEL} label); refusing to use or replace it"
            )
        return ProxyInfo(
            id=str(attrs.get("Id", "")),
            status=str((attrs.get("State") or {}).get("Status", "unknown")),
            token=str(labels.get(TOKEN_LABEL, "")),
            spec_key=str(labels.get(SPEC_LABEL, "")),
            image=str((attrs.get("Config") or {}).get("Image", "")),
        )

    def create(self, spec: ProxySpec, token: str, files: Mapping[str, bytes]) -> ProxyInfo:
        """Create the proxy container (a pipeline-made one of that name is replaced), upload
        `files` before it starts, start it and wait until its admin endpoint takes a config.
        The image must be on the engine (ImageNotFound otherwise)."""
        if self.inspect() is not None:
            self.remove()
        api = self._conn.client.api
        ports = {80: spec.http_port}
        if spec.https_port is not None:
            ports[443] = spec.https_port
        with self._conn.calling(f"create container {PROXY_NAME}", not_found=ImageNotFound):
            host_config = api.create_host_config(
                port_bindings=ports,
                restart_policy={"Name": "unless-stopped"},
                network_mode=spec.network,
                sysctls={"net.ipv4.tcp_migrate_req": "1"},
                binds={DATA_VOLUME: {"bind": DATA_DIR, "mode": "rw"}},
            )
            created = api.create_container(
                spec.image,
                command=[CADDY, "run", "--config", CADDY_JSON],
                name=PROXY_NAME,
                labels={
                    MANAGED_LABEL: "true",
                    PROXY_LABEL: "true",
                    TOKEN_LABEL: token,
                    SPEC_LABEL: spec.key,
                },
                ports=list(ports),
                volumes=[DATA_DIR],
                host_config=host_config,
                detach=True,
            )
        container_id = str(created["Id"])
        try:
            self._put(container_id, files)
            with self._conn.calling(f"start container {PROXY_NAME}"):
                api.start(container_id)
            self._wait_ready(container_id)
        except BaseException:
            self.remove()
            raise
        log.info("proxy started", host=self._conn.name, image=spec.image, http=spec.http_port)
        info = self.inspect()
        assert info is not None
        return info

    def _wait_ready(self, container_id: str) -> None:
        """Reload the config it started with until its admin endpoint answers."""
        deadline = time.monotonic() + _START_WAIT
        while True:
            code, _said = self._exec(container_id, [CADDY, "reload", "--config", CADDY_JSON])
            if code == 0:
                return
            info = self.inspect()
            if info is None or info.status != "running" or time.monotonic() > deadline:
                logs = self._logs(container_id)
                raise StallingError(
                    f"{self._conn.where}: proxy {PROXY_NAME} did not start (caddy reload exit "
                    f"{code})\n--- its last log lines ---\n{logs}"
                )
            self._sleep(0.1)

    def start(self) -> None:
        """Start the proxy container again after it stopped, and wait until it takes a config."""
        info = self.inspect()
        if info is None:
            raise StallingError(f"{self._conn.where}: no {PROXY_NAME} container")
        with self._conn.calling(f"start container {PROXY_NAME}"):
            self._conn.client.api.start(info.id)
        self._wait_ready(info.id)

    def remove(self) -> None:
        """Force-remove the proxy container; gone is fine."""
        with self._conn.calling(f"remove container {PROXY_NAME}"):
            try:
                self._conn.client.api.remove_container(PROXY_NAME, force=True)
            except docker.errors.NotFound:
                return

    def read(self, path: str) -> bytes | None:
        """The content of one file of the proxy container, or None when it has no such file."""
        with self._conn.calling(f"read {path} of {PROXY_NAME}"):
            try:
                stream, _stat = self._conn.client.api.get_archive(PROXY_NAME, path)
            except docker.errors.NotFound:
                return None
            data = b"".join(stream)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            handle = tar.extractfile(member) if member is not None else None
            return handle.read() if handle is not None else None

    def load(self, files: Mapping[str, bytes], previous: Mapping[str, bytes]) -> None:
        """Upload `files` and have Caddy load CADDY_JSON (`caddy reload`: the admin endpoint
        swaps the whole config at once). When the reload fails, `previous` (the files Caddy
        still serves) is uploaded back, so the container's files always describe the routes
        it serves. Raises StallingError with Caddy's words when it refuses the config,
        EngineError when the engine does not answer."""
        self._put(PROXY_NAME, files)
        try:
            code, output = self._exec(PROXY_NAME, [CADDY, "reload", "--config", CADDY_JSON])
            if code != 0:
                raise StallingError(
                    f"{self._conn.where}: {PROXY_NAME}: caddy reload failed (exit {code}); its "
                    f"last log lines:\n{output.strip()[-1500:]}"
                )
        except PipelineError:
            with contextlib.suppress(PipelineError):  # the reload's error is the one to tell
                self._put(PROXY_NAME, previous)
            raise

    def _put(self, container: str, files: Mapping[str, bytes]) -> None:
        with self._conn.calling(f"upload config to {PROXY_NAME}"):
            ok = self._conn.client.api.put_archive(container, "/etc", _tar(files))
        if not ok:
            raise StallingError(f"{self._conn.where}: {PROXY_NAME}: the engine refused the upload")

    def _exec(self, container: str, cmd: list[str]) -> tuple[int, str]:
        """Run `cmd` in the container and wait for its exit code. Started detached and then
        inspected: an attached exec hijacks the connection, which the ssh:// transport does
        not survive (the next call on it fails with a broken pipe). What the command said is
        in the container's log (Caddy's admin endpoint logs a refused config there), so the
        text returned is the log's last lines when it failed."""
        api = self._conn.client.api
        with self._conn.calling(f"exec {cmd[1]} in {PROXY_NAME}"):
            created = api.exec_create(container, cmd)
            api.exec_start(created["Id"], detach=True)
            deadline = time.monotonic() + _EXEC_WAIT
            while True:
                state: Any = api.exec_inspect(created["Id"])
                if not state.get("Running") and state.get("ExitCode") is not None:
                    break
                if time.monotonic() > deadline:
                    return -1, f"{' '.join(cmd)} did not finish within {_EXEC_WAIT:g}s"
                self._sleep(0.02)
        code = int(state["ExitCode"])
        return code, "" if code == 0 else self._logs(container)

    def _logs(self, container: str) -> str:
        try:
            with self._conn.calling(f"logs of {PROXY_NAME}"):
                data = self._conn.client.api.logs(container, tail=20)
        except Exception as exc:  # a courtesy beside the real error
            return f"(logs unavailable: {exc})"
        return bytes(data).decode("utf-8", "replace").rstrip()
