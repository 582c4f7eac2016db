"""`pipeline exec SERVICE -- CMD…`: a command in the service's running container on a host, or
in a fresh one-off container of its current image and settings (`--new`), removed afterwards."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli.common import (
    EXIT_USAGE,
    ConfigOption,
    complete_host,
    complete_service,
    exit_code_of,
    fail,
    host_service,
    load_config,
)
from pipeline.errors import PipelineError


def register(app: typer.Typer) -> None:
    """Add `exec` to the main app."""

    @app.command("exec", context_settings={"ignore_unknown_options": True})
    def exec_(
        service: Annotated[str, typer.Argument(autocompletion=complete_service)],
        command: Annotated[list[str], typer.Argument(help="The command and its arguments.")],
        config: ConfigOption = None,
        host: Annotated[
            str | None,
            typer.Option(
                "--host", help="This host (default: the first).", autocompletion=complete_host
            ),
        ] = None,
        all_hosts: Annotated[bool, typer.Option("--all-hosts", help="On each host.")] = False,
        interactive: Annotated[
            bool, typer.Option("--interactive", "-i", help="Keep stdin open.")
        ] = False,
        tty: Annotated[bool, typer.Option("--tty", "-t", help="Allocate a terminal.")] = False,
        new: Annotated[
            bool,
            typer.Option(
                "--new",
                help="In a one-off container of the service's current image "
                "and settings (env, volumes, network), removed afterwards.",
            ),
        ] = False,
    ) -> None:
        """Run CMD in SERVICE's running container (on the first host, --host H, or each with
        --all-hosts); exit with CMD's exit code."""
        from pipeline.deploy.connections import Connections

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
                    typer.echo(f"== {h}", err=True)
                sessions = connections.engine(h).sessions
                if new:
                    # Only a one-off needs the records and the rollout's container spec.
                    from pipeline.deploy.operations import oneoff_spec
                    from pipeline.state.database import open_state

                    state = open_state(loaded)
                    spec = oneoff_spec(state, connections, service, h, command)
                    code = sessions.run_oneoff(spec, service, interactive=interactive, tty=tty)
                else:
                    running = sessions.running(service)
                    if not running:
                        fail(f"{service} has no running container on host {h}")
                    code = sessions.exec(running[0].id, command, interactive=interactive,
                                         tty=tty)  # fmt: skip
                worst = worst or code
        except PipelineError as exc:
            fail(str(exc), exit_code_of(exc))
        finally:
            connections.close()
        raise typer.Exit(worst)
