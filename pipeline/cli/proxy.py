"""`pipeline proxy status`: each host's proxy, its routes and the container each points to."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli.common import (
    Group,
    config_option,
    json_option,
    load_config,
    print_json,
    print_table,
)

proxy_app = Group(
    "proxy", help="The reverse proxy pipeline runs on each host.", no_args_is_help=True
)


@proxy_app.command("status")
@config_option
@json_option
def status(config: Path | None, json: bool) -> None:
    """Per host of a proxied service: its proxy, each route and the container it points to."""
    loaded = load_config(config)
    # Imported here: the CLI starts fast when this command is not the one run.
    from pipeline.deploy.connections import Connections
    from pipeline.deploy.proxy import proxy_status

    connections = Connections(loaded)
    try:
        rows = proxy_status(connections)
    finally:
        connections.close()
    if json:
        print_json(rows)
        return
    view = []
    for row in rows:
        proxy = row["proxy"]
        where = row["error"] or (f"proxy {proxy['state']}" if proxy else "no proxy")
        if not row["routes"]:
            view.append({"host": row["host"], "proxy": where})
        for r in row["routes"]:
            view.append(
                {
                    "host": row["host"],
                    "proxy": where,
                    "service": r["service"],
                    "route": " ".join(f"{h}{r['path_prefix']}" for h in r["hosts"]),
                    "container": r["container"],
                    "state": r["container_state"],
                    "revision": (r["revision"] or "")[:12],
                    # the kept container a rollback switches back to
                    "standby": ", ".join(r["standby"]) or "-",
                }
            )
    columns = ["host", "proxy", "service", "route", "container", "state", "revision", "standby"]
    print_table(view, columns)
