"""Redaction of secrets from every text pipeline emits: logs, errors, CLI and API output.

Two sources: configured secret values (registered when they are read from the environment or a
file) and credentials inside URLs (`https://user:token@host` → `https://***@host`).
"""

from __future__ import annotations

import re
import threading

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")
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


def redact(text: str) -> str:
    """Return text with URL credentials and every registered secret replaced by `***`."""
    text = _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", text)
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
