"""A host's proxy routes as plain data, and how a rollout changes them (pure functions).

A host's `RouteTable` is what pipeline keeps inside its `pipeline-proxy` container (beside the
Caddy config made from it, see `caddy.caddy_config`): per proxied service, the Host headers
and path it serves, the container users' requests go to (`upstream`), and the containers only
pipeline reaches (`standby`: a new container under its health check, an old one draining).
Every change returns a new table; the caller uploads it and reloads the proxy in one step, so a
route switches atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

# Host names only pipeline sends: `.invalid` never resolves (RFC 2606), and the proxy's random
# token (a label of its container) makes them unguessable to anyone without the Docker API.
PIPELINE_DOMAIN = "pipeline.invalid"
TABLE_VERSION = 1


@dataclass(frozen=True)
class Route:
    """One proxied service on one host: requests whose Host is one of `hosts` and whose path
    starts with `path_prefix` go to `upstream` (None: not serving yet). Upstreams are Caddy
    dial addresses, "CONTAINER:PORT" (the container's name resolves on the shared network);
    `port` is the container port new containers are reached on."""

    service: str
    hosts: tuple[str, ...]
    path_prefix: str
    port: int
    tls: str  # "off", "internal" or "acme"
    upstream: str | None = None
    standby: tuple[str, ...] = ()

    def dial(self, container: str) -> str:
        """The dial address of one of this service's containers on `port` ("name:port")."""
        return f"{container}:{self.port}"

    def defined_as(self, other: Route) -> Route:
        """This route's containers under `other`'s definition (hosts, path, port, TLS)."""
        return replace(other, upstream=self.upstream, standby=self.standby)


@dataclass(frozen=True)
class RouteTable:
    """Every route of one host's proxy, with the proxy's `token` (see `probe_host`)."""

    token: str
    routes: tuple[Route, ...] = field(default_factory=tuple)

    def route(self, service: str) -> Route | None:
        """The service's route, or None."""
        return next((r for r in self.routes if r.service == service), None)

    def put(self, route: Route) -> RouteTable:
        """The table with `route` added or replacing the service's route."""
        others = tuple(r for r in self.routes if r.service != route.service)
        return replace(self, routes=tuple(sorted((*others, route), key=lambda r: r.service)))

    def remove(self, service: str) -> RouteTable:
        """The table without the service's route."""
        return replace(self, routes=tuple(r for r in self.routes if r.service != service))

    @property
    def https(self) -> bool:
        """True when a route asks for TLS (the proxy then publishes its HTTPS port too)."""
        return any(r.tls != "off" for r in self.routes)

    def to_json(self) -> str:
        """The table as stored in the proxy container."""
        data = {
            "version": TABLE_VERSION,
            "token": self.token,
            "routes": [
                {
                    "service": r.service,
                    "hosts": list(r.hosts),
                    "path_prefix": r.path_prefix,
                    "port": r.port,
                    "tls": r.tls,
                    "upstream": r.upstream,
                    "standby": list(r.standby),
                }
                for r in self.routes
            ],
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> RouteTable:
        """Read a stored table. Raises ValueError when it is not one."""
        try:
            data: Any = json.loads(text)
            routes = tuple(
                Route(
                    service=str(r["service"]),
                    hosts=tuple(str(h) for h in r["hosts"]),
                    path_prefix=str(r["path_prefix"]),
                    port=int(r["port"]),
                    tls=str(r["tls"]),
                    upstream=None if r.get("upstream") is None else str(r["upstream"]),
                    standby=tuple(str(c) for c in r.get("standby") or ()),
                )
                for r in data["routes"]
            )
            return cls(token=str(data["token"]), routes=routes)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a pipeline route table: {exc}") from None


def probe_host(token: str, container: str) -> str:
    """The Host header that reaches `container` through the proxy, for pipeline only."""
    return f"{container}.{token}.{PIPELINE_DOMAIN}"


def admin_host(token: str) -> str:
    """The Host header of the proxy's read-only upstream counts (requests in flight)."""
    return f"admin.{token}.{PIPELINE_DOMAIN}"


def container_of(dial: str) -> str:
    """The container name of a dial address ("web-1a2b-r3:8080" -> "web-1a2b-r3")."""
    return dial.rsplit(":", 1)[0]


def with_standby(route: Route, dial: str) -> Route:
    """`route` with `dial` reachable by pipeline (a new container about to be checked)."""
    if dial in route.standby or dial == route.upstream:
        return route
    return replace(route, standby=(*route.standby, dial))


def switched(route: Route, dial: str | None) -> Route:
    """`route` sending users to `dial` (None: to nothing); what it sent them to before stays
    reachable by pipeline, so that its requests in flight can still be counted."""
    standby = [c for c in route.standby if c != dial]
    if route.upstream and route.upstream != dial and route.upstream not in standby:
        standby.append(route.upstream)
    return replace(route, upstream=dial, standby=tuple(standby))


def without_standby(route: Route, containers: tuple[str, ...] | None = None) -> Route:
    """`route` with the standby upstreams of `containers` (names; default: all) dropped."""
    if containers is None:
        return replace(route, standby=())
    keep = tuple(d for d in route.standby if container_of(d) not in containers)
    return replace(route, standby=keep)
