"""`pipeline serve`: the long-running service (webhooks, polling, cron rebuilds, live config)
until SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from pipeline.cli.common import EXIT_USAGE, command, config_option, fail
from pipeline.errors import ConfigError
from pipeline.redact import redact_url

if TYPE_CHECKING:
    from pipeline.service.daemon import Service


# The service's modules (FastAPI, uvicorn, APScheduler, watchdog) are imported by the commands
# that use them, so that `pipeline run` and friends do not pay for them at start-up.
def service_class() -> type[Service]:
    """The service's class, imported only when a command needs it."""
    from pipeline.service.daemon import Service

    return Service


def local_repo_path(url: str) -> Path | None:
    """The bare or working repository at `url` when it is on this machine, else None."""
    from pipeline.sources.watch import local_repo_path as find

    return find(url)


@command("serve")
@config_option
@click.option(
    "--no-watch-repos",
    "no_watch_repos",
    is_flag=True,
    help="Do not watch local repos' refs (e.g. on network filesystems); poll them.",
)
def serve(config: Path | None, no_watch_repos: bool) -> None:
    """Run the service: webhooks, polling, cron rebuilds, live config; until SIGTERM."""
    import structlog

    from pipeline.config import load as config_mod

    log = structlog.get_logger(__name__)
    service = service_class()(
        config or config_mod.default_config_path(), watch_repos=not no_watch_repos
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("service.stopping", signal=signal.Signals(signum).name)
        service.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        service.serve_forever(on_started=_announce)
    except ConfigError as exc:
        fail(f"{exc}\n{len(exc.problems)} problem(s) found.", EXIT_USAGE)
    except OSError as exc:
        fail(str(exc))


@command("dashboard-password")
def dashboard_password() -> None:
    """Ask for a password (twice) and print its hash for `[server] password_hash`, which
    the dashboard's login then takes besides the API token."""
    from pipeline.dashboard.access import hash_password

    password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 12:
        fail("the password needs at least 12 characters", EXIT_USAGE)
    click.echo(hash_password(password))


def _announce(service: Service) -> None:
    import structlog

    log = structlog.get_logger(__name__)
    cfg = service.loaded.model
    log.info(f"listening on {service.url}")
    for name, repo in cfg.repos.items():
        how = [f"poll every {repo.poll:g}s"] if repo.poll else []
        how += ["watch refs"] if service.watch_repos and local_repo_path(repo.url) else []
        how += ["webhook /hooks/" + name]
        log.info("following", repo=name, url=redact_url(repo.url), ref=repo.follows, via=how)
    for name, svc in cfg.services.items():
        log.info("service", service=name, image=svc.image, hosts=svc.hosts)
    log.info(f"dashboard at {service.url}/")
