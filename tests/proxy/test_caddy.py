"""The proxy's route table, the Caddy config made from it and the files a host's proxy gets
(pure; `caddy validate` when the caddy binary is installed)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from pipeline.config.model import ProxySection
from pipeline.config.values import HttpsUrl
from pipeline.deploy.proxy import HostProxy
from pipeline.errors import ConfigError
from pipeline.hosts.engine import Engine
from pipeline.hosts.proxy import ACME_CA_ROOT, CADDY_JSON
from pipeline.lab.registry import make_certs
from pipeline.proxy.caddy import TABLE_PATH, AcmeIssuer, caddy_config
from pipeline.proxy.routes import (
    Route,
    RouteTable,
    admin_host,
    probe_host,
    switched,
    with_standby,
    without_standby,
)

WEB = Route("web", ("shop.example.com",), "/", 8080, "off")
API = Route("api", ("shop.example.com",), "/api", 9000, "internal")
SHOP = Route("shop", ("shop.example.com", "www.example.com"), "/", 8080, "acme")
PEBBLE = AcmeIssuer("https://10.0.0.1:14000/dir", "ops@example.com", ("/etc/caddy/root.pem",))


def _routes(config: dict, server: str = "http") -> list[dict]:
    return config["apps"]["http"]["servers"][server]["routes"]


def test_a_switch_keeps_the_old_container_reachable_by_pipeline_only() -> None:
    """After a switch users reach the new container; the old one is reachable only by its probe
    Host (so its requests in flight can be counted), until the standby is dropped."""
    route = with_standby(switched(WEB, "web-a:8080"), "web-b:8080")
    moved = switched(route, "web-b:8080")
    assert (moved.upstream, moved.standby) == ("web-b:8080", ("web-a:8080",))
    table = RouteTable("tok").put(moved)
    hosts = [r["match"][0]["host"] for r in _routes(caddy_config(table)) if "match" in r]
    assert [probe_host("tok", "web-a")] in hosts and ["shop.example.com"] in hosts
    assert without_standby(moved, ("web-a",)).standby == ()


def test_the_table_round_trips_and_longer_prefixes_match_first() -> None:
    """The stored table reads back equal; /api is matched before /; TLS routes go to the HTTPS
    server with Caddy's internal issuer; anything else answers 404."""
    table = RouteTable("tok").put(switched(WEB, "web-a:8080")).put(switched(API, "api-a:9000"))
    assert RouteTable.from_json(table.to_json()) == table
    config = caddy_config(table)
    https = _routes(config, "https")
    assert https[0]["match"][0]["path"] == ["/api", "/api/*"]
    assert https[-1]["handle"][0]["status_code"] == 404
    assert config["apps"]["tls"]["automation"]["policies"][0]["issuers"] == [{"module": "internal"}]
    plain = _routes(config)
    assert plain[-2]["handle"][0]["upstreams"] == [{"dial": "web-a:8080"}]


def test_the_config_serves_its_own_table_to_pipeline_only() -> None:
    """The table a config was made from is served, base64 (no `{...}` for Caddy to expand), on
    the admin Host with the proxy's token, to GET only; it decodes to the same table."""
    table = RouteTable("tok").put(with_standby(switched(WEB, "web-a:8080"), "web-b:8080"))
    (served,) = [r for r in _routes(caddy_config(table))
                 if r.get("match", [{}])[0].get("path") == [TABLE_PATH]]  # fmt: skip
    assert served["match"] == [{"host": [admin_host("tok")], "path": [TABLE_PATH],
                                "method": ["GET"]}]  # fmt: skip
    body = served["handle"][0]["body"]
    assert "{" not in body
    assert RouteTable.from_json(base64.b64decode(body)) == table


@pytest.mark.parametrize(
    ("routes", "acme", "policies"),
    [
        ((SHOP,), None, None),
        ((SHOP,), AcmeIssuer(), None),
        ((SHOP,), PEBBLE, [{"subjects": ["shop.example.com", "www.example.com"], "issuers": [
            {"module": "acme", "ca": "https://10.0.0.1:14000/dir", "email": "ops@example.com",
             "trusted_roots_pem_files": ["/etc/caddy/root.pem"]}]}]),
        ((SHOP,), AcmeIssuer(email="ops@example.com"), [
            {"subjects": ["shop.example.com", "www.example.com"],
             "issuers": [{"module": "acme", "email": "ops@example.com"}]}]),
        ((WEB, API), PEBBLE, [{"subjects": ["shop.example.com"],
                               "issuers": [{"module": "internal"}]}]),
    ],
)  # fmt: skip
def test_acme_routes_get_the_configured_acme_issuer(
    routes: tuple[Route, ...], acme: AcmeIssuer | None, policies: list[dict] | None
) -> None:
    """`tls = "acme"` host names get an automation policy with the `acme` issuer and the CA,
    email and trusted roots set (none set: Caddy's default issuers, Let's Encrypt first); the
    HTTPS server serves them with automatic HTTPS on, so Caddy orders their certificates."""
    table = RouteTable("tok")
    for route in routes:
        table = table.put(switched(route, f"{route.service}-a:{route.port}"))
    config = caddy_config(table, acme)
    assert config["apps"].get("tls", {}).get("automation", {}).get("policies") == policies
    https = config["apps"]["http"]["servers"]["https"]
    assert https["automatic_https"] == {"disable_redirects": True}


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed")
def test_caddy_accepts_the_config(tmp_path: Path) -> None:
    """Caddy 2 itself validates the config made for a table with every kind of route: plain,
    `internal` and `acme` (its issuer trusting a root file, as the proxy gets it)."""
    table = (
        RouteTable("tok")
        .put(switched(WEB, "web-a:8080"))
        .put(with_standby(switched(API, "api-a:9000"), "api-b:9000"))
        .put(switched(replace(SHOP, hosts=("www.example.com",)), "shop-a:8080"))
    )
    make_certs(tmp_path / "ca", "10.0.0.1", "test")
    acme = replace(PEBBLE, trusted_roots=(str(tmp_path / "ca" / "ca.crt"),))
    path = tmp_path / "caddy.json"
    path.write_text(json.dumps(caddy_config(table, acme)))
    done = subprocess.run(["caddy", "validate", "--config", str(path)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_proxy_gets_the_acme_root_only_while_a_route_uses_acme() -> None:
    """The files uploaded into a host's proxy carry `[proxy] acme_ca_root`'s PEM, at the path
    the acme issuer trusts, while a route has `tls = "acme"`; without one the root is neither
    read nor uploaded, and a root that cannot be read fails the change with its located error
    (nothing is uploaded)."""
    section = ProxySection(acme_ca=HttpsUrl("https://10.0.0.1:14000/dir"))
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    asked: list[str] = []

    def root() -> bytes:
        asked.append("root")
        return pem

    proxy = HostProxy("h1", cast(Engine, None), section, "10.0.0.2", acme_root=root)
    plain = RouteTable("tok").put(switched(WEB, "web-a:8080"))
    assert ACME_CA_ROOT not in proxy._files(plain) and asked == []
    files = proxy._files(plain.put(switched(SHOP, "shop-a:8080")))
    assert files[ACME_CA_ROOT] == pem
    (policy,) = json.loads(files[CADDY_JSON])["apps"]["tls"]["automation"]["policies"]
    assert policy["issuers"] == [{"module": "acme", "ca": "https://10.0.0.1:14000/dir",
                                  "trusted_roots_pem_files": [ACME_CA_ROOT]}]  # fmt: skip

    def unreadable() -> bytes:
        raise ConfigError(["pipeline.toml:3: proxy.acme_ca_root: cannot read root.pem: ..."])

    failing = HostProxy("h1", cast(Engine, None), section, "10.0.0.2", acme_root=unreadable)
    with pytest.raises(ConfigError, match=r"pipeline\.toml:3: proxy\.acme_ca_root"):
        failing._files(plain.put(switched(SHOP, "shop-a:8080")))
