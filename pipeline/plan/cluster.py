"""Pure: a cluster service's `[services.NAME]` table as the Swarm service spec the engine takes,
and the order a cluster rollout goes in. No I/O.

The spec is the JSON body of Docker's `POST /services/create` and `/services/{id}/update`
(Docker Engine API, "ServiceSpec"): `replicas` → `Mode.Replicated.Replicas`, `strategy` →
`UpdateConfig.Order`, `max_parallel` → `Parallelism`, `health.monitor` → `Monitor`,
`FailureAction = rollback` (Swarm rolls back a task that fails by its own measure), `ports`
published in host mode (the routing mesh is optional: TESTBED.md), `cpus`/`memory` → resource
limits, `volumes` → mounts, `stop_timeout` → `StopGracePeriod`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config.model import ServiceSection, parse_port

_NS = 1_000_000_000  # Swarm's durations are nanoseconds
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

ClusterStep = Literal["networks", "update", "converge", "health", "record"]
# The steps of a cluster rollout, in order; a failure at or after "update" is undone by Swarm's
# rollback (or, for a service that did not exist before, by removing it).
CLUSTER_STEPS: tuple[ClusterStep, ...] = ("networks", "update", "converge", "health", "record")


@dataclass(frozen=True)
class PublishedPort:
    """A port a task publishes on its node (host mode): `published` None lets Docker choose."""

    target: int
    protocol: str
    published: int | None


def memory_bytes(text: str) -> int:
    """Bytes of a `memory` value ("256m", "1g", "512k", "1048576"): binary units, as Docker."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([bkmgBKMG]?)", text)
    if match is None:
        raise ValueError(f"invalid memory {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def published_ports(service: ServiceSection) -> list[PublishedPort]:
    """The service's `ports` as Swarm publishes them (host mode)."""
    out = []
    for text in service.ports:
        port = parse_port(text)
        out.append(PublishedPort(port.container_port, port.protocol, port.host_port))
    return out


def _mount(text: str) -> dict[str, Any]:
    parts = text.split(":")
    source, target = parts[0], parts[1]
    return {
        "Type": "bind" if source.startswith("/") else "volume",
        "Source": source,
        "Target": target,
        "ReadOnly": len(parts) == 3 and parts[2] == "ro",
    }


def swarm_service_spec(
    name: str,
    service: ServiceSection,
    image: str,
    *,
    env: Mapping[str, str],
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """The Swarm ServiceSpec of `service` named `name`, running `image` (a reference by digest)
    with environment `env` and `labels` on the service and on each task's container."""
    health = service.health
    container: dict[str, Any] = {
        "Image": image,
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "Labels": dict(labels),
        "StopGracePeriod": int(service.stop_timeout * _NS),
    }
    if service.command is not None:
        container["Args"] = list(service.command)
    if service.volumes:
        container["Mounts"] = [_mount(v) for v in service.volumes]
    limits: dict[str, int] = {}
    if service.cpus is not None:
        limits["NanoCPUs"] = int(service.cpus * _NS)
    if service.memory is not None:
        limits["MemoryBytes"] = memory_bytes(service.memory)
    template: dict[str, Any] = {
        "ContainerSpec": container,
        "Networks": [{"Target": n} for n in service.networks],
        "Placement": {"Constraints": list(service.placement)},
    }
    if limits:
        template["Resources"] = {"Limits": limits}
    order = service.strategy  # "stop-first" | "start-first": Swarm's own names
    update = {
        "Parallelism": service.max_parallel,
        "Delay": 0,
        "FailureAction": "rollback",
        "Monitor": int(health.monitor * _NS),
        "MaxFailureRatio": 0,
        "Order": order,
    }
    ports = [
        {"Protocol": p.protocol, "TargetPort": p.target, "PublishMode": "host"}
        | ({"PublishedPort": p.published} if p.published is not None else {})
        for p in published_ports(service)
    ]
    return {
        "Name": name,
        "Labels": dict(labels),
        "TaskTemplate": template,
        "Mode": {"Replicated": {"Replicas": 1 if service.replicas is None else service.replicas}},
        "UpdateConfig": update,
        "RollbackConfig": {**update, "FailureAction": "pause"},
        "EndpointSpec": {"Mode": service.endpoint_mode or "vip", "Ports": ports},
    }


def undo_of(reached: ClusterStep | None, existed: bool) -> Literal["none", "rollback", "remove"]:
    """How a cluster rollout that failed after reaching `reached` is put back: nothing before
    the update was sent; after it, Swarm's rollback to the previous spec, or removing the
    service when it did not exist before."""
    if reached is None or CLUSTER_STEPS.index(reached) < CLUSTER_STEPS.index("update"):
        return "none"
    return "rollback" if existed else "remove"
