"""Container side of the engine: pipeline's container types, their translation to Docker's API
shapes (pure functions), and the container operations `Engine` inherits from `ContainerOps`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import docker.errors
import structlog

from pipeline.errors import PipelineError, StallingError

log = structlog.get_logger(__name__)

LABEL_PREFIX = "dev.pipeline."
_SPECIAL_NETWORKS = ("bridge", "host", "none")
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


@dataclass(frozen=True)
class PortMapping:
    """One published port: container port/protocol, host port (None = any) and host IP."""

    container_port: int
    protocol: str
    host_port: int | None
    host_ip: str | None

    @property
    def key(self) -> str:
        return f"{self.container_port}/{self.protocol}"


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of a docker SDK APIError, None for errors without a response."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def parse_port(text: str) -> PortMapping:
    """Parse config port syntax: "8080", "18080:8080", "127.0.0.1:80:8080/udp", "1.2.3.4::80"."""
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    parts = spec.split(":")
    try:
        if proto not in ("tcp", "udp") or len(parts) > 3:
            raise ValueError(text)
        container = int(parts[-1])
        host = int(parts[-2]) if len(parts) >= 2 and parts[-2] else None
        ip = parts[0] if len(parts) == 3 and parts[0] else None
    except ValueError:
        raise StallingError(f"invalid port mapping {text!r} (use 'HOST:CONTAINER[/udp]')") from None
    return PortMapping(container, proto, host, ip)


def port_bindings(ports: Sequence[str]) -> dict[str, list[Any]]:
    """The docker SDK `ports=` argument for config port strings (one key may bind several times)."""
    result: dict[str, list[Any]] = {}
    for text in ports:
        mapping = parse_port(text)
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


class ContainerOps:
    """Container operations of `Engine`; they refuse to touch containers pipeline did not create."""

    name: str

    @property
    def _client(self) -> Any:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    def _calling(
        self,
        action: str,
        *,
        not_found: type[PipelineError] = StallingError,
        secrets: Sequence[str] = (),
    ) -> AbstractContextManager[None]:
        raise NotImplementedError

    def ensure_network(self, name: str) -> None:
        """Create a bridge network called `name` unless it exists (built-in networks: no-op)."""
        if name in _SPECIAL_NETWORKS:
            return
        with self._calling(f"ensure network {name}"):
            # The name filter matches substrings; compare names exactly.
            existing = self._client.api.networks(names=[name])
            if any(net.get("Name") == name for net in existing):
                return
            try:
                self._client.api.create_network(
                    name, driver="bridge", labels={MANAGED_LABEL: "true"}, check_duplicate=True
                )
            except docker.errors.APIError as exc:
                if status_of(exc) != 409:  # created meanwhile by a concurrent run
                    raise
        log.info("network ensured", host=self.name, network=name)

    def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's state by id or name, or None when there is no such container."""
        with self._calling(f"inspect container {container_id}"):
            try:
                attrs = self._client.api.inspect_container(container_id)
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
        with self._calling("list containers"):
            found = self._client.containers.list(
                all=all, filters={"label": filters}, ignore_removed=True
            )
        return [container_info(c.attrs) for c in found]

    def _managed(self, container_id: str, action: str) -> ContainerInfo | None:
        info = self.inspect(container_id)
        if info is not None and not info.managed:
            raise StallingError(
                f"{self._where()}: refusing to {action} container {info.name!r}: not created by "
                f"pipeline (no {MANAGED_LABEL} label)"
            )
        return info

    def stop(self, container_id: str, timeout: int = 10) -> None:
        """Stop a managed container (SIGTERM, then SIGKILL after `timeout` s); gone is fine."""
        if self._managed(container_id, "stop") is None:
            return
        with self._calling(f"stop container {container_id}"):
            self._client.api.stop(container_id, timeout=timeout)

    def start(self, container_id: str) -> None:
        """Start a stopped managed container again (a rollback's instant way back)."""
        if self._managed(container_id, "start") is None:
            raise StallingError(f"{self._where()}: container {container_id} is gone")
        with self._calling(f"start container {container_id}"):
            self._client.api.start(container_id)

    def remove(self, container_id: str) -> None:
        """Force-remove a managed container and its anonymous volumes; gone is fine."""
        if self._managed(container_id, "remove") is None:
            return
        self._force_remove(container_id)

    def _force_remove(self, container_id: str) -> None:
        with self._calling(f"remove container {container_id}"):
            try:
                self._client.api.remove_container(container_id, force=True, v=True)
            except docker.errors.NotFound:
                return

    def rename(self, container_id: str, new_name: str) -> None:
        """Rename a managed container (e.g. keep the previous one as `web-previous`)."""
        if self._managed(container_id, "rename") is None:
            raise StallingError(f"{self._where()}: rename: no container {container_id!r}")
        with self._calling(f"rename container {container_id} to {new_name}"):
            self._client.api.rename(container_id, new_name)

    def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """The container's last `lines` lines of stdout and stderr (of every run, restarts too)."""
        with self._calling(f"logs of container {container_id}"):
            data = self._client.api.logs(container_id, stdout=True, stderr=True, tail=lines)
        return bytes(data).decode("utf-8", errors="replace")

    def last_exit_code(self, container_id: str) -> int | None:
        """The code the container last exited with, from the engine's event log (inspect forgets
        it once a restart policy has started the container again); None when none is known."""
        now = time.time()
        with self._calling(f"events of container {container_id}"):
            events = list(
                self._client.api.events(
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
        with self._calling(f"exec {cmd[0] if cmd else ''} in container {container_id}"):
            created = self._client.api.exec_create(container_id, list(cmd))
            output = self._client.api.exec_start(created["Id"])
            code = self._client.api.exec_inspect(created["Id"]).get("ExitCode")
        return (int(code) if code is not None else -1), bytes(output).decode("utf-8", "replace")
