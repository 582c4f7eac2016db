"""`pipeline lab`: bring up, inspect and take down a lab of real Docker hosts on this machine."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import NoReturn

import click

from pipeline.cli.common import EXIT_USAGE, Group, fail
from pipeline.errors import PipelineError

# The lab: one network namespace with its own dockerd per host, a bridge joining them, and a
# TLS registry they all trust. Needs root.
lab_app = Group("lab", help="A lab of real Docker hosts on this machine.", no_args_is_help=True)

dir_option = click.option(
    "--dir",
    "dir",
    type=click.Path(path_type=Path),
    default=Path("lab"),
    help="Where the lab keeps its state, engines and registry.",
)


def _lab() -> ModuleType:
    # Imported when a lab command runs: pyroute2 costs every other command ~0.1 s at start-up.
    from pipeline.lab import manage as lab

    return lab


def _fail(exc: PipelineError) -> NoReturn:
    code = EXIT_USAGE if isinstance(exc, _lab().LabNeedsRootError) else 1
    text = str(exc)
    fail(text if text.startswith("pipeline lab") else f"pipeline lab: {text}", code)


@lab_app.command("up")
@click.option("--hosts", type=click.IntRange(min=1), default=2, help="How many hosts.")
@dir_option
@click.option(
    "--subnet", default="10.88.0.0/24", help="A private IPv4 subnet for the bridge and hosts."
)
@click.option(
    "--swarm",
    is_flag=True,
    help="Make the hosts one Docker Swarm (the first a manager): [clusters.lab].",
)
def up(hosts: int, dir: Path, subnet: str, swarm: bool) -> None:
    """Bring the lab up (or report the one already alive) and print its config tables."""
    try:
        state = _lab().lab_up(dir, hosts=hosts, subnet=subnet, swarm=swarm)
    except PipelineError as exc:
        _fail(exc)
    click.echo(state.toml)
    for host in state.hosts:
        click.echo(f"{host.name}: {host.docker_url}  (DOCKER_HOST={host.docker_url} docker ps)")
    click.echo(f"registry: {state.registry} (TLS, trusted via /etc/docker/certs.d)")
    if state.swarm:
        click.echo(f"swarm: {state.hosts[0].name} manages, the other hosts are workers")
    click.echo(f"wrote {state.dir / _lab().TOML_FILE}: paste its tables into your pipeline.toml")


@lab_app.command("status")
@dir_option
def status(dir: Path) -> None:
    """Print each host with whether its engine answers, and the registry; exit 1 if any is down."""
    try:
        st = _lab().lab_status(dir)
    except PipelineError as exc:
        _fail(exc)
    if st.state is None:
        click.echo(f"no lab in {dir.resolve()}")
        raise click.exceptions.Exit(1)
    click.echo(f"lab {st.state.name} in {st.state.dir} ({st.state.subnet})")
    for h in st.hosts:
        what = f"answers (Docker {h.version})" if h.answers else "NOT answering"
        click.echo(f"  {h.host.name}: {h.host.docker_url}  {what}")
    reg = "answers" if st.registry_answers else "NOT answering"
    click.echo(f"  registry: {st.state.registry}  {reg}")
    if not st.alive:
        raise click.exceptions.Exit(1)


@lab_app.command("down")
@dir_option
def down(dir: Path) -> None:
    """Stop the lab's engines and registry and remove its namespaces, links and mounts."""
    try:
        _lab().lab_down(dir)
    except PipelineError as exc:
        _fail(exc)
    click.echo(f"lab in {dir.resolve()} is down")
