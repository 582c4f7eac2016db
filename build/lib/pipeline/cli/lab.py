"""`pipeline lab`: bring up, inspect and take down a lab of real Docker hosts on this machine."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Annotated, NoReturn

import typer

from pipeline.cli.common import EXIT_USAGE, fail
from pipeline.errors import PipelineError

lab_app = typer.Typer(
    help="A lab of real Docker hosts on this machine: one network namespace with its own "
    "dockerd per host, a bridge joining them, and a TLS registry they all trust. Needs root.",
    no_args_is_help=True,
)

DirOption = Annotated[
    Path, typer.Option("--dir", help="Where the lab keeps its state, engines and registry.")
]


def _lab() -> ModuleType:
    # Imported when a lab command runs: pyroute2 costs every other command ~0.1 s at start-up.
    from pipeline.lab import manage as lab

    return lab


def _fail(exc: PipelineError) -> NoReturn:
    code = EXIT_USAGE if isinstance(exc, _lab().LabNeedsRootError) else 1
    text = str(exc)
    fail(text if text.startswith("pipeline lab") else f"pipeline lab: {text}", code)


@lab_app.command()
def up(
    hosts: Annotated[int, typer.Option("--hosts", min=1, help="How many hosts.")] = 2,
    dir: DirOption = Path("lab"),
    subnet: Annotated[
        str, typer.Option("--subnet", help="A private IPv4 subnet for the bridge and hosts.")
    ] = "10.88.0.0/24",
) -> None:
    """Bring the lab up (or report the one already alive) and print its config tables."""
    try:
        state = _lab().lab_up(dir, hosts=hosts, subnet=subnet)
    except PipelineError as exc:
        _fail(exc)
    typer.echo(state.toml)
    for host in state.hosts:
        typer.echo(f"{host.name}: {host.docker_url}  (DOCKER_HOST={host.docker_url} docker ps)")
    typer.echo(f"registry: {state.registry} (TLS, trusted via /etc/docker/certs.d)")
    typer.echo(f"wrote {state.dir / _lab().TOML_FILE}: paste its tables into your pipeline.toml")


@lab_app.command()
def status(dir: DirOption = Path("lab")) -> None:
    """Print each host with whether its engine answers, and the registry; exit 1 if any is down."""
    try:
        st = _lab().lab_status(dir)
    except PipelineError as exc:
        _fail(exc)
    if st.state is None:
        typer.echo(f"no lab in {dir.resolve()}")
        raise typer.Exit(1)
    typer.echo(f"lab {st.state.name} in {st.state.dir} ({st.state.subnet})")
    for h in st.hosts:
        what = f"answers (Docker {h.version})" if h.answers else "NOT answering"
        typer.echo(f"  {h.host.name}: {h.host.docker_url}  {what}")
    reg = "answers" if st.registry_answers else "NOT answering"
    typer.echo(f"  registry: {st.state.registry}  {reg}")
    if not st.alive:
        raise typer.Exit(1)


@lab_app.command()
def down(dir: DirOption = Path("lab")) -> None:
    """Stop the lab's engines and registry and remove its namespaces, links and mounts."""
    try:
        _lab().lab_down(dir)
    except PipelineError as exc:
        _fail(exc)
    typer.echo(f"lab in {dir.resolve()} is down")
