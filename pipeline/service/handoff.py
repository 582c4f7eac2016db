"""How a command hands its work to a running `pipeline serve`: the service writes where it
listens and a token into `DATA_DIR/serve.json` (mode 0600, like the state database beside it);
`pipeline rollback` reads it and asks the service to roll back now, so that the rollback costs
one HTTP request to a process whose modules, database and engine connections are already up,
not a Python start-up (about 1 s of imports) and new connections. This is the `argocd app
rollback` shape: the CLI is a client of the running instance.

Standard library only: the CLI imports this module before it decides whether to load the
deploy machinery at all.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HANDOFF_FILE = "serve.json"
# Connecting to a live service on this machine takes well under a millisecond; a service that
# does not accept within this is treated as absent and the command runs in its own process.
CONNECT_TIMEOUT = 2.0  # seconds
# A live service answers /healthz in milliseconds; one that does not within this (stopped,
# hung, or another program on its port) is not handed the work.
READY_TIMEOUT = 1.0  # seconds


class Stopping(RuntimeError):
    """The service refused a handed rollback because it is stopping: nothing was done."""


class HandoffLost(Exception):
    """The service took the request and the connection broke before it answered: whether the
    work was done is unknown (`pipeline history` tells), so it must not be done again here."""


@dataclass(frozen=True)
class Handoff:
    """A running service as `serve.json` describes it: `url` ("http://HOST:PORT", a loopback
    address when it listens on every address), its `pid`, the `config` file it follows
    (absolute) and the `token` its API takes in place of `[server] api_token_env`'s."""

    url: str
    pid: int
    config: str
    token: str


def _connect_host(host: str) -> str:
    # A service listening on every address is reached here through loopback.
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def describe(host: str, port: int, config: Path) -> Handoff:
    """The handoff of this process's service listening on `host`:`port` and following
    `config`, with a new random token."""
    host = _connect_host(host)
    shown = f"[{host}]" if ":" in host else host
    return Handoff(
        url=f"http://{shown}:{port}",
        pid=os.getpid(),
        config=str(config.resolve()),
        token=secrets.token_urlsafe(32),
    )


def publish(data_dir: Path, handoff: Handoff) -> None:
    """Write `handoff` to `data_dir/serve.json`, created 0600 and replaced atomically (a reader
    never sees half of it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".serve.", suffix=".json")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(handoff.__dict__, out)
        os.replace(tmp, data_dir / HANDOFF_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def withdraw(data_dir: Path, handoff: Handoff) -> None:
    """Remove `data_dir/serve.json` if it is still `handoff`'s (another service on the same
    data directory may have replaced it since)."""
    current = _read(data_dir / HANDOFF_FILE)
    if current is not None and hmac.compare_digest(current.token, handoff.token):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / HANDOFF_FILE).unlink()


def _read(path: Path) -> Handoff | None:
    try:
        raw = json.loads(path.read_text())
        return Handoff(
            url=str(raw["url"]), pid=int(raw["pid"]), config=str(raw["config"]),
            token=str(raw["token"]),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, unreadable (another user's service) or not ours: no handoff


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find(data_dir: Path, config: Path) -> Handoff | None:
    """The running service of `data_dir` that follows the same `config` file, or None: no
    `serve.json`, one left by a process that is gone, or a service following another file (its
    config may differ from the one this command was given)."""
    handoff = _read(data_dir / HANDOFF_FILE)
    if handoff is None or handoff.config != str(config.resolve()) or not _alive(handoff.pid):
        return None
    return handoff


@dataclass
class Answer:
    """The service's answer: its HTTP `status` and `documents`, the JSON documents of the body
    as they arrive (one per line of an NDJSON stream; the one document of a JSON body).
    Iterating raises HandoffLost when the connection breaks; the connection is closed once the
    documents are read (or `close()`)."""

    status: int
    documents: Iterator[dict[str, Any]]

    def close(self) -> None:
        """Close the connection without reading the rest."""
        close = getattr(self.documents, "close", None)
        if close is not None:
            close()


def _ready(conn: http.client.HTTPConnection) -> bool:
    """Whether a pipeline service answers `GET /healthz` on `conn` within READY_TIMEOUT: a
    process that is stopped (SIGSTOP) or hung still has its port accepting connections, and
    another program may have its port now; neither must be handed anything."""
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        answer = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):
        return False
    return response.status == 200 and isinstance(answer, dict) and answer.get("ok") is True


def post(handoff: Handoff, path: str, body: dict[str, Any]) -> Answer | None:
    """POST `body` as JSON to the service's `path` with its token and return its answer, or
    None when no pipeline service is ready there (no connection within CONNECT_TIMEOUT, or no
    `/healthz` answer within READY_TIMEOUT: nothing was sent, and the caller may do the work
    itself). Once sent, the answer is waited for as long as the work takes.

    Raises HandoffLost when the connection broke after the request was sent."""
    host, _, port = handoff.url.removeprefix("http://").rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=CONNECT_TIMEOUT)
    try:
        conn.connect()
    except OSError:
        return None
    try:
        assert conn.sock is not None
        conn.sock.settimeout(READY_TIMEOUT)
        if not _ready(conn):
            conn.close()
            return None
        conn.sock.settimeout(None)  # a rollback waits for health checks: as long as it takes
        headers = {
            "Authorization": f"Bearer {handoff.token}",
            "Content-Type": "application/json",
        }
        conn.request("POST", path, json.dumps(body).encode(), headers)
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise HandoffLost(f"{type(exc).__name__}: {exc}") from exc
    return Answer(response.status, _documents(conn, response))


def _documents(
    conn: http.client.HTTPConnection, response: http.client.HTTPResponse
) -> Iterator[dict[str, Any]]:
    try:
        lines = 0
        while True:
            try:
                line = response.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise HandoffLost(f"{type(exc).__name__}: {exc}") from exc
            if not line:
                if lines == 0:
                    yield {}
                return
            lines += 1
            try:
                document = json.loads(line)
            except ValueError:
                document = {"error": line[:200].decode(errors="replace").strip()}
            yield document if isinstance(document, dict) else {"answer": document}
    finally:
        conn.close()
