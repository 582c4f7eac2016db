"""The `pipeline` command line: thin commands over the modules that do the work.

Start-up is kept short: the command modules are imported to list and parse the commands, and
each command imports the config, the state database, Docker, git or the service when it runs
(see `pipeline/cli/common.py`)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from pipeline import logs
from pipeline.cli.common import EXIT_USAGE, ConfigOption, fail, load_config
from pipeline.errors import PipelineError

# Commands that only read the config and print: they log nothing, so they do not pay for
# structlog's import (hook-validate runs on every push; hook-event configures its own logging).
_NO_LOGGING = frozenset({"validate", "hook-validate", "hook-event", "init"})

app = typer.Typer(
    help="GitOps deployment for Docker hosts: rebuild what a commit changed, roll it out behind "
    "health checks, roll back on failure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: rich's help formatting costs more start-up (~0.2 s) than all the rest of it.
    rich_markup_mode=None,
)


@app.callback()
def _main(
    ctx: typer.Context,
    log_format: Annotated[
        logs.LogFormat, typer.Option("--log-format", help="console or json (JSON lines).")
    ] = "console",
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            help="debug, info, warning, error (default: warning on a terminal, else info).",
            show_default=False,
        ),
    ] = None,
) -> None:
    if ctx.invoked_subcommand not in _NO_LOGGING:
        # Log events go to stderr; a person at a terminal reads the progress lines, not them.
        level = log_level or ("warning" if sys.stderr.isatty() else "info")
        logs.configure(log_format, level)


@app.command()
def validate(config: ConfigOption = None) -> None:
    """Check the config file, every service's env_file and the named docker CLI; exit 0 with
    a summary, or 2 with every problem found."""
    loaded = load_config(config)
    problems = loaded.docker_cli_problems() + loaded.env_file_problems()
    if problems:
        fail("\n".join(problems) + f"\n{len(problems)} problem(s) found.", EXIT_USAGE)
    m = loaded.model
    typer.echo(
        f"{loaded.path.name}: ok: {len(m.repos)} repo(s), {len(m.images)} image(s), "
        f"{len(m.services)} service(s), {len(m.hosts)} host(s); "
        f"registry {m.registry.address if m.registry else 'none (images built on each host)'}"
    )
    for name, svc in m.services.items():
        image = m.images[svc.image]
        typer.echo(
            f"  service {name}: image {svc.image} from repo {image.repo} "
            f"({m.repos[image.repo].follows}) on "
            + (f"cluster {svc.cluster}" if svc.cluster else ", ".join(svc.hosts))
        )


@app.command()
def demo(
    config: ConfigOption = None,
    lab_dir: Annotated[Path, typer.Option("--lab-dir", help="Where the lab lives.")] = Path("lab"),
) -> None:
    """Bring up the lab, deploy the sample app from the example config, then deploy a change."""
    from pipeline.cli.output import make_reporter
    from pipeline.lab.demo import run_demo

    loaded = load_config(config or Path("pipeline.example.toml"))
    # On a terminal the demo's lines get the same view as `run` (spinner, elapsed time).
    reporter = make_reporter(False) if sys.stdout.isatty() else None
    try:
        ok = run_demo(loaded, lab_dir, reporter.line if reporter else typer.echo)
    except PipelineError as exc:
        fail(str(exc))
    finally:
        if reporter:
            reporter.close([])
    if not ok:
        raise typer.Exit(1)


def _register_subcommands() -> None:
    from pipeline.cli import deploy as cli_deploy
    from pipeline.cli import exec as cli_exec
    from pipeline.cli import hooks as cli_hooks
    from pipeline.cli import init as cli_init
    from pipeline.cli import logs as cli_logs
    from pipeline.cli import prune as cli_prune
    from pipeline.cli import serve as cli_serve
    from pipeline.cli.db import db_app
    from pipeline.cli.lab import lab_app
    from pipeline.cli.lock import lock_app
    from pipeline.cli.proxy import proxy_app

    cli_deploy.register(app)
    cli_logs.register(app)
    cli_exec.register(app)
    cli_init.register(app)
    cli_prune.register(app)
    cli_serve.register(app)
    cli_hooks.register(app)

    app.add_typer(lab_app, name="lab", help="A lab of real Docker hosts on this machine.")
    app.add_typer(proxy_app, name="proxy", help="The reverse proxy pipeline runs on each host.")
    app.add_typer(lock_app, name="lock", help="The leases deploys hold: who, since when; release.")
    app.add_typer(db_app, name="db", help="The state database's schema: version and upgrade.")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does, so a `pipeline
    run`, `deploy` or `rollback` that is asked to stop undoes its rollout on every host it
    touched before it exits (`pipeline serve` installs its own handler: it stops gracefully).
    A forked child (pyroute2 enters namespaces in children it ends with SIGTERM) dies as it
    would have, instead of unwinding into its parent's code."""
    main_pid = os.getpid()

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main() -> None:
    """Console-script entry point."""
    interrupt_on_sigterm()
    _register_subcommands()
    try:
        app()
    except PipelineError as exc:
        # An error a command did not handle itself (the state database out of reach, say):
        # its message, redacted, and the exit code its kind declares, never a traceback.
        from pipeline.cli.common import exit_code_of
        from pipeline.redact import redact

        typer.echo(redact(str(exc)), err=True)
        raise SystemExit(exit_code_of(exc)) from None
