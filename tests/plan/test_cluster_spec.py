"""The pure Swarm service spec of a cluster service, and how a failed cluster rollout is undone."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config.model import ServiceSection, decode
from pipeline.plan.cluster import memory_bytes, swarm_service_spec, undo_of

REF = "10.88.0.1:5000/api@sha256:" + "a" * 64


def spec_of(**keys: Any) -> dict[str, Any]:
    section = decode(ServiceSection, {"image": "api", "cluster": "prod", **keys})
    return swarm_service_spec("api", section, REF, env={"A": "1"}, labels={"l": "v"})


def test_spec_maps_the_service_keys_to_swarm() -> None:
    """replicas, strategy, max_parallel, monitor, ports (host mode), placement, networks,
    endpoint_mode, resources, volumes and stop_timeout land where Swarm reads them."""
    spec = spec_of(
        replicas=3,
        strategy="start-first",
        max_parallel=2,
        ports=["8080", "9000/udp"],
        placement=["node.labels.zone == a"],
        networks=["backend"],
        endpoint_mode="dnsrr",
        cpus=0.5,
        memory="256m",
        volumes=["data:/data", "/srv:/srv:ro"],
        stop_timeout="2s",
        command=["sh", "-c", "x"],
        health={"http": "/health", "monitor": "3s"},
    )
    task = spec["TaskTemplate"]
    assert task["ContainerSpec"]["Image"] == REF
    assert task["ContainerSpec"]["Env"] == ["A=1"]
    assert task["ContainerSpec"]["Args"] == ["sh", "-c", "x"]
    assert task["ContainerSpec"]["StopGracePeriod"] == 2_000_000_000
    assert task["ContainerSpec"]["Mounts"] == [
        {"Type": "volume", "Source": "data", "Target": "/data", "ReadOnly": False},
        {"Type": "bind", "Source": "/srv", "Target": "/srv", "ReadOnly": True},
    ]
    assert task["Resources"] == {"Limits": {"NanoCPUs": 500_000_000, "MemoryBytes": 256 * 2**20}}
    assert task["Placement"] == {"Constraints": ["node.labels.zone == a"]}
    assert task["Networks"] == [{"Target": "backend"}]
    assert spec["Mode"] == {"Replicated": {"Replicas": 3}}
    assert spec["UpdateConfig"]["Order"] == "start-first"
    assert spec["UpdateConfig"]["Parallelism"] == 2
    assert spec["UpdateConfig"]["FailureAction"] == "rollback"
    assert spec["UpdateConfig"]["Monitor"] == 3_000_000_000
    assert spec["EndpointSpec"] == {
        "Mode": "dnsrr",
        "Ports": [
            {"Protocol": "tcp", "TargetPort": 8080, "PublishMode": "host"},
            {"Protocol": "udp", "TargetPort": 9000, "PublishMode": "host"},
        ],
    }


def test_spec_defaults() -> None:
    """Without Swarm keys: one replica, Swarm's vip endpoint mode, stop-first, no limits."""
    spec = spec_of()
    assert spec["Mode"] == {"Replicated": {"Replicas": 1}}
    assert spec["EndpointSpec"]["Mode"] == "vip"
    assert spec["UpdateConfig"]["Order"] == "stop-first"
    assert "Resources" not in spec["TaskTemplate"]


@pytest.mark.parametrize(
    ("text", "size"), [("512", 512), ("1k", 1024), ("1.5g", int(1.5 * 2**30)), ("2M", 2 * 2**20)]
)
def test_memory_bytes(text: str, size: int) -> None:
    """`memory` values are Docker's binary units."""
    assert memory_bytes(text) == size


@pytest.mark.parametrize(
    ("reached", "existed", "how"),
    [
        (None, True, "none"),
        ("networks", True, "none"),
        ("update", True, "rollback"),
        ("health", True, "rollback"),
        ("health", False, "remove"),
    ],
)
def test_undo_of(reached: Any, existed: bool, how: str) -> None:
    """Nothing is undone before the update was sent; after it, Swarm's rollback, or removing a
    service that did not exist before."""
    assert undo_of(reached, existed) == how


@pytest.mark.parametrize(
    "change",
    [{"replicas": 2}, {"placement": ["node.role == worker"]}, {"networks": ["other"]},
     {"endpoint_mode": "vip"}],
)  # fmt: skip
def test_a_changed_swarm_setting_is_a_changed_definition(change: dict[str, Any]) -> None:
    """Changing replicas, placement, networks or endpoint_mode of a cluster service changes
    its definition, so the next pass updates the Swarm service instead of saying up to date."""
    from pipeline.plan.planner import service_spec_hash

    base = {"image": "api", "cluster": "prod", "replicas": 3, "networks": ["backend"],
            "placement": ["node.labels.zone == a"], "endpoint_mode": "dnsrr"}  # fmt: skip
    before = decode(ServiceSection, base)
    after = decode(ServiceSection, {**base, **change})
    assert service_spec_hash(before) != service_spec_hash(after)
