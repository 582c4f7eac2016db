"""Webhook layer: authenticate a git host's delivery, then read the ref changes it announces.

Pure functions over (headers, raw body bytes, secret); the HTTP server maps `WebhookError.status`
(401 for SignatureError, 400 for PayloadError) to its answer and enqueues the events. Signature
rules live in `signatures`, body reading in `payloads` (both beside this module).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.sources.webhooks.payloads import PushEvent, parse
from pipeline.sources.webhooks.signatures import (
    PROVIDERS,
    PayloadError,
    SignatureError,
    WebhookError,
    sign,
    verify,
)

__all__ = [
    "PROVIDERS",
    "PayloadError",
    "PushEvent",
    "SignatureError",
    "WebhookError",
    "parse",
    "sign",
    "verify",
    "verify_and_parse",
]


def verify_and_parse(
    headers: Mapping[str, str],
    body: bytes,
    secret: str | None,
    *,
    now: float | None = None,
    max_age: float = 300,
) -> list[PushEvent]:
    """Verify the signature over the raw body first, and only then parse it into events.

    Nothing in an unauthenticated body is decoded; see `verify` for the no-secret policy.
    """
    verify(headers, body, secret, now=now, max_age=max_age)
    return parse(headers, body)
