"""`pipeline lock status` and `pipeline lock release SERVICE`: the leases deploys hold.

A lease is named `service:NAME` and held by `host:pid` (`pipeline/state/leases.py`); it ends
with its holder, so a release by hand is for a holder on another machine that will not renew
it (a machine gone) — a live holder finds it lost and stops at its next step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.cli.common import (
    EXIT_USAGE,
    Group,
    argument,
    complete_service,
    config_option,
    fail,
    json_option,
    load_config,
    print_json,
    print_table,
)

if TYPE_CHECKING:
    from pipeline.state.store import State

lock_app = Group(
    "lock", help="The leases deploys hold: who, since when; release.", no_args_is_help=True
)


def lease_rows(state: State) -> list[dict[str, Any]]:
    """Each lease held now: its name, the service it guards, its owner split into host and pid,
    since when (the start of the owner's oldest running run; None when it runs none) and when
    it expires (ISO 8601, UTC)."""
    from pipeline.state.leases import process_of
    from pipeline.timeutil import iso, utc

    running = [r for r in state.runs(limit=500) if r.status == "running"]
    rows = []
    for lock in state.leases.held():
        host, _, pid = process_of(lock.owner).rpartition(":")
        since = min((r.started_at for r in running if r.owner == lock.owner), default=None)
        rows.append(
            {
                "lease": lock.name,
                "service": lock.name.removeprefix("service:")
                if lock.name.startswith("service:")
                else None,
                "owner": lock.owner,
                "host": host or None,
                "pid": int(pid) if pid.isdigit() else None,
                "since": iso(since) if since else None,
                "expires_at": iso(utc(lock.expires_at)),
            }
        )
    return rows


@lock_app.command("status")
@config_option
@json_option
def status(config: Path | None, json: bool) -> None:
    """Who holds which lease: owner (host and process), since when, until when."""
    from pipeline.state.database import open_state

    loaded = load_config(config)
    rows = lease_rows(open_state(loaded))
    if json:
        print_json(rows)
        return
    if not rows:
        click.echo("No lease is held.")
        return
    print_table(rows, ["lease", "host", "pid", "since", "expires_at"])


@lock_app.command("release")
@argument("service", shell_complete=complete_service)
@config_option
@click.option("--yes", "-y", "yes", is_flag=True, help="Do not ask.")
def release(service: str, config: Path | None, yes: bool) -> None:
    """Free SERVICE's lease after asking; history gets a line saying whose it was."""
    from pipeline.state.database import open_state

    loaded = load_config(config)
    if service not in loaded.model.services:
        fail(f"unknown service {service!r} (known: {', '.join(loaded.model.services)})", EXIT_USAGE)
    state = open_state(loaded)
    name = f"service:{service}"
    holder = state.leases.lock_holder(name)
    if holder is None:
        click.echo(f"{service}: no lease is held")
        return
    if not yes and not click.confirm(f"Release {name}, held by {holder.owner}?", err=True):
        click.echo("Nothing released.", err=True)
        raise click.exceptions.Exit(EXIT_USAGE)
    owner = state.leases.force_release(name)
    if owner is None:
        click.echo(f"{service}: no lease is held")
        return
    from pipeline.state.leases import default_owner

    state.record_note(
        service, "lock", f"lease released by hand by {default_owner()} (held by {owner})"
    )
    click.echo(f"{service}: released the lease held by {owner}")
