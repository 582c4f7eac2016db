"""`pipeline logs SERVICE`: the service's container logs from every host, merged in time order,
each line prefixed with its host; `-f` follows, across deploys, until Ctrl-C."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline.cli.common import (
    EXIT_USAGE,
    argument,
    command,
    complete_host,
    complete_service,
    config_option,
    fail,
    host_service,
    load_config,
)
from pipeline.errors import PipelineError
from pipeline.redact import redact

if TYPE_CHECKING:
    from pipeline.hosts.engine import Engine

# Colours of the host prefixes on a terminal, one per host in config order.
_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")
_SWITCH_POLL = 0.5  # seconds between looks for the container that replaced a followed one


def split_timestamp(line: str) -> tuple[int, str]:
    """A Docker log line "2026-11-30T02:45:32.123456789Z text" as (nanoseconds since the epoch,
    text): exact, so lines nanoseconds apart keep their order; a line without a valid timestamp
    sorts first (0) with its whole text."""
    stamp, _, text = line.partition(" ")
    head, _, frac = stamp.rstrip("Z").partition(".")
    try:
        seconds = int(datetime.fromisoformat(head + "+00:00").timestamp())
    except ValueError:
        return 0, line
    nanos = int(frac[:9].ljust(9, "0")) if frac.isdigit() else 0
    return seconds * 1_000_000_000 + nanos, text


def merge_by_time(lines: Iterable[tuple[str, str]]) -> list[tuple[str, int, str]]:
    """(host, docker line) pairs as (host, nanoseconds, text), in time order (stable: one host's
    lines keep their order at equal times)."""
    parsed = [(host, *split_timestamp(line)) for host, line in lines]
    return sorted(parsed, key=lambda item: item[1])


def _follow_host(
    engine: Engine,
    service: str,
    since: float | None,
    tail: int | None,
    out: Callable[[str], None],
    stop: threading.Event,
) -> None:
    """Stream the service's container logs on one host until `stop`; when its container stops
    or is replaced, go on with the next one running, all of its lines (`since` and `tail`
    apply to the first container only)."""
    seen: set[str] = set()
    first = True
    while not stop.is_set():
        try:
            running = [c for c in engine.sessions.running(service) if c.id not in seen]
        except PipelineError:  # an engine that does not answer now may later: keep looking
            running = []
        if not running:
            stop.wait(_SWITCH_POLL)
            continue
        container = min(running, key=lambda c: c.started_at or "")
        seen.add(container.id)
        try:
            for line in engine.sessions.log_lines(
                container.id,
                since=since if first else None,
                tail=tail if first else None,
                follow=True,
            ):
                if stop.is_set():
                    return
                out(line)
        except PipelineError:  # the engine went away mid-stream: look again
            stop.wait(_SWITCH_POLL)
        first = False


@command("logs")
@argument("service", shell_complete=complete_service)
@config_option
@click.option("--host", help="Only this host.", shell_complete=complete_host)
@click.option("--follow", "-f", "follow", is_flag=True, help="Keep following.")
@click.option("--since", help="Only lines newer than this (10m, 1h, 30s).")
@click.option("--tail", "-n", "tail", type=int, help="The last N lines of each host.")
def logs(
    service: str,
    config: Path | None,
    host: str | None,
    follow: bool,
    since: str | None,
    tail: int | None,
) -> None:
    """SERVICE's container logs from every host it runs on, in time order, prefixed with
    the host; -f follows until Ctrl-C, onto the new container when a deploy replaces one."""
    import sys

    from pipeline.config.model import parse_duration
    from pipeline.deploy.connections import Connections

    loaded = load_config(config)
    svc = host_service(loaded, service, "logs")
    hosts = list(svc.hosts)
    if host is not None:
        if host not in hosts:
            fail(f"service {service} does not run on host {host!r} (hosts: "
                 f"{', '.join(hosts)})", EXIT_USAGE)  # fmt: skip
        hosts = [host]
    try:
        since_epoch = time.time() - parse_duration(since) if since else None
    except ValueError as exc:
        fail(f"--since: {exc}", EXIT_USAGE)
    width = max(len(h) for h in hosts)
    colour = sys.stdout.isatty()
    colours = {h: _COLOURS[i % len(_COLOURS)] for i, h in enumerate(svc.hosts)}

    def show(h: str, text: str) -> None:
        prefix = h.ljust(width) + " |"
        if colour:
            prefix = click.style(prefix, fg=colours[h])
        click.echo(f"{prefix} {redact(text)}")

    connections = Connections(loaded)
    try:
        if not follow:
            lines: list[tuple[str, str]] = []
            for h in hosts:
                sessions = connections.engine(h).sessions
                for c in sessions.running(service):
                    lines += [(h, ln) for ln in sessions.log_lines(
                        c.id, since=since_epoch, tail=tail)]  # fmt: skip
            for h, _at, text in merge_by_time(lines):
                show(h, text)
            return
        _follow(connections, service, hosts, since_epoch, tail, show)
    finally:
        connections.close()


def _follow(
    connections: object,
    service: str,
    hosts: list[str],
    since: float | None,
    tail: int | None,
    show: Callable[[str, str], None],
) -> None:
    """Follow every host in its own thread; print lines as they come (each host's in order)."""
    lines: queue.Queue[tuple[str, str]] = queue.Queue()
    stop = threading.Event()
    for h in hosts:
        engine = connections.engine(h)  # type: ignore[attr-defined]
        threading.Thread(
            target=_follow_host,
            args=(engine, service, since, tail, lambda ln, h=h: lines.put((h, ln)), stop),
            daemon=True,
            name=f"logs-{h}",
        ).start()
    try:
        while True:
            try:
                h, line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            show(h, split_timestamp(line)[1])
    except KeyboardInterrupt:
        stop.set()
