"""Redaction of secrets from every text pipeline emits: logs, errors, CLI and API output.

Two sources: configured secret values (registered when they are read from the environment or a
file) and credentials inside URLs (`https://user:token@host` → `https://***@host`).
"""

from __future__ import annotations

import re
import threading
from urllib.parse import unquote

# A URL's user-info runs from "scheme://" to the last "@" before the path, so a password that
# itself holds an "@" is masked whole. A double quote, never part of a URL, ends it: JSON text
# is not masked from one value into the next.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s\"]*)@")
_lock = threading.Lock()
_secrets: set[str] = set()

# Very short values would redact ordinary words; a secret this short is refused by nobody, but
# masking "ab" everywhere would make every message unreadable.
_MIN_SECRET_LEN = 4


def register_secret(value: str | None) -> None:
    """Remember a secret value so that it is masked wherever it would be printed."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


# Values of an env_file that are settings in every deployment, never secrets: masking them
# would turn the "info" of every log line's level, or every "8080" of a URL, into ***.
_PLAIN_SETTINGS = frozenset(
    {"true", "false", "yes", "no", "on", "off", "null", "none"}  # booleans
    | {"debug", "info", "warn", "warning", "error", "critical", "fatal", "trace"}  # log levels
)
_MAX_PLAIN_NUMBER = 5  # digits: a port (65535), a count, a timeout in seconds


def register_env_value(value: str) -> None:
    """Remember a value read from a service's `env_file` as a secret, as every value of one is
    (Compose files mix settings and credentials, and nothing says which is which).

    The rule: every value is masked unless it is shorter than 4 characters (as every secret),
    a boolean or log-level word (`true`, `off`, `info`, ...; any case), or a number of at most
    5 digits (a port, a count): those are settings in every deployment, and masking them
    would make pipeline's own output unreadable while hiding nothing. A value spanning several
    lines (a PEM key) is masked whole and line by line, since an app may print one line of it.
    """
    candidates = [value]
    if "\n" in value:
        candidates += [line.strip() for line in value.splitlines()]
    for candidate in candidates:
        plain = candidate.lower() in _PLAIN_SETTINGS or (
            candidate.isdigit() and len(candidate) <= _MAX_PLAIN_NUMBER
        )
        if not plain:
            register_secret(candidate)


def redact_url(text: str) -> str:
    """Replace the user-info of every `scheme://user:pw@host` URL in `text` by `***`.

    `https://u:p@ss@h/x` becomes `https://***@h/x`; scp-like `git@host:path` and `@` in a path
    are left alone.
    """
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", text)


def url_secrets(url: str) -> list[str]:
    """The credentials in a URL's user-info as literal strings, raw and percent-decoded, longest
    first: for masking where a tool echoes them without the URL around them. [] when none."""
    m = _URL_USERINFO.match(url)
    if not m:
        return []
    userinfo = m.group("userinfo")
    password = userinfo.partition(":")[2]
    token = userinfo if not password else ""
    found = {userinfo, unquote(userinfo), password, unquote(password), token, unquote(token)}
    return sorted((s for s in found if len(s) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: str) -> str:
    """Return text with URL credentials and every registered secret replaced by `***`."""
    text = redact_url(text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def redact_value(value: object) -> object:
    """Redact strings inside plain data (dicts, lists) as found in log events and API bodies."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value
