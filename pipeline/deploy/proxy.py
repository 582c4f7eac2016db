"""The proxy of each host as a rollout uses it: made when missing, its route table read and
changed in one upload-and-reload (so a route switches atomically), new containers probed
through it on a Host only pipeline sends, and old ones drained of their requests in flight.

The route table lives in the proxy container itself (`hosts.proxy.ROUTES_JSON`), beside the
Caddy config made from it: whoever changes a host's routes reads the table there, so services
rolled out by different processes keep each other's routes. Changes by one process are
serialised per host by a lock.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import requests
import structlog

from pipeline.config.model import ProxySection, ServiceSection
from pipeline.deploy.connections import Connections
from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.engine import LABEL_PREFIX, Engine
from pipeline.hosts.proxy import (
    ACME_CA_ROOT,
    CADDY_JSON,
    PROXY_NAME,
    ROUTES_JSON,
    ProxyInfo,
    ProxySpec,
)
from pipeline.proxy.caddy import TABLE_PATH, AcmeIssuer, caddy_config
from pipeline.proxy.routes import Route, RouteTable, admin_host, container_of, probe_host
from pipeline.state.store import State

log = structlog.get_logger(__name__)

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
DRAIN_POLL = 0.1  # seconds between looks at an old container's requests in flight
_ADMIN_TIMEOUT = (0.5, 2.0)  # seconds to connect, to read: requests to the proxy of this host


class ProxyError(StallingError):
    """A host's proxy could not be made, read or reloaded: the host fails as an unhealthy one
    would (rolled back), and the revision is kept out until a newer commit or a deploy."""

    failure_kind = "unhealthy"


def _lock(engine: Engine) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(engine.url, threading.Lock())


def route_of(service: str, spec: ServiceSection) -> Route:
    """A service's route with no container yet, from its `[services.NAME.proxy]` table."""
    assert spec.proxy is not None
    p = spec.proxy
    return Route(service, tuple(p.hosts), p.path_prefix, p.port, p.tls)


@dataclass
class HostProxy:
    """The proxy of host `host` (its engine, and the address its published ports are reached
    at); `auth` pulls the proxy's image."""

    host: str
    engine: Engine
    section: ProxySection
    address: str
    auth: Mapping[str, str] | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    # Held around each read-modify-write of the route table: the table is one file that every
    # service on the host shares, and another process (a CLI deploy beside `pipeline serve`,
    # another instance on the same database) may change it at the same time. The in-process
    # lock below only orders this process's threads.
    exclusive: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    # The routes a proxy made where there was none start with (`recorded_routes`): when the
    # container was removed with its table, users of every proxied service get their serving
    # container back at the first rollout on the host, not a 404 until each one's next deploy.
    seed: Callable[[], tuple[Route, ...]] = tuple
    # The PEM of `[proxy] acme_ca_root` (`LoadedConfig.acme_ca_root_pem`: None when unset),
    # asked for only while a route of the host has `tls = "acme"`; raises ConfigError.
    acme_root: Callable[[], bytes | None] = lambda: None

    def __post_init__(self) -> None:
        self._ready: ProxyInfo | None = None  # the proxy as this object last made sure of it
        self._ready_https = False
        self._served_ok = True  # False once the table could not be read over HTTP: not again
        self._session: requests.Session | None = None

    def _get(self, path: str, token: str) -> requests.Response:
        """GET `path` of this proxy's pipeline-only admin Host (`routes.admin_host(token)`) on
        its published port: one kept session, so a switch and a drain's polls reuse a
        connection. requests, as the health probes: the docker SDK has loaded it already.
        Raises requests.RequestException."""
        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # no proxy from the environment in between
        return self._session.get(
            self.url(path), headers={"Host": admin_host(token)}, timeout=_ADMIN_TIMEOUT
        )

    # -- the container ----------------------------------------------------------------------
    def spec(self, https: bool) -> ProxySpec:
        """The container the proxy must be, HTTPS published or not."""
        s = self.section
        return ProxySpec(s.image, s.http_port, s.https_port if https else None, s.network)

    def ensure(self, https: bool = False) -> ProxyInfo:
        """The running proxy container, made (or made anew, keeping its routes) when it is
        missing or differs from the config; started when it stopped. Raises ProxyError."""
        try:
            return self._ensure(https)
        except PipelineError as exc:
            if isinstance(exc, ProxyError) or exc.retry:  # an engine that may answer later
                raise
            raise ProxyError(f"host {self.host}: the proxy could not be started: {exc}") from exc

    def _ensure(self, https: bool) -> ProxyInfo:
        # Once seen right by this rollout, a proxy is not asked again (each question to a
        # remote engine costs a round trip; a rollback should take well under a second).
        if self._ready is not None and (not https or self._ready_https):
            return self._ready
        info = self.engine.proxy.inspect()
        table = (self._served(info) or self._stored(info)) if info is not None else None
        https = https or (table is not None and table.https)
        wanted = self.spec(https)
        if info is not None and info.spec_key == wanted.key:
            if info.status != "running":
                self.engine.proxy.start()
                info = self.engine.proxy.inspect() or info
            self._ready, self._ready_https = info, https
            return info
        self.engine.containers.ensure_network(self.section.network)
        if not self.engine.has_image(wanted.image):
            self.engine.pull(wanted.image, auth=self.auth)
        token = info.token if info is not None and info.token else secrets.token_hex(12)
        table = RouteTable(token, table.routes if table else self.seed() if info is None else ())
        log.info("proxy.create", host=self.host, image=wanted.image, http=wanted.http_port,
                 https=wanted.https_port, replaces=info.id[:12] if info else None)  # fmt: skip
        made = self.engine.proxy.create(wanted, token, self._files(table))
        self._ready, self._ready_https = made, https
        return made

    @property
    def token(self) -> str:
        """The proxy's token (see `routes.probe_host`), the proxy made first when missing."""
        return self.ensure().token

    def _served(self, info: ProxyInfo) -> RouteTable | None:
        """The route table the proxy serves now, read over HTTP on its published port (a few
        ms; a copy out of the container through the engine takes ~0.1 s, most of a switch's
        time after the reload). None when it cannot be read that way (a proxy made by an
        older pipeline, a port this machine cannot reach): the caller reads the file."""
        if not self._served_ok or not info.token:
            return None
        try:
            answer = self._get(TABLE_PATH, info.token)
            if answer.status_code == 200:
                table = RouteTable.from_json(base64.b64decode(answer.content, validate=True))
                if table.token == info.token:
                    return table
        except (requests.RequestException, ValueError):  # binascii.Error is a ValueError
            pass
        self._served_ok = False
        return None

    def _stored(self, info: ProxyInfo) -> RouteTable:
        data = self.engine.proxy.read(ROUTES_JSON)
        if data is None:
            return RouteTable(info.token)
        try:
            return RouteTable.from_json(data)
        except ValueError as exc:
            raise ProxyError(f"host {self.host}: {ROUTES_JSON} of the proxy: {exc}") from None

    def _files(self, table: RouteTable) -> dict[str, bytes]:
        """The files of the proxy container for `table`: its Caddy config, the table, and the
        ACME CA's root when a route has `tls = "acme"` and `[proxy] acme_ca_root` is set (the
        issuer trusts it at its path in the container). Raises ConfigError (the root)."""
        files: dict[str, bytes] = {}
        acme = None
        if any(r.tls == "acme" for r in table.routes):
            root = self.acme_root()
            if root is not None:
                files[ACME_CA_ROOT] = root
            s = self.section
            acme = AcmeIssuer(s.acme_ca, s.acme_email, (ACME_CA_ROOT,) if root else ())
        files[CADDY_JSON] = json.dumps(caddy_config(table, acme), indent=1).encode()
        files[ROUTES_JSON] = table.to_json().encode()
        return files

    # -- routes -----------------------------------------------------------------------------
    def table(self) -> RouteTable | None:
        """The host's route table as its proxy holds it; None when there is no proxy."""
        info = self.engine.proxy.inspect()
        return None if info is None else (self._served(info) or self._stored(info))

    def change(self, change: Callable[[RouteTable], RouteTable]) -> RouteTable:
        """Read the host's routes, apply `change`, and load the result into the proxy in one
        reload (nothing when unchanged); the proxy is made first when missing. Raises
        ProxyError when the proxy cannot be made or refuses the config (the old routes stay)."""
        unchanged = self._unchanged(change)
        if unchanged is not None:
            return unchanged
        with _lock(self.engine), self.exclusive():
            try:
                info = self._ensure(False)
                before = self._served(info) or self._stored(info)
                after = change(before)
                if after.https and not before.https:  # HTTPS must be published: made anew
                    info = self._ensure(True)
                if after == before:
                    return after
                self.engine.proxy.load(self._files(after), self._files(before))
            except PipelineError as exc:
                self._ready = None  # look again next time
                if isinstance(exc, ProxyError) or exc.retry:
                    raise
                raise ProxyError(f"its proxy could not take the new routes: {exc}") from exc
            log.info("proxy.reloaded", host=self.host, routes=[
                (r.service, r.upstream) for r in after.routes])  # fmt: skip
            return after

    def _unchanged(self, change: Callable[[RouteTable], RouteTable]) -> RouteTable | None:
        """The table the running proxy serves when `change` leaves it as it is, seen without
        the lease (two writes to the database): a service's own route is changed only by its
        rollout, which holds the service's lease, so no one else can make the change needed.
        A rollback's standby route to the container it kept is usually still there. None:
        the change must be made (or the proxy could not be read this way)."""
        try:
            info = self._ready or self.engine.proxy.inspect()
        except PipelineError:
            return None
        if info is None or info.status != "running":
            return None
        served = self._served(info)
        return served if served is not None and change(served) == served else None

    # -- reaching containers through it -----------------------------------------------------
    def url(self, path: str) -> str:
        """The URL of `path` on the proxy's published HTTP port."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.section.http_port}{path}"

    def probe_headers(self, token: str, container: str) -> dict[str, str]:
        """The headers that send a request to `container` (pipeline only)."""
        return {"Host": probe_host(token, container)}

    def in_flight(self, token: str, dial: str) -> int | None:
        """Requests the proxy has in flight to upstream `dial` ("name:port"): 0 when no route
        of its config reaches that upstream any more; None when it cannot tell."""
        try:
            answer = self._get("/reverse_proxy/upstreams", token)
            if answer.status_code != 200:
                return None
            for upstream in answer.json():
                if upstream.get("address") == dial:
                    return int(upstream.get("num_requests", 0))
        except (requests.RequestException, ValueError, TypeError):
            return None
        return 0

    def drain(self, token: str, dial: str, until: float) -> int | None:
        """Wait until the proxy has no request in flight to `dial`, or `until` (this clock's
        time) passes; return the requests still in flight then (None: unknown)."""
        while True:
            count = self.in_flight(token, dial)
            if count == 0 or self.clock() >= until:
                return count
            self.sleep(min(DRAIN_POLL, max(0.0, until - self.clock())))


def recorded_routes(
    services: Mapping[str, ServiceSection], state: State, engine: Engine, host: str
) -> tuple[Route, ...]:
    """The routes of a proxy made anew on `host` after its container (and the route table in
    it) was removed: each proxied service of `services` on the host, sending users to the
    container its deployment record names when that container runs, else to nothing (404 until
    the service's next rollout). Raises EngineError when the engine does not answer."""
    routes = []
    for name, spec in sorted(services.items()):
        if spec.proxy is None or host not in spec.hosts:
            continue
        route = route_of(name, spec)
        record = state.deployment(name, host)
        running = (
            engine.containers.inspect(record.container_id)
            if record is not None and record.container_id
            else None
        )
        if running is not None and running.status == "running":
            route = replace(route, upstream=route.dial(running.name))
        routes.append(route)
    return tuple(routes)


def proxy_status(connections: Connections) -> list[dict[str, Any]]:
    """`pipeline proxy status --json`: one object per host of a proxied service: `host`,
    `proxy` (its container's `state` and `image`, or null when there is none), `error` (an
    engine that does not answer), and `routes`, one per service: `service`, `hosts`,
    `path_prefix`, `port`, `tls`, `container` (the container users' requests go to, null when
    none), `container_state`, `revision` and `standby` (containers only pipeline reaches)."""
    cfg = connections.loaded.model
    hosts = sorted({h for s in cfg.services.values() if s.proxy is not None for h in s.hosts})
    out: list[dict[str, Any]] = []
    for host in hosts:
        row: dict[str, Any] = {"host": host, "proxy": None, "error": None, "routes": []}
        out.append(row)
        engine = connections.engine(host)
        try:
            info = engine.proxy.inspect()
            if info is None:
                continue
            row["proxy"] = {"container": PROXY_NAME, "state": info.status, "image": info.image}
            data = engine.proxy.read(ROUTES_JSON)
            table = RouteTable.from_json(data) if data else RouteTable(info.token)
            for route in table.routes:
                name = container_of(route.upstream) if route.upstream else None
                container = engine.containers.inspect(name) if name else None
                row["routes"].append(
                    {
                        "service": route.service,
                        "hosts": list(route.hosts),
                        "path_prefix": route.path_prefix,
                        "port": route.port,
                        "tls": route.tls,
                        "container": name,
                        "container_state": container.status if container else None,
                        "revision": container.labels.get(f"{LABEL_PREFIX}revision")
                        if container
                        else None,
                        "standby": [container_of(d) for d in route.standby],
                    }
                )
        except (PipelineError, ValueError) as exc:
            row["error"] = str(exc)
    return out
