"""What only the engines can tell about where a service runs, asked at plan time: a cluster must be
a Swarm manager; a host service's named network is an overlay when its hosts are members of one
Swarm (created attachable through a manager), and must be one when a cluster service lists it.

Problems are `ConfigError`s located at the key (`LoadedConfig.locate`), raised before anything
moves, like `Builder.check`.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.config.load import LoadedConfig
from pipeline.deploy.connections import Connections
from pipeline.errors import ConfigError
from pipeline.hosts.engine import Engine
from pipeline.hosts.swarm import SwarmMembership

_BUILT_IN = ("bridge", "host", "none")


def overlay_names(loaded: LoadedConfig) -> set[str]:
    """The networks a cluster service lists in `networks`: overlays by definition."""
    return {n for s in loaded.model.services.values() if s.cluster for n in s.networks}


def check_cluster(loaded: LoadedConfig, connections: Connections, cluster: str) -> Engine:
    """The manager engine of `[clusters.NAME]`; ConfigError at `clusters.NAME.docker` when the
    engine answers but is not a Swarm manager."""
    engine = connections.cluster(cluster)
    member = engine.swarm.membership()
    if not (member.active and member.manager):
        section = loaded.model.clusters[cluster]
        role = "a worker" if member.active else f"not in a Swarm (state {member.state})"
        raise ConfigError(
            [
                f"{loaded.locate('clusters', cluster, 'docker')}: clusters.{cluster}.docker: "
                f"{section.docker} is not a Swarm manager: it is {role}"
            ]
        )
    return engine


def overlay_manager(loaded: LoadedConfig, connections: Connections, service: str) -> Engine | None:
    """For a host service on a named network: the manager to create its overlay through when
    every host of the service is a member of one Swarm (one of its hosts, or a configured
    cluster, that lists all their nodes); None when the network stays a per-host bridge.
    ConfigError at `services.NAME.network` when the network is an overlay a cluster service
    lists and the hosts are not members of one Swarm."""
    svc = loaded.model.services[service]
    if svc.cluster or svc.network in _BUILT_IN or svc.proxy is not None:
        return None
    members = {h: connections.engine(h).swarm.membership() for h in svc.hosts}
    manager = _common_manager(loaded, connections, members)
    if manager is None and svc.network in overlay_names(loaded):
        where = loaded.locate("services", service, "network")
        states = ", ".join(f"{h} {m.state}" for h, m in members.items())
        raise ConfigError(
            [
                f"{where}: services.{service}.network: {svc.network!r} is an overlay network "
                f"(a cluster service lists it), but hosts {', '.join(svc.hosts)} are not "
                f"members of one Swarm (swarm state: {states})"
            ]
        )
    return manager


def _common_manager(
    loaded: LoadedConfig, connections: Connections, members: dict[str, SwarmMembership]
) -> Engine | None:
    if not members or not all(m.active for m in members.values()):
        return None
    nodes = {m.node_id for m in members.values()}
    candidates: Iterable[Engine] = [
        *(connections.engine(h) for h, m in members.items() if m.manager),
        *(connections.cluster(c) for c in loaded.model.clusters),
    ]
    for engine in candidates:
        member = engine.swarm.membership()
        if member.active and member.manager and nodes <= set(engine.swarm.nodes()):
            return engine
    return None


def check_rollouts(
    loaded: LoadedConfig, connections: Connections, services: Iterable[str]
) -> dict[str, Engine]:
    """Ask the engines what the services' placement needs (`check_cluster`, `overlay_manager`);
    every problem in one ConfigError. Returns service -> the manager of its overlay network."""
    problems: list[str] = []
    overlays: dict[str, Engine] = {}
    for name in services:
        svc = loaded.model.services[name]
        try:
            if svc.cluster:
                check_cluster(loaded, connections, svc.cluster)
            else:
                manager = overlay_manager(loaded, connections, name)
                if manager is not None:
                    overlays[name] = manager
        except ConfigError as exc:
            problems.extend(p for p in exc.problems if p not in problems)
    if problems:
        raise ConfigError(problems)
    return overlays
