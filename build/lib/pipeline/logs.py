"""structlog set-up: readable on a terminal, JSON lines on request, secrets always redacted.

structlog (and the rich tracebacks it loads) is imported by `configure`, not by this module:
the CLI imports this module for every command, `--help` included, and only the commands that
log pay for structlog."""

from __future__ import annotations

import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

from pipeline.redact import redact

LogFormat = Literal["console", "json"]


def _masked(value: Any) -> Any:
    """`value` with secrets masked in every string; any other object (an exception, a path) is
    replaced by its redacted repr, which is what both renderers would print for it anyway."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_masked(v) for v in value)
    return redact(repr(value))


def _redact_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    # Last before rendering, so nothing added by earlier processors escapes it.
    return {k: _masked(v) for k, v in event.items()}


def configure(fmt: LogFormat = "console", level: str = "info", stream: Any = None) -> None:
    """Configure structlog for the process; context bound with `bind_contextvars` is included."""
    import logging

    import structlog

    stream = stream or sys.stderr
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
