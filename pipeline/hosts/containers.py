"""Container side of the engine: pipeline's container types, their translation to Docker's API
shapes (pure functions), and `Containers`, the container operations of one engine
(`engine.containers`), which refuse to touch containers pipeline did not create."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import docker.errors
import docker.types
import structlog

from pipeline.config.model import parse_port
from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.connection import Connection, ImageNotFound, status_of

log = structlog.get_logger(__name__)

LABEL_PREFIX = "dev.pipeline."
_SPECIAL_NETWORKS = ("bridge", "host", "none")
# One lock per (engine URL, network name): a check-then-create of a network is not atomic in
# Docker, so this process's threads make it one at a time.
_NETWORK_LOCKS: dict[tuple[str, str], threading.Lock] = {}
MANAGED_LABEL = LABEL_PREFIX + "managed"
SERVICE_LABEL = LABEL_PREFIX + "service"
_NEVER_STARTED = "0001-01-01T00:00:00Z"
_EXIT_LOOKBACK = 3600.0  # seconds of the engine's event log searched for a container's exit


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one container; `image` is a ref (repo@digest) or an image id."""

    name: str
    image: str
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    command: Sequence[str] | None = None
    ports: Sequence[str] = ()
    volumes: Sequence[str] = ()
    cpus: float | None = None
    memory: str | None = None
    network: str = "bridge"
    restart: str = "unless-stopped"


@dataclass(frozen=True)
class ContainerInfo:
    """What an engine reports about one container; `ports` maps "8080/tcp" to its host port.

    `exit_code` is the last exit code of a stopped or restarting container (None while it runs);
    `restart_count` counts the restarts its restart policy made; `oom_killed` stays True once
    the kernel killed it for lack of memory, even after a restart."""

    id: str
    name: str
    image: str
    status: str
    health: str | None
    exit_code: int | None
    labels: Mapping[str, str]
    ports: Mapping[str, int]
    started_at: str | None
    restart_count: int = 0
    oom_killed: bool = False

    @property
    def managed(self) -> bool:
        """True when pipeline created this container (it carries the managed label)."""
        return self.labels.get(MANAGED_LABEL) == "true"


def port_bindings(ports: Sequence[str]) -> dict[str, list[Any]]:
    """The docker SDK `ports=` argument for config port strings (one key may bind several times)."""
    result: dict[str, list[Any]] = {}
    for text in ports:
        try:
            mapping = parse_port(text)
        except ValueError as exc:  # the config refuses these; a spec made in code may not
            raise StallingError(str(exc)) from None
        binding: Any = mapping.host_port
        if mapping.host_ip:
            binding = (mapping.host_ip, mapping.host_port)
        result.setdefault(mapping.key, []).append(binding)
    return result


def restart_policy(text: str) -> dict[str, Any]:
    """Docker's RestartPolicy for "no", "always", "unless-stopped" or "on-failure[:N]"."""
    name, _, count = text.partition(":")
    if name not in ("no", "always", "unless-stopped", "on-failure") or (
        count and (name != "on-failure" or not count.isdigit())
    ):
        raise StallingError(f"invalid restart policy {text!r}")
    policy: dict[str, Any] = {"Name": name}
    if count:
        policy["MaximumRetryCount"] = int(count)
    return policy


def nano_cpus(cpus: float | None) -> int | None:
    """Docker's NanoCpus for a fractional CPU count."""
    return None if cpus is None else int(round(cpus * 1e9))


def container_info(attrs: Mapping[str, Any]) -> ContainerInfo:
    """A ContainerInfo from `docker inspect` output of one container."""
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    status = str(state.get("Status", "unknown"))
    health = (state.get("Health") or {}).get("Status")
    # Docker reports ExitCode 0 for running containers; it only means something once stopped
    # (or while the restart policy waits to start it again: the code it last exited with).
    exit_code = state.get("ExitCode") if status in ("exited", "dead", "restarting") else None
    started = state.get("StartedAt")
    ports: dict[str, int] = {}
    for key, bindings in ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).items():
        for binding in bindings or []:
            if binding.get("HostPort"):
                ports[key] = int(binding["HostPort"])
                break
    return ContainerInfo(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        image=str(config.get("Image", "")),
        status=status,
        health=str(health) if health else None,
        exit_code=int(exit_code) if exit_code is not None else None,
        labels=dict(config.get("Labels") or {}),
        ports=ports,
        started_at=started if started and started != _NEVER_STARTED else None,
        restart_count=int(attrs.get("RestartCount") or 0),
        oom_killed=bool(state.get("OOMKilled")),
    )


_ALIAS_API = "1.41"  # the API version EndpointConfig checks aliases against (needs >= 1.22)


def create_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """Keyword arguments for the docker SDK's `containers.create` for a spec."""
    labels = {**spec.labels, MANAGED_LABEL: "true"}
    kwargs: dict[str, Any] = {
        "name": spec.name,
        "labels": labels,
        "environment": dict(spec.env),
        "command": list(spec.command) if spec.command is not None else None,
        "restart_policy": restart_policy(spec.restart),
        "network_mode": spec.network,
        "detach": True,
    }
    service = spec.labels.get(SERVICE_LABEL)
    if spec.network not in _SPECIAL_NETWORKS and service:
        # On a named network (a bridge, or an overlay across a Swarm's hosts) other containers
        # reach it by its service's name: a network alias (Docker docs, "docker run
        # --network-alias"); the container's own name carries the revision.
        del kwargs["network_mode"]
        kwargs["network"] = spec.network
        kwargs["networking_config"] = {
            spec.network: docker.types.EndpointConfig(_ALIAS_API, aliases=[service])
        }
    # Docker discards published ports with host networking (the container's ports are the host's).
    if spec.ports and spec.network != "host":
        kwargs["ports"] = port_bindings(spec.ports)
    if spec.volumes:
        kwargs["volumes"] = list(spec.volumes)
    if spec.cpus is not None:
        kwargs["nano_cpus"] = nano_cpus(spec.cpus)
    if spec.memory:
        kwargs["mem_limit"] = spec.memory
    return kwargs


class Containers:
    """The containers of the engine behind `conn`; they refuse to touch containers pipeline did
    not create (no managed label). Errors are pipeline's kinds, naming the engine."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a container; a managed container of the same name is replaced first.

        Raises StallingError when the name belongs to a container pipeline did not create.
        """
        existing = self.inspect(spec.name)
        if existing is not None and existing.name == spec.name:
            if not existing.managed:
                raise StallingError(
                    f"{self._conn.where}: container {spec.name!r} exists and was not created by "
                    f"pipeline (no {MANAGED_LABEL} label); refusing to replace it"
                )
            self.remove(existing.id)
        kwargs = create_kwargs(spec)
        action = f"create container {spec.name} from {spec.image}"
        with self._conn.calling(action, not_found=ImageNotFound):
            container = self._conn.client.containers.create(spec.image, **kwargs)
        try:
            with self._conn.calling(f"start container {spec.name}"):
                container.start()
                container.reload()
        except PipelineError:
            # A container that never started holds its name and nothing else worth keeping.
            self._force_remove(container.id)
            raise
        info = container_info(container.attrs)
        log.info(
            "container started",
            host=self._conn.name,
            service=spec.labels.get(SERVICE_LABEL),
            container=info.name,
            image=spec.image,
        )
        return info

    def ensure_network(self, name: str) -> None:
        """Create a bridge network called `name` unless it exists (built-in networks: no-op),
        and leave exactly one of that name. Docker does not make names unique: its
        `CheckDuplicate` is best effort (Engine API v1.41, NetworkCreate), so two creates at
        once (two rollouts of one pass, or a CLI deploy beside `pipeline serve`) can both
        succeed, and every later use of the name fails as "ambiguous". Creates of one process
        are serialised per engine; duplicates made by another are removed again, the one with
        containers attached (else the oldest) kept. Raises StallingError naming them when the
        extra ones cannot be removed (containers attached to each)."""
        if name in _SPECIAL_NETWORKS:
            return
        lock = _NETWORK_LOCKS.setdefault((self._conn.url, name), threading.Lock())
        with lock, self._conn.calling(f"ensure network {name}"):
            found = self._networks(name)
            if not found:
                try:
                    self._conn.client.api.create_network(
                        name, driver="bridge", labels={MANAGED_LABEL: "true"}, check_duplicate=True
                    )
                except docker.errors.APIError as exc:
                    if status_of(exc) != 409:  # created meanwhile by a concurrent run
                        raise
                found = self._networks(name)
            if len(found) > 1:
                self._keep_one(name, found)
        log.info("network ensured", host=self._conn.name, network=name)

    def _networks(self, name: str) -> list[dict[str, Any]]:
        """The networks named exactly `name` (the API's name filter matches substrings)."""
        return [n for n in self._conn.client.api.networks(names=[name]) if n.get("Name") == name]

    def _keep_one(self, name: str, listed: list[dict[str, Any]]) -> None:
        # Inspected only here: a list does not say which containers are attached.
        found = []
        for net in listed:
            with contextlib.suppress(docker.errors.NotFound):  # removed meanwhile
                found.append(self._conn.client.api.inspect_network(net["Id"]))
        if len(found) < 2:
            return
        found.sort(key=lambda n: (-len(n.get("Containers") or {}), str(n.get("Created", ""))))
        keep, extra = found[0], found[1:]
        left = []
        for net in extra:
            try:
                self._conn.client.api.remove_network(net["Id"])
            except docker.errors.NotFound:
                continue
            except docker.errors.APIError:
                left.append(str(net["Id"])[:12])  # in use: containers are attached to it
                continue
            log.warning("duplicate network removed", host=self._conn.name, network=name,
                        removed=str(net["Id"])[:12], kept=str(keep["Id"])[:12])  # fmt: skip
        if left:
            raise StallingError(
                f"{self._conn.where}: {len(left) + 1} networks are named {name!r} (ids "
                f"{', '.join([str(keep['Id'])[:12], *left])}) and each has containers attached; "
                "Docker then refuses the name as ambiguous. Move the containers to one of them "
                "and remove the others (`docker network rm ID`)"
            )

    def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's state by id or name, or None when there is no such container."""
        with self._conn.calling(f"inspect container {container_id}"):
            try:
                attrs = self._conn.client.api.inspect_container(container_id)
            except docker.errors.NotFound:
                return None
        return container_info(attrs)

    def managed_containers(
        self, service: str | None = None, *, all: bool = True
    ) -> list[ContainerInfo]:
        """Containers pipeline created (optionally of one service), stopped ones too when `all`."""
        filters = [f"{MANAGED_LABEL}=true"]
        if service is not None:
            filters.append(f"{SERVICE_LABEL}={service}")
        with self._conn.calling("list containers"):
            found = self._conn.client.containers.list(
                all=all, filters={"label": filters}, ignore_removed=True
            )
        return [container_info(c.attrs) for c in found]

    def _managed(self, container_id: str, action: str) -> ContainerInfo | None:
        info = self.inspect(container_id)
        if info is not None and not info.managed:
            raise StallingError(
                f"{self._conn.where}: refusing to {action} container {info.name!r}: not created by "
                f"pipeline (no {MANAGED_LABEL} label)"
            )
        return info

    def stop(self, container_id: str, timeout: int = 10) -> None:
        """Stop a managed container (SIGTERM, then SIGKILL after `timeout` s); gone is fine."""
        if self._managed(container_id, "stop") is None:
            return
        with self._conn.calling(f"stop container {container_id}"):
            self._conn.client.api.stop(container_id, timeout=timeout)

    def start(self, container_id: str, *, managed: bool = False, paused: bool = False) -> None:
        """Run a stopped managed container again, or resume a `paused` one (a rollback's instant
        way back); `managed`: the caller just listed it among pipeline's containers, so it is
        not inspected first. Docker refuses to start a paused container (409): unpause it."""
        if not managed and self._managed(container_id, "start") is None:
            raise StallingError(f"{self._conn.where}: container {container_id} is gone")
        api = self._conn.client.api
        if paused:
            with self._conn.calling(f"unpause container {container_id}"):
                api.unpause(container_id)
            return
        with self._conn.calling(f"start container {container_id}"):
            api.start(container_id)

    def pause(self, container_id: str) -> None:
        """Freeze a managed container's processes with the cgroup freezer (`docker pause`): no
        CPU and no requests, its memory and sockets kept, so `start(paused=True)` resumes it in
        milliseconds. A container that is not running is left as it is; gone is fine."""
        info = self._managed(container_id, "pause")
        if info is None or info.status != "running":
            return
        with self._conn.calling(f"pause container {container_id}"):
            self._conn.client.api.pause(container_id)

    def remove(self, container_id: str) -> None:
        """Force-remove a managed container and its anonymous volumes; gone is fine."""
        if self._managed(container_id, "remove") is None:
            return
        self._force_remove(container_id)

    def _force_remove(self, container_id: str) -> None:
        with self._conn.calling(f"remove container {container_id}"):
            try:
                self._conn.client.api.remove_container(container_id, force=True, v=True)
            except docker.errors.NotFound:
                return

    def rename(self, container_id: str, new_name: str) -> None:
        """Rename a managed container (e.g. keep the previous one as `web-previous`)."""
        if self._managed(container_id, "rename") is None:
            raise StallingError(f"{self._conn.where}: rename: no container {container_id!r}")
        with self._conn.calling(f"rename container {container_id} to {new_name}"):
            self._conn.client.api.rename(container_id, new_name)

    def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """The container's last `lines` lines of stdout and stderr (of every run, restarts too)."""
        with self._conn.calling(f"logs of container {container_id}"):
            data = self._conn.client.api.logs(container_id, stdout=True, stderr=True, tail=lines)
        return bytes(data).decode("utf-8", errors="replace")

    def last_exit_code(self, container_id: str) -> int | None:
        """The code the container last exited with, from the engine's event log (inspect forgets
        it once a restart policy has started the container again); None when none is known."""
        now = time.time()
        with self._conn.calling(f"events of container {container_id}"):
            events = list(
                self._conn.client.api.events(
                    since=f"{now - _EXIT_LOOKBACK:.9f}",
                    until=f"{now:.9f}",  # past events only: a later `until` would wait for it
                    filters={"container": container_id, "event": "die"},
                    decode=True,
                )
            )
        for event in reversed(events):
            code = ((event.get("Actor") or {}).get("Attributes") or {}).get("exitCode")
            if code is not None and str(code).lstrip("-").isdigit():
                return int(code)
        return None

    def exec(self, container_id: str, cmd: Sequence[str]) -> tuple[int, str]:
        """Run `cmd` inside the running container; return its exit code and combined output."""
        with self._conn.calling(f"exec {cmd[0] if cmd else ''} in container {container_id}"):
            created = self._conn.client.api.exec_create(container_id, list(cmd))
            output = self._conn.client.api.exec_start(created["Id"])
            code = self._conn.client.api.exec_inspect(created["Id"]).get("ExitCode")
        return (int(code) if code is not None else -1), bytes(output).decode("utf-8", "replace")
