"""Options and helpers shared by every CLI command.

A command's module is imported only when that command runs (or its `--help` is asked for;
`pipeline/cli/app.py` lists the commands without importing them), and at module level the CLI
modules import only click, the standard library and the light shared modules (`errors`,
`redact`, `logs`); the config, the state database (SQLAlchemy), Docker, git and the service are
imported inside the commands that use them (`tests/cli/test_startup_imports.py`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from pipeline.errors import ConfigError, LockedError
from pipeline.redact import redact, redact_value

if TYPE_CHECKING:
    from pipeline.config.load import LoadedConfig
    from pipeline.config.model import ServiceSection

F = TypeVar("F", bound=Callable[..., Any])


# ctx.meta key: the (format, level) the app's `--log-format`/`--log-level` asked for, set up
# by the command that runs (absent for the commands that log nothing, `app._NO_LOGGING`).
LOG_SETTINGS = "pipeline.log_settings"


class Command(click.Command):
    """A click command whose help lists its positional arguments with their help texts, as the
    options are listed (click >= 8.2 without 8.5's own section): "Arguments:", then one row
    per argument, its metavar and `Arg` help, `[default: …]` and `[required]`. Before it
    runs, it sets up logging as the app's options asked (`LOG_SETTINGS`), unless it was made
    with `logs_later=True`: such a command calls `start_logging()` once it knows it will log
    (`rollback` handed to a running service logs nothing, and skips structlog's import)."""

    def __init__(self, *args: Any, logs_later: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logs_later = logs_later

    def invoke(self, ctx: click.Context) -> Any:
        """Set up logging (once, when the app asked for it), then run the command."""
        if not self.logs_later:
            start_logging(ctx)
        return super().invoke(ctx)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Usage, help text, arguments, options, epilog."""
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        rows = [_argument_row(p, ctx) for p in self.get_params(ctx) if isinstance(p, Arg)]
        if rows:
            with formatter.section("Arguments"):
                formatter.write_dl(rows)
        self.format_options(ctx, formatter)
        self.format_epilog(ctx, formatter)


def start_logging(ctx: click.Context | None = None) -> None:
    """Set up logging as the app's `--log-format`/`--log-level` asked, if not done yet."""
    ctx = ctx or click.get_current_context()
    settings = ctx.meta.pop(LOG_SETTINGS, None)
    if settings is not None:
        from pipeline import logs

        logs.configure(*settings)


class Group(click.Group):
    """A click group whose commands are `Command`s (their arguments listed in their help)."""

    command_class = Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands in the order they were added (click sorts them by name)."""
        return list(self.commands)


class Arg(click.Argument):
    """A positional argument with a help text, shown by `Command`'s help. `help`: str or None."""

    def __init__(self, param_decls: list[str], help: str | None = None, **attrs: Any) -> None:
        super().__init__(param_decls, **attrs)
        self.help = help


def _argument_row(arg: Arg, ctx: click.Context) -> tuple[str, str]:
    extra = []
    default = arg.get_default(ctx, call=False)
    if not arg.required and isinstance(default, str | int | float | Path):
        extra.append(f"[default: {default}]")
    if arg.required:
        extra.append("[required]")
    return arg.make_metavar(ctx), "  ".join([*([arg.help] if arg.help else []), *extra])


def argument(name: str, **attrs: Any) -> Callable[[F], F]:
    """`click.argument` with a help text (`help=`) shown in the command's help."""
    return click.argument(name, cls=Arg, **attrs)


def command(name: str | None = None, **attrs: Any) -> Callable[[Callable[..., Any]], Command]:
    """`click.command` for a pipeline command: `Command`, and option defaults shown in its
    help (what every option of the CLI shows unless it says `show_default=False`)."""
    settings = {"show_default": True, **attrs.pop("context_settings", {})}
    return click.command(name, cls=Command, context_settings=settings, **attrs)


config_option = click.option(
    "--config",
    "-c",
    "config",
    type=click.Path(path_type=Path),
    default=None,
    help="Config file (default: $PIPELINE_CONFIG, else ./pipeline.toml).",
    show_default=False,
)
json_option = click.option("--json", "json", is_flag=True, help="Print JSON instead of a table.")

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
    click.echo(redact(message), err=True)
    raise click.exceptions.Exit(code)


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
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- shell completion (`pipeline --install-completion`) --------------------------------------
# Read cheaply: the TOML file named by -c/--config, $PIPELINE_CONFIG or ./pipeline.toml, parsed
# with tomllib and not validated (a completion must answer at once and never fail).


def _config_names(ctx: click.Context, table: str) -> list[str]:
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


def _completer(table: str) -> Callable[[click.Context, click.Parameter | None, str], list[str]]:
    def complete(ctx: click.Context, param: click.Parameter | None, incomplete: str) -> list[str]:
        return [n for n in _config_names(ctx, table) if n.startswith(incomplete)]

    complete.__doc__ = (
        f"Names of the config's [{table}.*] tables that start with what is typed (click's "
        "`shell_complete` callback: context, parameter, incomplete word)."
    )
    return complete


complete_service = _completer("services")
complete_host = _completer("hosts")
complete_image = _completer("images")
complete_repo = _completer("repos")
