"""Upgrading from the pydantic config model (before msgspec) restarts nothing and forgets no
release: a config that did not change hashes as it did, and the settings a release stored in
the database as the pydantic model dumped them read back the same.

The hashes and the stored JSON below were computed by the pydantic version (main at 4e73955)
from `CONFIG`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config.load import parse
from pipeline.plan.planner import image_spec_hash, service_spec_hash
from pipeline.state.rollbacks import ServiceSettings

CONFIG = """[registry]
address = "10.88.0.1:5000"

[hosts.h1]
docker = "tcp://10.88.0.2:2375"

[clusters.prod]
docker = "tcp://10.88.0.3:2375"

[proxy]

[repos.shop]
url = "https://git.example.com/acme/shop.git"

[images.web]
repo = "shop"
context = "./web/"
watch = ["lib/", "!lib/docs"]
build_args = { A = "1" }
target = "prod"
secrets = { npm_env = "NPM_TOKEN" }
cache_from = "type=registry,ref=x"

[services.web]
image = "web"
hosts = ["h1"]
ports = ["8080", "127.0.0.1:9000:9000/udp"]
env = { MODE = "prod", TOKEN = "s3cret" }
command = ["/bin/busybox", "httpd"]
volumes = ["data:/data:ro"]
cpus = 1
memory = "256m"
restart = "always"
labels = { team = "a" }
stop_timeout = "1m30s"
max_parallel = 2

[services.web.health]
http = "/health"
port = 8080
expect_status = [200]
interval = "500ms"
timeout = 20
healthy_threshold = 2
monitor = "3s"

[services.api]
image = "web"
cluster = "prod"
replicas = 3
networks = ["backend"]
placement = ["node.role==worker"]
endpoint_mode = "dnsrr"

[services.api.health]
tcp = 8080

[services.site]
image = "web"
hosts = ["h1"]

[services.site.proxy]
hosts = ["shop.example.com"]
port = 8080
drain = "5s"
tls = "internal"

[services.site.health]
cmd = ["/bin/true"]
"""

# service: (service_spec_hash without an env file, with env file text "A=1\\n")
HASHES = {
    "web": (
        "e44c88b4c1d3185afd9b11c2f9f7b09be5e92ef6d654db6ede0b525c0ddaed72",
        "919c26037e8b01f1542421f039a612c8aae02e73dc6205d97651b0094858520b",
    ),
    "api": (
        "debf4891f270f50025417d5d11ceefa9c6cbcdefebd94f0404828d70f1730221",
        "7eb30d2fd53c2ca32fc9dedcf73455bbb953b11c96430bfe1b7b4a5ccccfaa60",
    ),
    "site": (
        "65c4a61029c948a0e398234c6caf75ee89bbca0cc71ef7a124cf6e0c9495e7b7",
        "0b52edbfeb7ba56e85a9d551ad42d40dac21293b879df8243d030a0155cbddb8",
    ),
}
IMAGE_HASH = "cd07acb91e36b5ff4ed5d7f343f4c1e2cec4161c87e6b43e84cde9b6f601fdf0"

# ServiceSettings(service, "A=1\\n").to_json() of each service, as the pydantic model wrote it.
STORED = {
    "web": (
        '{"env_file_text": "A=1\\n", "format": 1, "service": {"cluster": null, '
        '"command": ["/bin/busybox", "httpd"], "cpus": 1.0, "endpoint_mode": null, '
        '"env": {"MODE": "prod", "TOKEN": "s3cret"}, "env_file": null, '
        '"health": {"cmd": null, "docker": false, "expect_status": [200], '
        '"healthy_threshold": 2, "http": "/health", "interval": 0.5, "monitor": 3.0, '
        '"port": 8080, "tcp": null, "timeout": 20.0}, "hosts": ["h1"], "image": "web", '
        '"labels": {"team": "a"}, "max_parallel": 2, "memory": "256m", '
        '"network": "bridge", "networks": [], "placement": [], "ports": ["8080", '
        '"127.0.0.1:9000:9000/udp"], "proxy": null, "replicas": null, '
        '"restart": "always", "stop_timeout": 90.0, "strategy": "stop-first", '
        '"volumes": ["data:/data:ro"]}}'
    ),
    "api": (
        '{"env_file_text": "A=1\\n", "format": 1, "service": {"cluster": "prod", '
        '"command": null, "cpus": null, "endpoint_mode": "dnsrr", "env": {}, '
        '"env_file": null, "health": {"cmd": null, "docker": false, "expect_status": [], '
        '"healthy_threshold": 1, "http": null, "interval": 1.0, "monitor": 5.0, '
        '"port": null, "tcp": 8080, "timeout": 30.0}, "hosts": [], "image": "web", '
        '"labels": {}, "max_parallel": 1, "memory": null, "network": "bridge", '
        '"networks": ["backend"], "placement": ["node.role==worker"], "ports": [], '
        '"proxy": null, "replicas": 3, "restart": "unless-stopped", '
        '"stop_timeout": 10.0, "strategy": "stop-first", "volumes": []}}'
    ),
    "site": (
        '{"env_file_text": "A=1\\n", "format": 1, "service": {"cluster": null, '
        '"command": null, "cpus": null, "endpoint_mode": null, "env": {}, '
        '"env_file": null, "health": {"cmd": ["/bin/true"], "docker": false, '
        '"expect_status": [], "healthy_threshold": 1, "http": null, "interval": 1.0, '
        '"monitor": 5.0, "port": null, "tcp": null, "timeout": 30.0}, "hosts": ["h1"], '
        '"image": "web", "labels": {}, "max_parallel": 1, "memory": null, '
        '"network": "bridge", "networks": [], "placement": [], "ports": [], '
        '"proxy": {"drain": 5.0, "hosts": ["shop.example.com"], "path_prefix": "/", '
        '"port": 8080, "tls": "internal"}, "replicas": null, '
        '"restart": "unless-stopped", "stop_timeout": 10.0, "strategy": "stop-first", '
        '"volumes": []}}'
    ),
}


@pytest.mark.parametrize("service", sorted(HASHES))
def test_an_unchanged_config_hashes_as_before(service: str) -> None:
    """Each service's spec hash (what decides a redeploy) and the image's build hash are the
    ones the pydantic model gave, so upgrading pipeline redeploys and rebuilds nothing."""
    model = parse(CONFIG, Path("pipeline.toml")).model
    assert (
        service_spec_hash(model.services[service]),
        service_spec_hash(model.services[service], "A=1\n"),
    ) == HASHES[service]
    assert image_spec_hash(model.images["web"]) == IMAGE_HASH


@pytest.mark.parametrize("service", sorted(STORED))
def test_settings_stored_by_the_pydantic_model_read_back(service: str) -> None:
    """Release settings the pydantic model stored read back as the service's table (a rollback
    can restore them) and are written again as they were, plus only the keys added since, at
    their defaults (`proxy.retain`)."""
    settings = ServiceSettings.from_json(STORED[service])
    assert settings is not None
    assert settings.service == parse(CONFIG, Path("pipeline.toml")).model.services[service]
    assert settings.env_file_text == "A=1\n"
    written = json.loads(settings.to_json())
    if written["service"]["proxy"] is not None:
        assert written["service"]["proxy"].pop("retain") == "paused"
    assert json.dumps(written, sort_keys=True) == STORED[service]
