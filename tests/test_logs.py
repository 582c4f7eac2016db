"""Secrets never reach a terminal or a log file: log lines (console and JSON) and the progress
lines a pass prints are masked, and the line itself is still there with `***`."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pipeline import logs
from pipeline.config.load import parse
from pipeline.redact import register_secret

SECRET = "env-file-token-logs-8d2f"


class AuthError(Exception):
    pass


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    logs.configure("console", "info")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_objects_logged_as_values_are_masked(fmt: logs.LogFormat, restore_logging: None) -> None:
    """An exception (or any object) passed as a log value, alone or inside a list, prints with
    the secret as `***` in both formats; strings around it are kept."""
    register_secret(SECRET)
    out = io.StringIO()
    logs.configure(fmt, "info", stream=out)
    error = AuthError(f"auth failed for token {SECRET}")
    structlog.get_logger("t").warning("stop failed", service="web", error=error, causes=[error])
    text = out.getvalue()
    assert SECRET not in text
    assert "auth failed for token ***" in text and "stop failed" in text
    if fmt == "json":
        line = json.loads(text)
        assert line["error"] == "AuthError('auth failed for token ***')"


def test_exception_tracebacks_are_masked(restore_logging: None) -> None:
    """A logged exception's traceback (exc_info) shows `***` for the secret."""
    register_secret(SECRET)
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    try:
        raise AuthError(f"auth failed for token {SECRET}")
    except AuthError:
        structlog.get_logger("t").exception("pass failed")
    assert SECRET not in out.getvalue()
    assert "auth failed for token ***" in json.loads(out.getvalue())["exception"]


def test_progress_lines_of_a_pass_are_masked(tmp_path: Path) -> None:
    """What a pass reports (the lines `pipeline run` and the git hook print, and the service
    logs) has the secret as `***`, from the runner and its builder alike."""
    from pipeline.deploy.connections import Connections
    from pipeline.deploy.runner import Runner
    from pipeline.state.store import State

    register_secret(SECRET)
    loaded = parse('[pipeline]\ndata_dir = "data"\n', tmp_path / "pipeline.toml")
    lines: list[str] = []
    runner = Runner(
        loaded, State.in_dir(tmp_path / "data"), Connections(loaded), report=lines.append
    )
    runner.report(f"web: FAILED, rolled back: app said: auth failed for token {SECRET}")
    runner.builder.report(f"web: build log: token {SECRET}")
    assert lines == [
        "web: FAILED, rolled back: app said: auth failed for token ***",
        "web: build log: token ***",
    ]
