"""Options and helpers shared by every CLI command.

Every CLI module is imported at start-up (`--help` lists them all), so at module level they
import only typer, the standard library and the light shared modules (`errors`, `redact`,
`logs`); the config (pydantic), the state database (SQLAlchemy), Docker, git and the service
are imported inside the commands that use them (`tests/cli/test_startup_imports.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from pipeline.errors import ConfigError, LockedError
from pipeline.redact import redact, redact_value

if TYPE_CHECKING:
    from pipeline.config.load import LoadedConfig
    from pipeline.config.model import ServiceSection

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $PIPELINE_CONFIG, else ./pipeline.toml).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

# Exit codes, the same for every command (README "Exit codes" shows this table).
EXIT_OK = 0
EXIT_FAILED = 1  # failed (a failed rollout was rolled back), or interrupted (Ctrl-C, SIGTERM)
EXIT_USAGE = 2  # bad input: the config, an argument, an unknown name; nothing changed
EXIT_LOCKED = 3  # another deploy holds a service's lease: try later (`pipeline lock status`)
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_FAILED: "failed, a failed rollout rolled back; or interrupted after undoing its work",
    EXIT_USAGE: "bad input: config, argument or name; nothing changed",
    EXIT_LOCKED: "locked: another deploy holds a service's lease",
}


def exit_code_of(exc: BaseException) -> int:
    """The exit code for an error a command stops on: its kind decides (`errors.py`)."""
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, LockedError):
        return EXIT_LOCKED
    return EXIT_FAILED


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print a redacted error to stderr and exit with `code`."""
    typer.echo(redact(message), err=True)
    raise typer.Exit(code)


def load_config(path: Path | None) -> LoadedConfig:
    """Load the config named by -c, $PIPELINE_CONFIG or ./pipeline.toml; exit 2 when invalid."""
    from pipeline.config import load as config_mod

    try:
        return config_mod.load(path or config_mod.default_config_path())
    except ConfigError as exc:
        fail(f"{exc}\n{len(exc.problems)} problem(s) found.", EXIT_USAGE)


def host_service(loaded: LoadedConfig, service: str, command: str) -> ServiceSection:
    """SERVICE's section when its containers run on `[hosts.*]` (what `logs` and `exec` work
    on); exits 2 for an unknown service (naming the known ones) or a cluster service, whose
    containers are Swarm tasks placed by the Swarm (pointing to the docker command to use)."""
    svc = loaded.model.services.get(service)
    if svc is None:
        fail(f"unknown service {service!r} (known: {', '.join(loaded.model.services)})",
             EXIT_USAGE)  # fmt: skip
    if svc.cluster:
        manager = loaded.model.clusters[svc.cluster].docker
        fail(
            f"pipeline {command} works on services of [hosts.*]; {service} runs as Swarm tasks "
            f"on cluster {svc.cluster!r}: `docker -H {manager} service ps {service}` shows "
            f"where, `docker -H {manager} service logs {service}` their logs",
            EXIT_USAGE,
        )
    return svc


def print_json(data: Any) -> None:
    """Write redacted JSON to stdout."""
    json.dump(redact_value(data), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned table of the given columns; empty cells print as '-'."""
    cells = [
        [redact(str(r.get(c) if r.get(c) not in (None, "") else "-")) for c in columns]
        for r in rows
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- shell completion (`pipeline --install-completion`) --------------------------------------
# Read cheaply: the TOML file named by -c/--config, $PIPELINE_CONFIG or ./pipeline.toml, parsed
# with tomllib and not validated (a completion must answer at once and never fail).


def _config_names(ctx: typer.Context, table: str) -> list[str]:
    import os
    import tomllib

    path = None
    node: Any = ctx
    while node is not None and path is None:
        path = node.params.get("config")
        node = node.parent
    path = Path(path or os.environ.get("PIPELINE_CONFIG") or "pipeline.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    section = data.get(table)
    return sorted(section) if isinstance(section, dict) else []


def _completer(table: str) -> Any:
    def complete(ctx: typer.Context, incomplete: str) -> list[str]:
        return [n for n in _config_names(ctx, table) if n.startswith(incomplete)]

    complete.__doc__ = f"Names of the config's [{table}.*] tables that start with what is typed."
    return complete


complete_service = _completer("services")
complete_host = _completer("hosts")
complete_image = _completer("images")
complete_repo = _completer("repos")
