"""`pipeline prune [--dry-run]`: per host, a service's containers and images beyond
`keep_revisions`, never the ones a rollback needs."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import (
    EXIT_FAILED,
    command,
    config_option,
    json_option,
    load_config,
    print_json,
)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


@command("prune")
@config_option
@click.option("--dry-run", "dry_run", is_flag=True, help="Say what would go; remove nothing.")
@json_option
def prune(config: Path | None, dry_run: bool, json: bool) -> None:
    """Remove, per host, each service's containers and images beyond keep_revisions, never
    the deployed one or what a rollback needs; say what went and the space freed."""
    from pipeline.deploy.connections import Connections
    from pipeline.deploy.prune import prune as do_prune
    from pipeline.state.database import open_state

    loaded = load_config(config)
    connections = Connections(loaded)
    try:
        rows = do_prune(open_state(loaded), connections, dry_run=dry_run)
    finally:
        connections.close()
    if json:
        print_json(rows)
    else:
        verb = "would remove" if dry_run else "removed"
        for r in rows:
            where = f"{r['service']} on {r['host']}"
            for name in r["containers"]:
                click.echo(f"{where}: {verb} container {name}")
            for image in r["images"]:
                click.echo(f"{where}: {verb} image {image}")
            for kept in r["kept"]:
                click.echo(f"{where}: keep {kept}")
            for error in r["errors"]:
                click.echo(f"{where}: error: {error}", err=True)
        total = sum(r["freed"] for r in rows)
        count = sum(len(r["containers"]) + len(r["images"]) for r in rows)
        freeing = "would free" if dry_run else "freeing"
        click.echo(f"{verb} {count} container(s)/image(s), {freeing} {_size(total)}")
    if any(r["errors"] for r in rows):
        raise click.exceptions.Exit(EXIT_FAILED)
