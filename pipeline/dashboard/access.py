"""Who may see and do what on the dashboard: the login (the API token or a password), the signed
session cookie, and the CSRF token every action form carries.

The session is a cookie signed with a key made when the server starts (itsdangerous, which
Starlette brings): a restart logs everyone out, and nothing about a session is stored. The
cookie holds only a random CSRF token; it is `HttpOnly` and `SameSite=Strict` (so another
site's form cannot send it), and every action also checks the form's CSRF token against it
(the OWASP "synchronizer token" pattern, bound to the session).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from pipeline.config.load import read_secret
from pipeline.config.model import ServerSection

COOKIE = "pipeline_session"
SESSION_MAX_AGE = 12 * 3600  # seconds: a working day's release watch, then log in again
# scrypt's cost as werkzeug's `generate_password_hash` sets it (N=2**15, r=8, p=1).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 32768, 8, 1


def hash_password(password: str, salt: str | None = None) -> str:
    """A `[server] password_hash` value for `password`: "scrypt:N:r:p$SALT$HEX", the format of
    werkzeug.security's `generate_password_hash` (RFC 7914 scrypt, 64-byte key), so either tool
    can make it."""
    salt = salt or secrets.token_urlsafe(12)
    key = hashlib.scrypt(
        password.encode(),
        salt=salt.encode(),
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=132 * _SCRYPT_N * _SCRYPT_R * _SCRYPT_P,
    )
    return f"scrypt:{_SCRYPT_N}:{_SCRYPT_R}:{_SCRYPT_P}${salt}${key.hex()}"


def check_password(stored: str, password: str) -> bool:
    """Whether `password` matches `stored` (a `hash_password` value); False for any malformed
    value. The comparison takes constant time (hmac.compare_digest)."""
    try:
        method, salt, expected = stored.split("$", 2)
        name, n, r, p = method.split(":")
        if name != "scrypt":
            return False
        key = hashlib.scrypt(
            password.encode(),
            salt=salt.encode(),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=132 * int(n) * int(r) * int(p),
            dklen=len(expected) // 2,
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(key.hex(), expected)


def login_configured(server: ServerSection) -> bool:
    """Whether any login can succeed: an API token is set or a password hash configured."""
    return bool(server.password_hash) or bool(
        server.api_token_env and read_secret(server.api_token_env)
    )


def check_login(server: ServerSection, secret: str) -> bool:
    """Whether `secret` is the API token (from `[server] api_token_env`) or the password whose
    hash is `[server] password_hash`. Both compared in constant time."""
    if not secret:
        return False
    token = read_secret(server.api_token_env) if server.api_token_env else None
    if token and hmac.compare_digest(secret.strip().encode(), token.encode()):
        return True
    return bool(server.password_hash) and check_password(server.password_hash or "", secret)


@dataclass(frozen=True)
class Session:
    """A logged-in viewer; `csrf` is the token their action forms must send back."""

    csrf: str


class Sessions:
    """Signs and reads session cookies with a key of this server process."""

    def __init__(self, key: str | None = None) -> None:
        self._signer = URLSafeTimedSerializer(key or secrets.token_hex(32), salt="dashboard")

    def new(self) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(csrf=secrets.token_urlsafe(24))
        return session, self._signer.dumps({"csrf": session.csrf})

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie carries; None when absent, forged or older than
        SESSION_MAX_AGE."""
        if not cookie:
            return None
        try:
            data = self._signer.loads(cookie, max_age=SESSION_MAX_AGE)
        except BadSignature:  # SignatureExpired is one too
            return None
        csrf = data.get("csrf") if isinstance(data, dict) else None
        return Session(csrf=csrf) if isinstance(csrf, str) and csrf else None


def csrf_ok(session: Session | None, sent: str | None) -> bool:
    """Whether an action's form token `sent` is its session's (constant time)."""
    if session is None or not sent:
        return False
    return hmac.compare_digest(session.csrf.encode(), sent.encode())
