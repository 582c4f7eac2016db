"""A service's `env_file`, read as Docker Compose reads one, by python-dotenv's parser (the one
module that imports it); each line checked, its values registered as secrets as they are read.

The syntax (Compose's, https://docs.docker.com/compose/how-tos/environment-variables/
variable-interpolation/#env-file-syntax): `NAME=VALUE` a line; blank lines and lines starting
with `#` are ignored; an `export ` prefix is allowed; `VALUE` may be unquoted (an inline comment
needs a space before its `#`; trailing spaces are dropped), single-quoted (literal) or
double-quoted (`\\n`, `\\t`, `\\"` and `\\\\` are escapes); a quoted value may span several lines
(a PEM key) and is kept whole. The last of two lines naming one variable wins.

Where pipeline differs from Compose, on purpose:
- No interpolation. Compose expands `${VAR}` and `$VAR` in unquoted and double-quoted values
  from the environment of the shell running it; pipeline passes them literally, so that its own
  environment (its tokens, its registry password) can never reach a container. Write values in
  full.
- A name alone (`NAME`, no `=`) is refused: Compose copies it from its own environment, which
  pipeline never passes on. The same message catches an unquoted value spanning several lines.
- `NAME: value` (the YAML form Compose's parser also takes) is refused: write `NAME=value`.
- python-dotenv also decodes `\\a`, `\\b`, `\\f` and `\\v` in double-quoted values, Compose does
  not; a variable name may hold letters, digits, `_`, `.`, `-`, `[` and `]` in both.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.redact import register_env_value

if TYPE_CHECKING:
    from dotenv.parser import Binding

# Compose's rule for a variable name (compose-go dotenv/parser.go: letters, digits, `_.-[]`).
_NAME = re.compile(r"[\w.\-\[\]]+")
_YAML_STYLE = re.compile(r"^\s*(?:export\s+)?[\w.\-\[\]]+\s*:")
_QUOTED = re.compile(r"^\s*(?:export\s+)?[^=]*=\s*(['\"])")


class EnvFileError(ConfigError):
    """An env_file that cannot be used: missing, unreadable, not UTF-8, or a line that is not
    `NAME=VALUE`. Its one problem reads `FILE:LINE: services.NAME.env_file: what is wrong`, and
    never holds a value of the file."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem])


@dataclass(frozen=True)
class EnvFile:
    """A service's env_file as read: its text (what the service's spec hash covers, what a
    release records) and the variables it gives the container, in file order."""

    text: str = field(repr=False)
    values: Mapping[str, str] = field(repr=False)


def parse_env(text: str) -> tuple[dict[str, str], tuple[int, str] | None]:
    """The variables of env_file `text` (values registered as secrets) and its first problem as
    (line number, message), or None. Nothing after a problem is trusted (an unclosed quote turns
    the lines after it into nonsense): the values returned are those before it."""
    # Imported here: python-dotenv is paid only by a config whose services have an env_file.
    from dotenv.parser import parse_stream

    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        problem = _problem(binding)
        if problem is not None:
            return values, (_first_line(binding), problem)
        if binding.key is not None and binding.value is not None:
            register_env_value(binding.value)
            values[binding.key] = binding.value
    return values, None


def env_values(text: str) -> dict[str, str]:
    """The variables of env_file text already checked when it was read (a recorded release's
    included), each registered as a secret; see `parse_env`."""
    return parse_env(text)[0]


def read_env_file(path: Path, shown: str, key: str, missing_at: str) -> EnvFile:
    """Read and check the env_file at `path`; `shown` names it in messages, `key` is the config
    key naming it (`services.web.env_file`) and `missing_at` the config's `FILE:LINE` of that key,
    where a file that cannot be read is reported. Raises EnvFileError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EnvFileError(
            f"{missing_at}: {key}: cannot read {shown}: {exc.strerror or exc}"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise EnvFileError(f"{shown}:{line}: {key}: not UTF-8 text") from None
    values, problem = parse_env(text)
    if problem is not None:
        raise EnvFileError(f"{shown}:{problem[0]}: {key}: {problem[1]}")
    return EnvFile(text, values)


def _first_line(binding: Binding) -> int:
    """The number of the line a statement starts on: python-dotenv counts from the blank lines
    it skipped before it."""
    text = binding.original.string
    skipped = text[: len(text) - len(text.lstrip())]
    return binding.original.line + skipped.count("\n")


def _problem(binding: Binding) -> str | None:
    """What is wrong with one parsed statement, or None. Never quotes the line: it may be a line
    of a secret (an unquoted PEM key's)."""
    line = binding.original.string
    if binding.error:
        if _YAML_STYLE.match(line):
            return "'NAME: value' is not read; write NAME=value"
        if _QUOTED.match(line):
            return "a quoted value is not closed, or text follows its closing quote"
        return "not NAME=VALUE"
    if binding.key is None:
        return None  # a comment or a blank line
    if binding.value is None:
        return (
            "no '=' on this line: a value spanning several lines must be quoted, and a name "
            "alone (which Compose copies from its own environment) is not supported; write "
            "NAME=value"
        )
    if not _NAME.fullmatch(binding.key):
        return "invalid variable name: use letters, digits, '_', '.', '-', '[' and ']'"
    return None
