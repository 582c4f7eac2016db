"""`pipeline db upgrade` and `pipeline db current`: the state database's schema version, and
its migration to the newest one (every command also migrates at start; this does it alone)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import Group, config_option, fail, json_option, load_config, print_json
from pipeline.errors import PipelineError

db_app = Group("db", help="The state database's schema: version and upgrade.", no_args_is_help=True)


@db_app.command("upgrade")
@config_option
@json_option
def upgrade(config: Path | None, json: bool) -> None:
    """Migrate the state database to the newest schema, its history kept; print the versions."""
    loaded = load_config(config)
    # Imported here: the CLI starts fast when this command is not the one run.
    from pipeline.state import database

    try:
        url, before, after = database.upgrade(loaded)
    except PipelineError as exc:
        fail(str(exc))
    if json:
        print_json({"database": url, "before": before, "revision": after})
        return
    if before == after:
        click.echo(f"{url}: at {after} (the newest schema); nothing to do")
    else:
        click.echo(f"{url}: upgraded from {before or 'no schema'} to {after}")


@db_app.command("current")
@config_option
@json_option
def current(config: Path | None, json: bool) -> None:
    """Print the state database's schema version and whether it is the newest; changes nothing."""
    loaded = load_config(config)
    from pipeline.state import database, migrate

    try:
        url, found = database.revision(loaded)
    except PipelineError as exc:
        fail(str(exc))
    if json:
        print_json({"database": url, "revision": found, "head": migrate.HEAD})
        return
    if found == migrate.HEAD:
        click.echo(f"{url}: {found} (head)")
    else:
        click.echo(
            f"{url}: {found or 'no schema version'} (head is {migrate.HEAD}: "
            "`pipeline db upgrade`, or any command, migrates it)"
        )
