"""A Docker Swarm through one engine: its membership, overlay networks, services and tasks.

The Swarm endpoints of the Docker Engine API (`/info` Swarm, `/nodes`, `/services`, `/tasks`,
`/networks`) through the docker SDK's low-level client; a service spec is the plain JSON of
`pipeline.plan.cluster.swarm_service_spec`. Errors are pipeline's (`Connection.calling`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import docker.auth
import docker.errors
import structlog

from pipeline.errors import StallingError
from pipeline.hosts.connection import Connection, status_of

log = structlog.get_logger(__name__)

MANAGED_LABEL = "dev.pipeline.managed"
# Looks, 0.3 s apart, for an overlay network another create made meanwhile (`ensure_overlay`).
OVERLAY_LOOKS = 10


@dataclass(frozen=True)
class SwarmMembership:
    """What an engine says of its Swarm (`docker info`): `state` is "inactive", "pending",
    "active", "error" or "locked"; `cluster_id` is None unless the engine is a manager."""

    node_id: str
    state: str
    manager: bool
    cluster_id: str | None
    managers: tuple[str, ...] = ()  # the managers' addresses ("10.88.0.2:2377")

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class NodeInfo:
    """A Swarm node: its id, host name, address (where its host-mode ports are reached)."""

    id: str
    hostname: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskInfo:
    """A task of a service: where it runs, its image and state, and the ports it published on
    its node ("8080/tcp" -> 18081)."""

    id: str
    node_id: str
    slot: int | None
    image: str
    state: str  # new|pending|assigned|...|running|complete|shutdown|failed|rejected|orphaned
    desired_state: str
    message: str
    error: str
    container_id: str | None
    ports: Mapping[str, int]
    labels: Mapping[str, str]
    updated_at: str


@dataclass(frozen=True)
class ServiceInfo:
    """A Swarm service: its id and spec version (an update names it), its current and previous
    spec, and its update status ("updating", "completed", "paused", "rollback_started",
    "rollback_completed", "rollback_paused"; "" when it was never updated)."""

    id: str
    version: int
    spec: Mapping[str, Any]
    previous_spec: Mapping[str, Any] | None
    update_state: str
    update_message: str

    @property
    def image(self) -> str:
        return str(self.spec["TaskTemplate"]["ContainerSpec"]["Image"])


def _task(attrs: Mapping[str, Any]) -> TaskInfo:
    status = attrs.get("Status") or {}
    spec = (attrs.get("Spec") or {}).get("ContainerSpec") or {}
    ports = {
        f"{p.get('TargetPort')}/{p.get('Protocol', 'tcp')}": int(p["PublishedPort"])
        for p in (status.get("PortStatus") or {}).get("Ports") or []
        if p.get("PublishedPort")
    }
    return TaskInfo(
        id=attrs["ID"],
        node_id=attrs.get("NodeID") or "",
        slot=attrs.get("Slot"),
        image=str(spec.get("Image", "")),
        state=str(status.get("State", "")),
        desired_state=str(attrs.get("DesiredState", "")),
        message=str(status.get("Message", "")),
        error=str(status.get("Err", "")),
        container_id=(status.get("ContainerStatus") or {}).get("ContainerID"),
        ports=ports,
        labels=dict(spec.get("Labels") or {}),
        updated_at=str(attrs.get("UpdatedAt", "")),
    )


class Swarm:
    """The Swarm the engine behind `conn` belongs to; services and networks need a manager."""

    def __init__(self, conn: Connection, sleep: Callable[[float], None] = time.sleep) -> None:
        self._conn = conn
        self._sleep = sleep

    @property
    def where(self) -> str:
        return self._conn.where

    def membership(self) -> SwarmMembership:
        """The engine's Swarm membership, from `/info`."""
        with self._conn.calling("swarm info"):
            info = self._conn.client.api.info().get("Swarm") or {}
        cluster = info.get("Cluster") or {}
        return SwarmMembership(
            node_id=str(info.get("NodeID") or ""),
            state=str(info.get("LocalNodeState") or "inactive"),
            manager=bool(info.get("ControlAvailable")),
            cluster_id=cluster.get("ID"),
            managers=tuple(str(m.get("Addr")) for m in info.get("RemoteManagers") or []),
        )

    def nodes(self) -> dict[str, NodeInfo]:
        """The Swarm's nodes by id (a manager's view)."""
        with self._conn.calling("list swarm nodes"):
            nodes = self._conn.client.api.nodes()
        out = {}
        for n in nodes:
            desc = n.get("Description") or {}
            out[n["ID"]] = NodeInfo(
                id=n["ID"],
                hostname=str(desc.get("Hostname", "")),
                address=str((n.get("Status") or {}).get("Addr", "")),
                labels=dict((n.get("Spec") or {}).get("Labels") or {}),
            )
        return out

    def ensure_overlay(self, name: str) -> bool:
        """Create an attachable overlay network `name` unless one exists; True when created.
        Raises StallingError when a network of that name exists with another driver."""
        with self._conn.calling(f"ensure overlay network {name}"):
            existing = [n for n in self._conn.client.api.networks(names=[name])
                        if n.get("Name") == name]  # fmt: skip
            if existing:
                driver = existing[0].get("Driver")
                if driver != "overlay":
                    raise StallingError(
                        f"{self.where}: network {name!r} exists with driver {driver!r}, "
                        "not overlay: remove it or name another network"
                    )
                return False
            try:
                self._conn.client.api.create_network(
                    name,
                    driver="overlay",
                    attachable=True,
                    labels={MANAGED_LABEL: "true"},
                    check_duplicate=True,
                )
            except docker.errors.APIError as exc:
                # Created meanwhile (two services of one pass share a new network): 409 on
                # newer engines, a 500 "name conflicts with an existing object" from Swarm's
                # allocator on 20.10. Either way, look again rather than trust the code.
                if status_of(exc) not in (409, 500) or not self._overlay_appears(name):
                    raise
                return False
        log.info("overlay network ensured", engine=self._conn.name, network=name)
        return True

    def _overlay_appears(self, name: str) -> bool:
        """Whether an overlay network `name` is listed within about 3 s: after a conflict with
        another create still in progress, Swarm's allocator knows the name before the engine
        lists the network."""
        for look in range(OVERLAY_LOOKS):
            if look:
                self._sleep(0.3)
            if any(n.get("Name") == name and n.get("Driver") == "overlay"
                   for n in self._conn.client.api.networks(names=[name])):  # fmt: skip
                return True
        return False

    def service(self, name: str) -> ServiceInfo | None:
        """The service called `name`, or None when there is none."""
        with self._conn.calling(f"inspect service {name}"):
            try:
                attrs = self._conn.client.api.inspect_service(name)
            except docker.errors.NotFound:
                return None
        update = attrs.get("UpdateStatus") or {}
        return ServiceInfo(
            id=attrs["ID"],
            version=int(attrs["Version"]["Index"]),
            spec=attrs["Spec"],
            previous_spec=attrs.get("PreviousSpec"),
            update_state=str(update.get("State", "")),
            update_message=str(update.get("Message", "")),
        )

    def _headers(self, auth: Mapping[str, str] | None, image: str) -> dict[str, str]:
        """`X-Registry-Auth` for `image`'s registry: the `--with-registry-auth` of the docker
        CLI, which hands the credentials to the nodes that pull (Docker docs, service create)."""
        if not auth:
            return {}
        registry, _repo = docker.auth.resolve_repository_name(image.split("@")[0])
        payload = {**auth, "serveraddress": registry}
        return {"X-Registry-Auth": docker.auth.encode_header(payload).decode("ascii")}

    def create(self, spec: Mapping[str, Any], *, auth: Mapping[str, str] | None) -> str:
        """Create the service `spec` describes; its id."""
        api = self._conn.client.api
        image = spec["TaskTemplate"]["ContainerSpec"]["Image"]
        secrets = [auth["password"]] if auth and auth.get("password") else []
        with self._conn.calling(f"create service {spec['Name']}", secrets=secrets):
            res = api._post_json(
                api._url("/services/create"), data=dict(spec), headers=self._headers(auth, image)
            )
            return str(api._result(res, True)["ID"])

    def update(
        self,
        service: ServiceInfo,
        spec: Mapping[str, Any],
        *,
        auth: Mapping[str, str] | None,
        rollback: bool = False,
    ) -> None:
        """Update `service` (at its current version) to `spec`; with `rollback`, ask Swarm to
        go back to its previous spec instead (`rollback=previous`, what `docker service
        rollback` sends)."""
        api = self._conn.client.api
        image = spec["TaskTemplate"]["ContainerSpec"]["Image"]
        params: dict[str, Any] = {"version": service.version}
        if rollback:
            params["rollback"] = "previous"
        secrets = [auth["password"]] if auth and auth.get("password") else []
        what = "roll back" if rollback else "update"
        with self._conn.calling(f"{what} service {spec['Name']}", secrets=secrets):
            res = api._post_json(
                api._url("/services/{0}/update", service.id),
                data=dict(spec),
                params=params,
                headers=self._headers(auth, image),
            )
            api._raise_for_status(res)

    def rollback(self, name: str) -> None:
        """Swarm's rollback of the service to its previous spec; StallingError when it has
        none."""
        current = self.service(name)
        if current is None or current.previous_spec is None:
            raise StallingError(f"{self.where}: service {name}: no previous spec to roll back to")
        self.update(current, current.spec, auth=None, rollback=True)

    def remove(self, name: str) -> None:
        """Remove the service (gone already: nothing to do)."""
        with self._conn.calling(f"remove service {name}"):
            try:
                self._conn.client.api.remove_service(name)
            except docker.errors.NotFound:
                return

    def tasks(self, service: str) -> list[TaskInfo]:
        """The service's tasks, current and past (Swarm keeps a few per slot), newest first."""
        with self._conn.calling(f"tasks of service {service}"):
            tasks = self._conn.client.api.tasks(filters={"service": service})
        out = [_task(t) for t in tasks]
        out.sort(key=lambda t: t.updated_at, reverse=True)
        return out

    def task_logs(self, task_id: str, lines: int = 20) -> str:
        """The task's last `lines` log lines (stdout and stderr), through the manager
        (`GET /tasks/{id}/logs`)."""
        api = self._conn.client.api
        with self._conn.calling(f"logs of task {task_id}"):
            res = api._get(
                api._url("/tasks/{0}/logs", task_id),
                params={"stdout": 1, "stderr": 1, "tail": str(lines)},
                stream=False,
            )
            api._raise_for_status(res)
            data = res.content
        return _demux(data).decode("utf-8", errors="replace")


def _demux(data: bytes) -> bytes:
    """The payload of Docker's multiplexed log stream (8-byte frame headers), or `data` as is
    when it is not framed."""
    out, pos = bytearray(), 0
    while pos + 8 <= len(data) and data[pos] in (0, 1, 2) and data[pos + 1 : pos + 4] == b"\0\0\0":
        size = int.from_bytes(data[pos + 4 : pos + 8], "big")
        out += data[pos + 8 : pos + 8 + size]
        pos += 8 + size
    return bytes(out) if pos else data
