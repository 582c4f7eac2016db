"""The Caddy JSON config of one host's proxy, made from its `RouteTable` (pure).

Reference: Caddy 2 JSON config structure (https://caddyserver.com/docs/json/): `apps.http.servers`
with `routes` of `match` (host, path) and `handle` (`reverse_proxy` with `upstreams[].dial`);
`apps.tls.automation.policies` with an `internal` issuer for `tls = "internal"` and an `acme`
issuer (`ca`, `email`, `trusted_roots_pem_files`: https://caddyserver.com/docs/json/apps/tls/
automation/policies/issuers/acme/) for `tls = "acme"`; the admin endpoint
`GET /reverse_proxy/upstreams` for the requests in flight per upstream.

ACME challenges: Caddy's HTTP server answers HTTP-01 requests
(`/.well-known/acme-challenge/...`) before any route, on every server, `automatic_https`
disabled or not (caddyhttp `Server.ServeHTTP` calls the TLS app's `HandleHTTPChallenge` first),
so the plain server on port 80 answers them; TLS-ALPN-01 is answered by the TLS handshake of the
HTTPS server on 443. A public CA connects to ports 80 and 443 of the name's address: the host
must publish them there (`[proxy] http_port = 80`, `https_port = 443`, the defaults).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from pipeline.proxy.routes import Route, RouteTable, admin_host, container_of, probe_host

HTTP_PORT = 80  # inside the proxy container; published on the host's `[proxy] http_port`
HTTPS_PORT = 443  # inside; published on `https_port` when a route asks for TLS
ADMIN = "localhost:2019"  # Caddy's admin endpoint, inside the container only
TABLE_PATH = "/pipeline/routes"  # on the admin Host: the route table this config was made from


@dataclass(frozen=True)
class AcmeIssuer:
    """Where `tls = "acme"` routes get their certificates: `ca`, the ACME directory URL (None:
    Let's Encrypt's production directory, Caddy's default); `email`, the account's contact;
    `trusted_roots`, PEM files inside the proxy container that the directory's own HTTPS
    certificate chains to (a private CA's; none: the system's roots)."""

    ca: str | None = None
    email: str | None = None
    trusted_roots: tuple[str, ...] = ()

    @property
    def default(self) -> bool:
        """True when nothing is set: Caddy's default issuers are used unchanged."""
        return self == AcmeIssuer()

    def module(self) -> dict[str, Any]:
        """The issuer as Caddy's JSON names it (module "acme")."""
        issuer: dict[str, Any] = {"module": "acme"}
        if self.ca:
            issuer["ca"] = self.ca
        if self.email:
            issuer["email"] = self.email
        if self.trusted_roots:
            issuer["trusted_roots_pem_files"] = list(self.trusted_roots)
        return issuer


def _paths(prefix: str) -> list[str] | None:
    base = prefix.rstrip("/")
    return None if not base else [base, f"{base}/*"]


def _proxy_to(dial: str, **extra: Any) -> dict[str, Any]:
    return {"handler": "reverse_proxy", "upstreams": [{"dial": dial}], **extra}


def _user_route(route: Route) -> dict[str, Any] | None:
    if route.upstream is None:
        return None
    match: dict[str, Any] = {"host": list(route.hosts)}
    paths = _paths(route.path_prefix)
    if paths:
        match["path"] = paths
    return {"match": [match], "handle": [_proxy_to(route.upstream)], "terminal": True}


def _pipeline_routes(table: RouteTable) -> list[dict[str, Any]]:
    """Routes only pipeline uses: each standby container by its probe host, the read-only
    upstream counts of the admin endpoint, and the route table the config was made from (read
    back in one HTTP request instead of a copy out of the container; base64, since a
    static_response body is a template whose `{...}` Caddy would read as placeholders)."""
    routes: list[dict[str, Any]] = [
        {
            "match": [{"host": [admin_host(table.token)], "path": [TABLE_PATH], "method": ["GET"]}],
            "handle": [
                {
                    "handler": "static_response",
                    "status_code": 200,
                    "headers": {"Cache-Control": ["no-store"]},
                    "body": base64.b64encode(table.to_json().encode()).decode(),
                }
            ],
            "terminal": True,
        },
        {
            "match": [
                {
                    "host": [admin_host(table.token)],
                    "path": ["/reverse_proxy/upstreams"],
                    "method": ["GET"],
                }
            ],
            "handle": [_proxy_to(ADMIN, headers={"request": {"set": {"Host": [ADMIN]}}})],
            "terminal": True,
        },
    ]
    for route in table.routes:
        dials = [*route.standby, *([route.upstream] if route.upstream else [])]
        for dial in dials:
            routes.append(
                {
                    "match": [{"host": [probe_host(table.token, container_of(dial))]}],
                    "handle": [_proxy_to(dial)],
                    "terminal": True,
                }
            )
    return routes


def _not_found() -> dict[str, Any]:
    return {"handle": [{"handler": "static_response", "status_code": 404, "body": "no route\n"}]}


def caddy_config(table: RouteTable, acme: AcmeIssuer | None = None) -> dict[str, Any]:
    """The whole Caddy config for `table`: one plain-HTTP server with the pipeline routes and the
    routes of services without TLS, and (when a route asks for it) an HTTPS server with the
    others; longer path prefixes first; anything else answers 404. Host names of `internal`
    routes get Caddy's own CA; those of `acme` routes `acme` (None or `default`: Caddy's
    default issuers)."""
    ordered = sorted(table.routes, key=lambda r: (-len(r.path_prefix.rstrip("/")), r.service))
    plain = [r for r in (_user_route(x) for x in ordered if x.tls == "off") if r]
    secure = [r for r in (_user_route(x) for x in ordered if x.tls != "off") if r]
    servers: dict[str, Any] = {
        "http": {
            "listen": [f":{HTTP_PORT}"],
            "automatic_https": {"disable": True},
            "routes": [*_pipeline_routes(table), *plain, _not_found()],
        }
    }
    config: dict[str, Any] = {"admin": {"listen": ADMIN}, "apps": {"http": {"servers": servers}}}
    if table.https:
        servers["https"] = {
            "listen": [f":{HTTPS_PORT}"],
            "automatic_https": {"disable_redirects": True},
            "routes": [*secure, _not_found()],
        }
        policies = []
        internal = sorted({h for r in table.routes if r.tls == "internal" for h in r.hosts})
        if internal:
            policies.append({"subjects": internal, "issuers": [{"module": "internal"}]})
        acme_hosts = sorted({h for r in table.routes if r.tls == "acme" for h in r.hosts})
        if acme_hosts and acme is not None and not acme.default:
            policies.append({"subjects": acme_hosts, "issuers": [acme.module()]})
        if policies:
            config["apps"]["tls"] = {"automation": {"policies": policies}}
    return config
