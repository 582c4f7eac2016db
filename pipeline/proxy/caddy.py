"""The Caddy JSON config of one host's proxy, made from its `RouteTable` (pure).

Reference: Caddy 2 JSON config structure (https://caddyserver.com/docs/json/): `apps.http.servers`
with `routes` of `match` (host, path) and `handle` (`reverse_proxy` with `upstreams[].dial`);
`apps.tls.automation.policies` with an `internal` issuer for `tls = "internal"`; the admin
endpoint `GET /reverse_proxy/upstreams` for the requests in flight per upstream.
"""

from __future__ import annotations

import base64
from typing import Any

from pipeline.proxy.routes import Route, RouteTable, admin_host, container_of, probe_host

HTTP_PORT = 80  # inside the proxy container; published on the host's `[proxy] http_port`
HTTPS_PORT = 443  # inside; published on `https_port` when a route asks for TLS
ADMIN = "localhost:2019"  # Caddy's admin endpoint, inside the container only
TABLE_PATH = "/pipeline/routes"  # on the admin Host: the route table this config was made from


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


def caddy_config(table: RouteTable) -> dict[str, Any]:
    """The whole Caddy config for `table`: one plain-HTTP server with the pipeline routes and the
    routes of services without TLS, and (when a route asks for it) an HTTPS server with the
    others; longer path prefixes first; anything else answers 404."""
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
        internal = sorted({h for r in table.routes if r.tls == "internal" for h in r.hosts})
        if internal:
            config["apps"]["tls"] = {
                "automation": {
                    "policies": [{"subjects": internal, "issuers": [{"module": "internal"}]}]
                }
            }
    return config
