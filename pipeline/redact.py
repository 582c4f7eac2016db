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
