"""`[clusters.*]` and cluster services in the config: what `validate` accepts, and the located
errors for a service with both `hosts` and `cluster`, Swarm keys on a host service, and more."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.load import parse
from pipeline.errors import ConfigError

BASE = """
[registry]
address = "10.88.0.1:5000"

[hosts.h1]
docker = "tcp://10.88.0.2:2375"

[clusters.prod]
docker = "tcp://10.88.0.2:2375"
address = "10.88.0.2"

[repos.shop]
url = "https://git.example.com/acme/shop.git"

[images.api]
repo = "shop"

[services.api]
image = "api"
"""

CLUSTER_SERVICE = """cluster = "prod"
replicas = 3
networks = ["backend"]
placement = ["node.labels.zone == a"]
ports = ["8081:8080"]
endpoint_mode = "dnsrr"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, Path("pipeline.toml"))
    return info.value.problems


def test_cluster_service_validates() -> None:
    """The issue's example config (a cluster and a service with cluster, replicas, networks,
    placement, ports, endpoint_mode) validates, and the service runs on the cluster."""
    loaded = parse(BASE + CLUSTER_SERVICE, Path("pipeline.toml"))
    svc = loaded.model.services["api"]
    assert (svc.cluster, svc.replicas, svc.networks, svc.endpoint_mode) == (
        "prod",
        3,
        ["backend"],
        "dnsrr",
    )
    assert svc.targets == ["prod"]
    assert loaded.model.clusters["prod"].reach_address == "10.88.0.2"


@pytest.mark.parametrize(
    ("service", "key", "message"),
    [
        (
            'cluster = "prod"\nhosts = ["h1"]\n',
            "services.api.cluster",
            "'hosts' or 'cluster'",
        ),
        ("", "services.api", "give 'hosts'"),
        (
            'hosts = ["h1"]\nreplicas = 2\n',
            "services.api.replicas",
            "only a service with",
        ),
        ('hosts = ["h1"]\nplacement = ["x"]\n', "services.api.placement", "Swarm setting"),
        ('hosts = ["h1"]\nnetworks = ["b"]\n', "services.api.networks", "Swarm setting"),
        ('hosts = ["h1"]\nendpoint_mode = "dnsrr"\n', "services.api.endpoint_mode", "Swarm"),
        ('cluster = "nope"\n', "services.api.cluster", "unknown cluster 'nope'"),
        (
            'cluster = "prod"\nnetwork = "backend"\n',
            "services.api.network",
            "in 'networks'",
        ),
        ('cluster = "prod"\nendpoint_mode = "mesh"\n', "services.api.endpoint_mode", "'vip'"),
        ('cluster = "prod"\nreplicas = -1\n', "services.api.replicas", "greater than or equal"),
        ('cluster = "prod"\nnetworks = ["host"]\n', "services.api.networks.0", "invalid network"),
    ],
)
def test_bad_cluster_keys_are_located(service: str, key: str, message: str) -> None:
    """Each misuse of the cluster keys is one error naming file:line and the key."""
    text = BASE + service
    found = problems(text)
    assert len(found) == 1, found
    where, shown_key, text_of = found[0].split(": ", 2)
    assert shown_key == key
    assert message in text_of
    line = int(where.split(":")[1])
    assert line > 1


def test_cluster_service_needs_a_registry() -> None:
    """A cluster's nodes pull from a registry: a cluster service without `[registry]` is an
    error at its `cluster` key."""
    text = (BASE + CLUSTER_SERVICE).replace('[registry]\naddress = "10.88.0.1:5000"\n', "")
    found = problems(text)
    assert any("services.api.cluster: a cluster's nodes pull" in p for p in found), found


@pytest.mark.parametrize(
    "command", [["logs", "api"], ["exec", "api", "--", "/bin/busybox", "true"]]
)
def test_logs_and_exec_of_a_cluster_service_say_where_its_tasks_are(
    tmp_path: Path, command: list[str]
) -> None:
    """`pipeline logs` and `pipeline exec` of a cluster service exit 2 with a line pointing to
    the Swarm's own commands, never a traceback."""
    import subprocess
    import sys

    (tmp_path / "pipeline.toml").write_text(BASE + CLUSTER_SERVICE)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *command[:2], "-c", str(tmp_path / "pipeline.toml"),
         *command[2:]],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "runs as Swarm tasks on cluster 'prod'" in done.stderr
    assert "docker -H tcp://10.88.0.2:2375 service logs api" in done.stderr
