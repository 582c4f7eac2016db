"""What `run`, `deploy`, `rollback`, `rebuild` and `demo` show while they work, and after.

The runner reports one line per step and host (`Runner.report`). On a terminal a `RichReporter`
prints each line as it comes, keeps a spinner with the elapsed time under the step at work
(building, pushing, pulling, checking health), and ends with a summary table (service, hosts,
revision, outcome, duration); anywhere else a `PlainReporter` writes the bare lines to stderr,
no colour and no control codes, so stdout keeps only the outcome (or the `--json` document).
rich is imported by the terminal reporter only (the CLI's start-up, ARCHITECTURE.md)."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import click

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


class Reporter(Protocol):
    """Where a command's progress lines go (`Runner(report=reporter.line)`)."""

    def line(self, text: str) -> None: ...

    def progress(self, what: str, done: int, total: int | None) -> None:
        """How far long work is (`hosts.engine.Progress`): bytes of a push or pull, steps of a
        build."""

    def close(self, releases: list[dict[str, Any]]) -> None:
        """Stop the progress display and show the summary of `releases` (`release_json`)."""


class PlainReporter:
    """Lines to stderr as they come, nothing else (pipes, files, CI logs, `--json`)."""

    def line(self, text: str) -> None:
        click.echo(text, err=True)  # the runner has redacted its lines

    def progress(self, what: str, done: int, total: int | None) -> None:
        return None  # a log file gets the step lines, not a counter

    def close(self, releases: list[dict[str, Any]]) -> None:
        return None


def duration(release: dict[str, Any]) -> float | None:
    """Seconds between a release's start and finish (ISO 8601 texts), None while it runs."""
    if not release.get("started_at") or not release.get("finished_at"):
        return None
    start = datetime.fromisoformat(release["started_at"])
    end = datetime.fromisoformat(release["finished_at"])
    return (end - start).total_seconds()


class RichReporter:
    """A terminal's view: each line printed with a tick, a spinner and the elapsed time on the
    step at work, a summary table at the end (rich, on stdout)."""

    def __init__(
        self, hosts: dict[str, list[str]] | None = None, console: Console | None = None
    ) -> None:
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self.hosts = hosts or {}
        self.started = time.monotonic()
        self.step_started = self.started
        self.current = "starting"
        # The spinner's text is rendered at each refresh (`__rich__`), not when a line comes:
        # the elapsed times move while a long step (a health wait, a pull) says nothing.
        self.status = self.console.status(self, spinner="dots")
        self.status.start()

    def _status_text(self) -> str:
        now = time.monotonic()
        step, total = now - self.step_started, now - self.started
        return f"{self.current}  [dim]({step:.1f}s, {total:.1f}s total)"

    def __rich__(self) -> Text:
        """What the spinner shows now: the step at work and the times elapsed."""
        from rich.text import Text

        return Text.from_markup(self._status_text())

    def line(self, text: str) -> None:
        from rich.markup import escape

        mark = "[red]✗[/]" if "FAILED" in text or "error" in text else "[green]✓[/]"
        self.console.print(f"{mark} {escape(text)}")
        self.current = escape(_next_step(text))
        self.step_started = time.monotonic()

    def progress(self, what: str, done: int, total: int | None) -> None:
        from rich.markup import escape

        self.current = escape(f"{what}: {amount(what, done, total)}")

    def close(self, releases: list[dict[str, Any]]) -> None:
        from rich.table import Table

        self.status.stop()
        if not releases:
            return
        table = Table(title=f"done in {time.monotonic() - self.started:.1f}s")
        for column in ("service", "hosts", "revision", "outcome", "duration"):
            table.add_column(column)
        for r in releases:
            took = duration(r)
            style = "green" if r["status"] == "succeeded" else "red"
            table.add_row(
                r["service"],
                ", ".join(self.hosts.get(r["service"], [])),
                (r["revision"] or "")[:12],
                f"[{style}]{r['status']}[/]",
                f"{took:.1f}s" if took is not None else "-",
            )
        self.console.print(table)


def amount(what: str, done: int, total: int | None) -> str:
    """ "step 3/5" for a build, "attempt 3" for a health check, "1.2/4.0 MB" for bytes (total
    unknown: "1.2 MB")."""
    if what.endswith(": health"):
        return f"attempt {done}"
    if " build " in f" {what} ":
        return f"step {done}/{total}" if total else f"step {done}"
    mb = f"{done / 1e6:.1f}"
    return f"{mb}/{total / 1e6:.1f} MB" if total else f"{mb} MB"


def _next_step(text: str) -> str:
    """What the runner does after reporting `text`: shown beside the spinner."""
    subject, _, rest = text.rpartition(": ")
    if rest.startswith("building"):
        return f"{subject}: building, then pushing"
    if rest.startswith("pulling"):
        return f"{subject}: pulling"
    if "checking" in rest:
        return f"{subject}: checking health"
    if rest.startswith("rolling"):
        return f"{text.partition(':')[0]}: rolling out"
    return "working"


def make_reporter(json: bool, hosts: dict[str, list[str]] | None = None) -> Reporter:
    """The rich view on a terminal (stdout a TTY, no `--json`), else plain lines."""
    if not json and sys.stdout.isatty():
        return RichReporter(hosts)
    return PlainReporter()
