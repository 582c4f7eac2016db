"""`pipeline serve`: the long-running service (webhooks, polling, cron rebuilds, live config)
until SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.cli.common import EXIT_USAGE, ConfigOption, fail
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


def register(app: typer.Typer) -> None:
    """Add `serve` to the main app."""

    @app.command()
    def serve(
        config: ConfigOption = None,
        no_watch_repos: Annotated[
            bool,
            typer.Option(
                "--no-watch-repos",
                help="Do not watch local repos' refs (e.g. on network filesystems); poll them.",
            ),
        ] = False,
    ) -> None:
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
