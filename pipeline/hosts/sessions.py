"""What a person does with a service's running containers (`engine.sessions`): read their logs
as a stream of timestamped lines, run a command in one (with a TTY when asked), or run a one-off
container of the service's image and settings that is removed afterwards.

Docker API: `GET /containers/{id}/logs?timestamps=1` prefixes each line with its RFC 3339 time
(nanoseconds); `POST /containers/{id}/exec` and `/exec/{id}/start` with `Tty`/`AttachStdin` give
a raw socket (multiplexed with an 8-byte frame header when there is no TTY)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import IO, Any

import docker.errors

from pipeline.hosts.connection import Connection, ImageNotFound
from pipeline.hosts.containers import (
    LABEL_PREFIX,
    MANAGED_LABEL,
    ContainerInfo,
    ContainerSpec,
    container_info,
    create_kwargs,
)

ONEOFF_LABEL = LABEL_PREFIX + "oneoff"  # a one-off's service; it carries no service label


class Sessions:
    """Logs, exec and one-off containers on the engine behind `conn`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def running(self, service: str) -> list[ContainerInfo]:
        """The service's running containers on this engine (two during a start-first deploy)."""
        filters = [f"{MANAGED_LABEL}=true", f"{LABEL_PREFIX}service={service}"]
        with self._conn.calling("list containers"):
            found = self._conn.client.containers.list(
                filters={"label": filters, "status": "running"}, ignore_removed=True
            )
        return [container_info(c.attrs) for c in found]

    def log_lines(
        self,
        container_id: str,
        *,
        since: float | None = None,
        tail: int | None = None,
        follow: bool = False,
    ) -> Iterator[str]:
        """The container's stdout and stderr as lines "TIMESTAMP text" (Docker's RFC 3339 time
        with nanoseconds); `since` epoch seconds, `tail` the last N lines; `follow` keeps reading
        until the container stops. A container removed meanwhile ends the stream."""
        kwargs: dict[str, Any] = {"stdout": True, "stderr": True, "timestamps": True}
        kwargs["tail"] = "all" if tail is None else tail
        if since is not None:
            kwargs["since"] = since
        with self._conn.calling(f"logs of container {container_id}"):
            try:
                stream = self._conn.client.api.logs(
                    container_id, stream=True, follow=follow, **kwargs
                )
            except docker.errors.NotFound:
                return
        pending = b""
        with contextlib.suppress(docker.errors.NotFound, OSError):
            for chunk in stream:
                pending += bytes(chunk)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace").rstrip("\r")
        if pending:
            yield pending.decode("utf-8", "replace")

    def exec(self, container_id: str, cmd: Sequence[str], *, interactive: bool, tty: bool) -> int:
        """Run `cmd` in the running container with this process's stdin (when `interactive`)
        and stdout/stderr, a TTY when `tty`; return its exit code."""
        api = self._conn.client.api
        with self._conn.calling(f"exec {cmd[0] if cmd else ''} in container {container_id}"):
            created = api.exec_create(
                container_id, list(cmd), stdin=interactive, tty=tty, environment=_term()
            )
            sock = api.exec_start(created["Id"], tty=tty, socket=True)
        _pump(_raw_socket(sock), interactive=interactive, tty=tty)
        with self._conn.calling(f"inspect exec in container {container_id}"):
            code = api.exec_inspect(created["Id"]).get("ExitCode")
        return int(code) if code is not None else -1

    def run_oneoff(self, spec: ContainerSpec, service: str, *, interactive: bool, tty: bool) -> int:
        """Create a one-off container from `spec` (published ports dropped: the service's own
        container holds them; no restart policy), attach this terminal, start it, wait for its
        exit and remove it, whatever happened; return its exit code."""
        labels = {k: v for k, v in spec.labels.items() if k != f"{LABEL_PREFIX}service"} | {
            ONEOFF_LABEL: service
        }
        oneoff = replace(spec, labels=labels, ports=(), restart="no")
        kwargs = create_kwargs(oneoff)
        kwargs.update(tty=tty, stdin_open=interactive)
        api = self._conn.client.api
        with self._conn.calling(
            f"create one-off {spec.name} from {spec.image}", not_found=ImageNotFound
        ):
            container = self._conn.client.containers.create(spec.image, **kwargs)
        try:
            with self._conn.calling(f"attach one-off {spec.name}"):
                sock = api.attach_socket(
                    container.id,
                    params={"stdin": int(interactive), "stdout": 1, "stderr": 1, "stream": 1},
                )
                container.start()
            _pump(_raw_socket(sock), interactive=interactive, tty=tty)
            with self._conn.calling(f"wait for one-off {spec.name}"):
                code = container.wait().get("StatusCode")
            return int(code) if code is not None else -1
        finally:
            with (
                self._conn.calling(f"remove one-off {spec.name}"),
                contextlib.suppress(docker.errors.NotFound),
            ):
                api.remove_container(container.id, force=True, v=True)

    def oneoffs(self) -> list[ContainerInfo]:
        """One-off containers left behind (their session's process was killed)."""
        with self._conn.calling("list containers"):
            found = self._conn.client.containers.list(
                all=True, filters={"label": [ONEOFF_LABEL]}, ignore_removed=True
            )
        return [container_info(c.attrs) for c in found]


def _term() -> dict[str, str]:
    return {"TERM": os.environ["TERM"]} if os.environ.get("TERM") else {}


def _raw_socket(sock: Any) -> socket.socket:
    # The SDK returns a SocketIO over HTTP, or the socket itself (npipe/ssh differ).
    raw = getattr(sock, "_sock", sock)
    return raw


def _pump(sock: socket.socket, *, interactive: bool, tty: bool) -> None:
    """Copy stdin to the socket (when `interactive`) and the socket to stdout/stderr until the
    remote side closes; without a TTY, Docker frames each chunk (stream byte, 3 zero bytes,
    big-endian length) and the stream byte says stdout (1) or stderr (2)."""
    out, err = sys.stdout.buffer, sys.stderr.buffer
    restore = _raw_terminal() if tty and interactive else None
    stdin_fd = sys.stdin.fileno() if interactive else None
    buffer = b""
    try:
        while True:
            watched: list[Any] = [sock] + ([stdin_fd] if stdin_fd is not None else [])
            ready, _, _ = select.select(watched, [], [])
            if stdin_fd is not None and stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if data:
                    sock.sendall(data)
                else:
                    stdin_fd = None
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                if tty:
                    _write(out, data)
                    continue
                buffer += data
                while len(buffer) >= 8:
                    size = int.from_bytes(buffer[4:8], "big")
                    if len(buffer) < 8 + size:
                        break
                    _write(err if buffer[0] == 2 else out, buffer[8 : 8 + size])
                    buffer = buffer[8 + size :]
    finally:
        if restore is not None:
            restore()
        with contextlib.suppress(OSError):
            sock.close()


def _write(stream: IO[bytes], data: bytes) -> None:
    stream.write(data)
    stream.flush()


def _raw_terminal() -> Any:
    """Put stdin's terminal in raw mode; return the function that restores it (None if stdin
    is no terminal)."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        return None
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)
