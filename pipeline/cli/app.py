"""The `pipeline` command line: thin commands over the modules that do the work.

Start-up is kept short: the group lists its commands from `_LAZY` (name, module, short help)
without importing their modules, and imports a command's module only when that command runs
or its help is asked for (click's "Lazily Loading Subcommands" pattern); each command imports
the config, the state database, Docker, git or the service when it runs (see
`pipeline/cli/common.py`)."""

from __future__ import annotations

import os
import signal
import sys
from importlib import import_module
from pathlib import Path
from types import FrameType

import click

from pipeline import logs
from pipeline.cli.common import EXIT_USAGE, LOG_SETTINGS, Group, config_option, fail, load_config
from pipeline.errors import PipelineError

# Commands that only read the config and print: they log nothing, so they do not pay for
# structlog's import (hook-validate runs on every push; hook-event configures its own logging).
_NO_LOGGING = frozenset({"validate", "hook-validate", "hook-event", "init"})

# The commands defined in other modules, in the order `pipeline --help` lists them: name ->
# (module under pipeline.cli, its attribute, the first sentence of its help as `--help` lists
# it; None for a hidden command). tests/cli/test_commands.py checks each against its command.
_LAZY: dict[str, tuple[str, str, str | None]] = {
    "plan": (
        "deploy",
        "plan",
        "Show what a run would build and roll out, and why; change nothing.",
    ),
    "run": ("deploy", "run", "One pass: bring every service to the newest commit."),
    "deploy": ("deploy", "deploy", "Roll SERVICE out now, even a revision that failed before."),
    "rebuild": (
        "deploy",
        "rebuild",
        "Rebuild IMAGE now, pulling its base image fresh (what its `rebuild` schedule does); "
        "its services are rolled out only when the digest changed.",
    ),
    "rollback": (
        "deploy",
        "rollback",
        "Put SERVICE back on an earlier succeeded release on every host, its image and its "
        "settings, and pin it there until a newer commit or `pipeline deploy SERVICE`.",
    ),
    "status": (
        "deploy",
        "status",
        "Per service and host: revision, digest, container state and health.",
    ),
    "history": (
        "deploy",
        "history",
        "Rollouts, newest first: service, revision, status, why it failed, times, error.",
    ),
    "logs": (
        "logs",
        "logs",
        "SERVICE's container logs from every host it runs on, in time order, prefixed with the "
        "host; -f follows until Ctrl-C, onto the new container when a deploy replaces one.",
    ),
    "exec": (
        "exec",
        "exec_",
        "Run CMD in SERVICE's running container (on the first host, --host H, or each with "
        "--all-hosts); exit with CMD's exit code.",
    ),
    "init": (
        "init",
        "init",
        "Write a commented pipeline.toml for the repository in DIRECTORY, from its "
        "Dockerfiles; refuse to overwrite one.",
    ),
    "prune": (
        "prune",
        "prune",
        "Remove, per host, each service's containers and images beyond keep_revisions, never "
        "the deployed one or what a rollback needs; say what went and the space freed.",
    ),
    "serve": (
        "serve",
        "serve",
        "Run the service: webhooks, polling, cron rebuilds, live config; until SIGTERM.",
    ),
    "dashboard-password": (
        "serve",
        "dashboard_password",
        "Ask for a password (twice) and print its hash for `[server] password_hash`, which "
        "the dashboard's login then takes besides the API token.",
    ),
    "hooks": ("hooks", "hooks_app", "Git push-to-deploy hooks for bare repositories."),
    "lab": ("lab", "lab_app", "A lab of real Docker hosts on this machine."),
    "proxy": ("proxy", "proxy_app", "The reverse proxy pipeline runs on each host."),
    "lock": ("lock", "lock_app", "The leases deploys hold: who, since when; release."),
    "db": ("db", "db_app", "The state database's schema: version and upgrade."),
    "hook-event": ("hooks", "hook_event", None),
    "hook-validate": ("hooks", "hook_validate", None),
}


class LazyGroup(Group):
    """A click group whose commands (besides those added to it) are imported on first use,
    from `_LAZY`; `--help` lists them from `_LAZY`'s short help, importing none (click docs,
    "Lazily Loading Subcommands")."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The eager commands in the order they were added, then `_LAZY`'s in its order."""
        return [*super().list_commands(ctx), *(n for n in _LAZY if n not in self.commands)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command named `cmd_name`, its module imported now if it is a lazy one; None
        for an unknown name (click then says "No such command")."""
        if cmd_name not in self.commands and cmd_name in _LAZY:
            module, attr, _short = _LAZY[cmd_name]
            cmd = getattr(import_module(f"pipeline.cli.{module}"), attr)
            self.add_command(cmd, cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The "Commands:" section as click writes it, with the lazy commands' short help
        taken from `_LAZY` instead of their (unimported) modules."""
        rows: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            cmd = self.commands.get(name)
            if cmd is not None:
                if not cmd.hidden:
                    rows.append((name, cmd))
            elif (short := _LAZY[name][2]) is not None:
                # A stand-in with that help: click shortens it as it would the command's own.
                rows.append((name, click.Command(name, help=short)))
        if not rows:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in rows)
        listing = [(name, cmd.get_short_help_str(limit)) for name, cmd in rows]
        with formatter.section("Commands"):
            formatter.write_dl(listing)


def _install_completion(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from pipeline.cli import completion

    shell, path = completion.install(ctx.find_root().command, _prog_name(ctx))
    click.secho(f"{shell} completion installed in {path}", fg="green")
    click.echo("Completion will take effect once you restart the terminal")
    ctx.exit(0)


def _show_completion(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from pipeline.cli import completion

    click.echo(completion.script(ctx.find_root().command, _prog_name(ctx)))
    ctx.exit(0)


def _prog_name(ctx: click.Context) -> str:
    return ctx.find_root().info_name or "pipeline"


@click.group(
    cls=LazyGroup,
    help="GitOps deployment for Docker hosts: rebuild what a commit changed, roll it out behind "
    "health checks, roll back on failure.",
    no_args_is_help=True,
    context_settings={"show_default": True},
)
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    help="console or json (JSON lines).",
)
@click.option(
    "--log-level",
    default=None,
    help="debug, info, warning, error (default: warning on a terminal, else info).",
    show_default=False,
)
@click.option(
    "--install-completion",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_install_completion,
    help="Install completion for the current shell.",
)
@click.option(
    "--show-completion",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_completion,
    help="Show completion for the current shell, to copy it or customize the installation.",
)
@click.pass_context
def app(ctx: click.Context, log_format: logs.LogFormat, log_level: str | None) -> None:
    if ctx.invoked_subcommand not in _NO_LOGGING:
        # Log events go to stderr; a person at a terminal reads the progress lines, not them.
        # Set up when the command runs (`common.Command.invoke`), not for its `--help` or a
        # usage error: structlog's import is most of a `--help`'s start-up.
        level = log_level or ("warning" if sys.stderr.isatty() else "info")
        ctx.meta[LOG_SETTINGS] = (log_format, level)


@app.command()
@config_option
def validate(config: Path | None) -> None:
    """Check the config file, every service's env_file, the named docker CLI and the ACME CA's
    root file; exit 0 with a summary, or 2 with every problem found."""
    loaded = load_config(config)
    problems = loaded.docker_cli_problems() + loaded.env_file_problems() + loaded.acme_problems()
    if problems:
        fail("\n".join(problems) + f"\n{len(problems)} problem(s) found.", EXIT_USAGE)
    m = loaded.model
    click.echo(
        f"{loaded.path.name}: ok: {len(m.repos)} repo(s), {len(m.images)} image(s), "
        f"{len(m.services)} service(s), {len(m.hosts)} host(s); "
        f"registry {m.registry.address if m.registry else 'none (images built on each host)'}"
    )
    for name, svc in m.services.items():
        image = m.images[svc.image]
        click.echo(
            f"  service {name}: image {svc.image} from repo {image.repo} "
            f"({m.repos[image.repo].follows}) on "
            + (f"cluster {svc.cluster}" if svc.cluster else ", ".join(svc.hosts))
        )


@app.command()
@config_option
@click.option(
    "--lab-dir", type=click.Path(path_type=Path), default=Path("lab"), help="Where the lab lives."
)
def demo(config: Path | None, lab_dir: Path) -> None:
    """Bring up the lab, deploy the sample app from the example config, then deploy a change."""
    from pipeline.cli.output import make_reporter
    from pipeline.lab.demo import run_demo

    loaded = load_config(config or Path("pipeline.example.toml"))
    # On a terminal the demo's lines get the same view as `run` (spinner, elapsed time).
    reporter = make_reporter(False) if sys.stdout.isatty() else None
    try:
        ok = run_demo(loaded, lab_dir, reporter.line if reporter else click.echo)
    except PipelineError as exc:
        fail(str(exc))
    finally:
        if reporter:
            reporter.close([])
    if not ok:
        raise click.exceptions.Exit(1)


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
    """Console-script entry point. A completion script installed by an earlier pipeline (on
    typer: `_PIPELINE_COMPLETE=complete_bash`, `complete_zsh`, `complete_fish`) is answered in
    its own protocol; click answers its own (`bash_complete`, …) inside `app()`."""
    interrupt_on_sigterm()
    instruction = os.environ.get("_PIPELINE_COMPLETE", "")
    if instruction.startswith("complete_"):
        from pipeline.cli.completion import complete_legacy

        sys.exit(complete_legacy(app, "pipeline", "_PIPELINE_COMPLETE", instruction))
    try:
        app()
    except PipelineError as exc:
        # An error a command did not handle itself (the state database out of reach, say):
        # its message, redacted, and the exit code its kind declares, never a traceback.
        from pipeline.cli.common import exit_code_of
        from pipeline.redact import redact

        click.echo(redact(str(exc)), err=True)
        raise SystemExit(exit_code_of(exc)) from None
