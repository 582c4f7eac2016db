"""Who sent a webhook request and whether it proves knowledge of the shared secret.

Pure functions over (headers, raw body bytes, secret); no JSON is parsed to authenticate, so
`verify` can run before anything looks inside the body. Every check compares in constant time.

Policy: with a secret configured, a request without the provider's signature (or token) is
refused. With no secret configured (`secret=None`), requests are accepted unsigned and any
signature they carry is not checked: whether that is allowed is the server's decision. A body
field (Gitea's deprecated top-level "secret") is never proof of origin. A form delivery
(`application/x-www-form-urlencoded`, the JSON in its `payload` field) is signed over the body
as sent by GitHub, over the `payload` JSON by Gitea and Forgejo.

The generic form is pipeline's own: `X-Pipeline-Signature: sha256=<hex HMAC-SHA256(secret,
body)>`, optional `X-Pipeline-Event: push|ping` (default push) and `X-Delivery-Id`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from pipeline.errors import PipelineError

PROVIDERS = (
    "github",
    "gitlab",
    "gitea",
    "forgejo",
    "bitbucket-cloud",
    "bitbucket-server",
    "generic",
)

# Event keys that only one Bitbucket flavour sends: Cloud says "repo:push"/"pullrequest:*",
# Server/Data Center says "repo:refs_changed"/"pr:*"/"diagnostics:ping".
_BB_SERVER_KEYS = ("repo:refs_changed", "repo:modified", "repo:forked", "repo:comment:")
_BB_SERVER_PREFIXES = ("pr:", "diagnostics:", "mirror:")
_BB_CLOUD_KEYS = ("repo:push", "repo:fork", "repo:updated", "repo:commit_comment_created")
_BB_CLOUD_PREFIXES = ("pullrequest:", "issue:", "repo:commit_status_")

# (header, prefix) pairs carrying hex HMAC-SHA256 of the body, most specific first. Gitea and
# Forgejo also send X-Hub-Signature with SHA-1, which is deliberately not accepted.
_HEX_SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    "github": (("X-Hub-Signature-256", "sha256="),),
    "gitea": (("X-Gitea-Signature", ""), ("X-Hub-Signature-256", "sha256=")),
    "forgejo": (
        ("X-Forgejo-Signature", ""),
        ("X-Gitea-Signature", ""),
        ("X-Hub-Signature-256", "sha256="),
    ),
    # Bitbucket (both flavours) puts SHA-256 in the header GitHub uses for SHA-1.
    "bitbucket": (("X-Hub-Signature", "sha256="),),
    "generic": (("X-Pipeline-Signature", "sha256="),),
}

_MAX_TIMESTAMP_DIGITS = 15
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# A form delivery has one field; a few more are tolerated, a flood is refused unparsed.
_MAX_FORM_FIELDS = 16


class WebhookError(PipelineError):
    """A webhook request refused; `status` is the HTTP status to answer, `header` what is wrong."""

    status: int = 400

    def __init__(self, message: str, *, header: str | None = None) -> None:
        super().__init__(message)
        self.header = header


class SignatureError(WebhookError):
    """The request does not prove it comes from the configured sender (HTTP 401)."""

    status = 401


class PayloadError(WebhookError):
    """The request is authentic (or unchecked) but its headers or body are malformed (HTTP 400)."""

    status = 400


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Return headers keyed by lowercase name, so lookups ignore the sender's capitalisation."""
    return {str(k).lower(): str(v) for k, v in headers.items()}


def load_json_object(body: bytes) -> dict[str, Any]:
    """Decode a JSON object from the raw body, or raise PayloadError saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise PayloadError(f"body is not JSON: {exc}") from None
    except TypeError:
        raise PayloadError(f"body is not bytes but {type(body).__name__}") from None
    if not isinstance(data, dict):
        raise PayloadError(f"JSON body is not an object but {type(data).__name__}")
    return data


def is_form(headers: Mapping[str, str]) -> bool:
    """True when the delivery's Content-Type is `application/x-www-form-urlencoded` (GitHub's
    default for a new hook; Gitea, Gogs and Forgejo offer it too), parameters ignored."""
    value = lower_headers(headers).get("content-type", "")
    return value.split(";", 1)[0].strip().lower() == FORM_CONTENT_TYPE


def form_payload(body: bytes) -> bytes:
    """The exact bytes of the `payload` field of a form body (`payload=<URL-encoded JSON>`), as
    GitHub and Gitea send it (GitHub docs "Webhook events and payloads", delivery headers;
    go-gitea/gitea services/webhook/deliver.go). Decoded by the standard library's form
    decoder; raises PayloadError when the body is not a form with exactly one `payload`."""
    if not isinstance(body, bytes | bytearray):
        raise PayloadError(f"body is not bytes but {type(body).__name__}")
    try:
        # Latin-1 maps each byte to one character and back, so the field's bytes come out
        # exactly as the sender percent-encoded them (they may not be valid UTF-8).
        fields = urllib.parse.parse_qs(
            bytes(body).decode("latin-1"),
            keep_blank_values=True,
            strict_parsing=True,
            encoding="latin-1",
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except ValueError as exc:
        raise PayloadError(f"form body is not application/x-www-form-urlencoded: {exc}") from None
    values = fields.get("payload", [])
    if len(values) != 1:
        found = "no 'payload' field" if not values else f"{len(values)} 'payload' fields"
        raise PayloadError(f"form body has {found} (expected the JSON in one 'payload' field)")
    return values[0].encode("latin-1")


def json_bytes(headers: Mapping[str, str], body: bytes) -> bytes:
    """The delivery's JSON: the raw body, or a form body's `payload` field."""
    return form_payload(body) if is_form(headers) else body


def provider_from_headers(headers: Mapping[str, str]) -> str:
    """Name the provider from headers alone; "bitbucket" when only the body can tell which one."""
    h = lower_headers(headers)
    # Forgejo sends Gitea's and GitHub's headers too, and Gitea sends GitHub's: most specific first.
    if any(k in h for k in ("x-forgejo-event", "x-forgejo-signature", "x-forgejo-delivery")):
        return "forgejo"
    if any(k in h for k in ("x-gitea-event", "x-gitea-signature", "x-gitea-delivery")):
        return "gitea"
    if "x-github-event" in h:
        return "github"
    if "x-gitlab-event" in h or "x-gitlab-token" in h:
        return "gitlab"
    if "x-event-key" in h:
        return _bitbucket_flavour(h)
    if "x-pipeline-signature" in h or "x-pipeline-event" in h:
        return "generic"
    raise PayloadError(
        "unknown webhook provider: expected one of X-GitHub-Event, X-Gitlab-Event, "
        "X-Gitea-Event, X-Forgejo-Event, X-Event-Key, X-Pipeline-Signature"
    )


def _bitbucket_flavour(h: Mapping[str, str]) -> str:
    if "x-request-uuid" in h or "x-hook-uuid" in h:
        return "bitbucket-cloud"
    key = h.get("x-event-key", "").strip()
    if key.startswith(_BB_SERVER_KEYS) or key.startswith(_BB_SERVER_PREFIXES):
        return "bitbucket-server"
    if key in _BB_CLOUD_KEYS or key.startswith(_BB_CLOUD_PREFIXES):
        return "bitbucket-cloud"
    # Checked after the event key: proxies add X-Request-Id to anything they forward.
    if "x-request-id" in h:
        return "bitbucket-server"
    return "bitbucket"


def bitbucket_flavour_from_payload(data: Mapping[str, Any]) -> str:
    """Tell Bitbucket Cloud (`push.changes`) from Server (`changes`, `eventKey`) by body shape."""
    if isinstance(data.get("push"), dict):
        return "bitbucket-cloud"
    if "changes" in data or "eventKey" in data or "test" in data:
        return "bitbucket-server"
    raise PayloadError(
        "X-Event-Key: cannot tell Bitbucket Cloud from Bitbucket Server "
        "(no X-Request-UUID, X-Hook-UUID or X-Request-Id, and an unknown payload shape)",
        header="X-Event-Key",
    )


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: str | None,
    *,
    now: float | None = None,
    max_age: float = 300,
) -> None:
    """Raise SignatureError unless the request is signed with `secret` as its provider does it.

    The signed bytes are the raw body as sent (a GitHub form body included), except for a
    Gitea or Forgejo form delivery, signed over its `payload` field's JSON. `secret=None`
    means none is configured: the request is accepted unchecked. `now` (Unix
    seconds, default the current time) and `max_age` bound GitLab's signed-form timestamp.
    """
    h = lower_headers(headers)
    provider = provider_from_headers(h)
    if secret is None:
        return
    if secret == "":
        # An empty HMAC key is one anybody can use: a configuration mistake, not a request's.
        raise ValueError("webhook secret is empty: configure a secret or pass None")
    if not isinstance(body, bytes | bytearray):
        raise PayloadError(f"body is not bytes but {type(body).__name__}")
    if provider == "gitlab":
        _verify_gitlab(h, bytes(body), secret, now=now, max_age=max_age)
        return
    family = "bitbucket" if provider.startswith("bitbucket") else provider
    signed = bytes(body)
    if family in ("gitea", "forgejo") and is_form(h):
        # Gitea (and Forgejo after it) signs the JSON it puts in the form, not the form body;
        # GitHub signs the form body exactly as sent (README of tests/fixtures/webhooks).
        signed = form_payload(signed)
    _verify_hex(h, signed, secret, _HEX_SIGNATURES[family])


def sign(body: bytes, secret: str) -> str:
    """Return the lowercase hex HMAC-SHA256 of body, as GitHub, Gitea and Bitbucket compute it."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _verify_hex(
    h: Mapping[str, str], body: bytes, secret: str, candidates: tuple[tuple[str, str], ...]
) -> None:
    expected = sign(body, secret).encode()
    checked = 0
    # Every signature header present must match: they carry the same value from a real sender.
    for name, prefix in candidates:
        value = h.get(name.lower(), "").strip()
        # Gitea and Forgejo without a secret send these headers empty or as a bare prefix.
        if not value or value.lower() == prefix:
            continue
        if prefix:
            if not value.lower().startswith(prefix):
                scheme = value.split("=", 1)[0] if "=" in value else "no prefix"
                raise SignatureError(
                    f"{name}: expected '{prefix}<hex HMAC-SHA256>', got {scheme[:16]!r}",
                    header=name,
                )
            value = value[len(prefix) :]
        provided = value.strip().lower().encode("utf-8", "replace")
        if not hmac.compare_digest(expected, provided):
            raise SignatureError(f"{name}: signature does not match", header=name)
        checked += 1
    if not checked:
        names = ", ".join(name for name, _ in candidates)
        raise SignatureError(f"missing signature: expected one of {names}", header=candidates[0][0])


def _verify_gitlab(
    h: Mapping[str, str], body: bytes, secret: str, *, now: float | None, max_age: float
) -> None:
    # The signed form, when sent, decides on its own: it is the one that resists replay, so a
    # matching plain token must not rescue a stale or mismatched signature.
    if h.get("webhook-signature", "").strip():
        _verify_standard_webhook(h, body, secret, now=now, max_age=max_age)
        return
    token = h.get("x-gitlab-token")
    if not token:
        raise SignatureError(
            "missing signature: expected one of X-Gitlab-Token, webhook-signature",
            header="X-Gitlab-Token",
        )
    if not hmac.compare_digest(token.encode("utf-8", "replace"), secret.encode()):
        raise SignatureError("X-Gitlab-Token: token does not match", header="X-Gitlab-Token")


def _signing_keys(secret: str) -> list[bytes]:
    keys = [secret.encode()]
    # Standard Webhooks secrets look like "whsec_<base64>" and the key is the decoded bytes;
    # GitLab's signing tokens follow that form. Accept both readings of the same secret.
    if secret.startswith("whsec_"):
        with contextlib.suppress(binascii.Error, ValueError):
            keys.append(base64.b64decode(secret[len("whsec_") :], validate=True))
    return keys


def _verify_standard_webhook(
    h: Mapping[str, str], body: bytes, secret: str, *, now: float | None, max_age: float
) -> None:
    msg_id = h.get("webhook-id", "").strip()
    stamp = h.get("webhook-timestamp", "").strip()
    if not msg_id:
        raise SignatureError(
            "webhook-id: missing (it is part of the signed text)", header="webhook-id"
        )
    if not stamp:
        raise SignatureError(
            "webhook-timestamp: missing (it is part of the signed text)", header="webhook-timestamp"
        )
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= _MAX_TIMESTAMP_DIGITS):
        raise SignatureError(
            f"webhook-timestamp: not Unix seconds: {stamp[:32]!r}", header="webhook-timestamp"
        )
    current = time.time() if now is None else now
    skew = current - int(stamp)
    if abs(skew) > max_age:
        when = "old" if skew > 0 else "in the future"
        raise SignatureError(
            f"webhook-timestamp: {stamp} is {abs(skew):.0f}s {when} (allowed {max_age:.0f}s)",
            header="webhook-timestamp",
        )
    signed = msg_id.encode() + b"." + stamp.encode() + b"." + body
    expected = [
        base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
        for key in _signing_keys(secret)
    ]
    matched = False
    # Several space-separated "v1,<base64>" entries may be sent (key rotation); any one passes.
    for entry in h.get("webhook-signature", "").split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        provided = value.encode("utf-8", "replace")
        for digest in expected:
            matched |= hmac.compare_digest(digest, provided)
    if not matched:
        raise SignatureError(
            "webhook-signature: signature does not match", header="webhook-signature"
        )
