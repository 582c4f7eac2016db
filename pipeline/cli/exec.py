"""`pipeline exec SERVICE -- CMD…`: a command in the service's running container on a host, or
in a fresh one-off container of its current image and settings (`--new`), removed afterwards."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import (
    EXIT_USAGE,
    argument,
    command,
    complete_host,
    complete_service,
    config_option,
    exit_code_of,
    fail,
    host_service,
    load_config,
)
from pipeline.errors import PipelineError


@command("exec", context_settings={"ignore_unknown_options": True})
@argument("service", shell_complete=complete_service)
@argument("command", nargs=-1, required=True, help="The command and its arguments.")
@config_option
@click.option("--host", help="This host (default: the first).", shell_complete=complete_host)
@click.option("--all-hosts", "all_hosts", is_flag=True, help="On each host.")
@click.option("--interactive", "-i", "interactive", is_flag=True, help="Keep stdin open.")
@click.option("--tty", "-t", "tty", is_flag=True, help="Allocate a terminal.")
@click.option(
    "--new",
    "new",
    is_flag=True,
    help="In a one-off container of the service's current image "
    "and settings (env, volumes, network), removed afterwards.",
)
def exec_(
    service: str,
    command: tuple[str, ...],
    config: Path | None,
    host: str | None,
    all_hosts: bool,
    interactive: bool,
    tty: bool,
    new: bool,
) -> None:
    """Run CMD in SERVICE's running container (on the first host, --host H, or each with
    --all-hosts); exit with CMD's exit code."""
    from pipeline.deploy.connections import Connections

    words = list(command)
    loaded = load_config(config)
    svc = host_service(loaded, service, "exec")
    if host is not None and host not in svc.hosts:
        fail(f"service {service} does not run on host {host!r} (hosts: "
             f"{', '.join(svc.hosts)})", EXIT_USAGE)  # fmt: skip
    hosts = list(svc.hosts) if all_hosts else [host or svc.hosts[0]]
    connections = Connections(loaded)
    worst = 0
    try:
        for h in hosts:
            if len(hosts) > 1:
                click.echo(f"== {h}", err=True)
            sessions = connections.engine(h).sessions
            if new:
                # Only a one-off needs the records and the rollout's container spec.
                from pipeline.deploy.operations import oneoff_spec
                from pipeline.state.database import open_state

                state = open_state(loaded)
                spec = oneoff_spec(state, connections, service, h, words)
                code = sessions.run_oneoff(spec, service, interactive=interactive, tty=tty)
            else:
                running = sessions.running(service)
                if not running:
                    fail(f"{service} has no running container on host {h}")
                code = sessions.exec(running[0].id, words, interactive=interactive, tty=tty)
            worst = worst or code
    except PipelineError as exc:
        fail(str(exc), exit_code_of(exc))
    finally:
        connections.close()
    raise click.exceptions.Exit(worst)
