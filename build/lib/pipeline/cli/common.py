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

from pipeline.errors import ConfigError
from pipeline.redact import redact, redact_value

if TYPE_CHECKING:
    from pipeline.config.load import LoadedConfig

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

EXIT_FAILED = 1
EXIT_USAGE = 2


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
