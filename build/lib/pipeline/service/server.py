"""The HTTP server of `pipeline serve`: webhooks in, health, metrics and the /api routes out.

A webhook is acknowledged (202) only after its event is committed to the queue; deciding what a
delivery means is the pure `decide`. Nothing here runs a deploy: routes only queue and wake the
worker. Every answer is redacted, and no exception leaves as a traceback.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config.load import read_secret
from pipeline.config.model import RepoSection
from pipeline.redact import redact
from pipeline.service import metrics
from pipeline.service.api import (
    Refused,
    ServerContext,
    api_router,
    error,
    read_capped,
    reply,
    wake,
)
from pipeline.sources.webhooks.identity import same_repository
from pipeline.sources.webhooks.verify import PushEvent, WebhookError, verify_and_parse

__all__ = ["HookDecision", "RunningServer", "ServerContext", "create_app", "decide", "start"]

log = structlog.get_logger(__name__)

DEFAULT_PORT = 8700


@dataclass(frozen=True)
class HookDecision:
    """What one authenticated delivery asks of a repo: "pong", "ignore" or "queue" an event."""

    action: str
    reason: str = ""
    kind: str | None = None
    ref: str | None = None
    sha: str | None = None
    provider: str | None = None
    before: str | None = None


def _short(ref: str | None) -> str:
    ref = ref or ""
    for prefix in ("refs/heads/", "refs/tags/"):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


def _why_not(repo: RepoSection, event: PushEvent) -> str | None:
    """None when `repo` follows what `event` announces, else why it is ignored: another
    repository's (an organisation or system hook sends every repository's), another branch,
    a tag it does not follow, or not a ref change at all."""
    branch = repo.branch or "main"
    name = _short(event.ref)
    if event.kind in ("push", "tag") and (
        same_repository(repo.url, repo.webhook_repository, event.repository) is False
    ):
        return f"{'release' if event.release else 'push'} of {event.repository[0]}"
    if event.kind == "push":
        if repo.tags:
            return f"branch {name!r} pushed, but the repo follows tags {repo.tags!r}"
        if name != branch:
            return f"branch {name!r} is not the followed branch {branch!r}"
        return None
    if event.kind == "tag":
        if not repo.tags:
            what = "released" if event.release else "pushed"
            return f"tag {name!r} {what}, but the repo follows branch {branch!r}"
        if not fnmatchcase(name, repo.tags):
            return f"tag {name!r} does not match {repo.tags!r}"
        return None
    return event.reason or f"event kind {event.kind!r} is not a push"


def decide(repo: RepoSection, events: Sequence[PushEvent]) -> HookDecision:
    """Decide what a delivery's events mean for `repo`: the last followed ref change is queued.

    One delivery can announce several ref changes (Bitbucket); they would coalesce in the queue
    anyway, so only the newest one the repo follows is kept. A delivery naming another
    repository than the repo's (`identity.same_repository`) is ignored: "push of OWNER/NAME".
    """
    if any(e.kind == "ping" for e in events):
        return HookDecision("pong")
    reasons: list[str] = []
    chosen: PushEvent | None = None
    for event in events:
        why = _why_not(repo, event)
        if why is None:
            chosen = event
        elif why not in reasons:
            reasons.append(why)
    if chosen is None:
        return HookDecision("ignore", "; ".join(reasons) or "no ref change")
    return HookDecision(
        "queue",
        kind=chosen.kind,
        ref=chosen.ref,
        sha=chosen.after,
        provider=chosen.provider,
        before=chosen.before,
    )


class _InternalErrors:
    """Turn any exception a route lets escape into a logged, redacted 500 without a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error(
                "request failed",
                method=scope.get("method"),
                path=scope.get("path"),
                error=redact(f"{type(exc).__name__}: {exc}"),
                traceback=redact(traceback.format_exc()),
            )
            if not started:  # else the server closes the half-sent answer's connection
                await error(500, "internal error")(scope, receive, send)


@dataclass
class _HookState:
    warned_unsigned: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def warn_unsigned_once(self, repo: str) -> None:
        with self.lock:
            if repo in self.warned_unsigned:
                return
            self.warned_unsigned.add(repo)
        log.warning(
            "webhooks of this repo are accepted unsigned: set webhook_secret_env",
            repo=repo,
        )


def _deliver(
    ctx: ServerContext,
    repo_name: str,
    repo: RepoSection,
    headers: dict[str, str],
    body: bytes,
    secret: str | None,
) -> tuple[int, dict[str, Any]]:
    """Authenticate, decide and queue one delivery (blocking: runs in the thread pool)."""
    try:
        events = verify_and_parse(headers, body, secret)
    except WebhookError as exc:
        log.warning("webhook refused", repo=repo_name, status=exc.status, error=str(exc))
        return exc.status, {"error": str(exc)}
    decision = decide(repo, events)
    delivery_id = events[0].delivery_id if events else None
    if decision.action == "pong":
        log.info("webhook ping", repo=repo_name, delivery_id=delivery_id)
        return 200, {"status": "pong"}
    if decision.action == "ignore":
        log.info("webhook ignored", repo=repo_name, reason=decision.reason, delivery_id=delivery_id)
        return 200, {"status": "ignored", "reason": decision.reason}
    assert decision.kind is not None
    payload = {"provider": decision.provider, "before": decision.before, "after": decision.sha}
    event_id, created = ctx.queue.put(
        source="webhook",
        kind=decision.kind,
        repo=repo_name,
        ref=decision.ref,
        sha=decision.sha,
        delivery_id=delivery_id,
        payload=json.dumps(payload),
    )
    if not created:
        log.info("webhook duplicate", repo=repo_name, event_id=event_id, delivery_id=delivery_id)
        return 200, {"status": "duplicate", "event_id": event_id}
    log.info(
        "webhook queued",
        repo=repo_name,
        event_id=event_id,
        kind=decision.kind,
        ref=decision.ref,
        revision=decision.sha,
        delivery_id=delivery_id,
    )
    return 202, {"status": "queued", "event_id": event_id}


def create_app(ctx: ServerContext) -> FastAPI:
    """The FastAPI application of `pipeline serve`, bound to `ctx`."""
    app = FastAPI(
        title="pipeline",
        summary="GitOps deployments for Docker hosts: webhooks, status, runs and metrics.",
        # /metrics is the service's telemetry; FastAPI's own OpenTelemetry hooks cost time on
        # every request (the webhook acknowledgement path) and would export nothing by default.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.add_middleware(_InternalErrors)
    hooks = _HookState()

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> Response:
        # The /api routes' token check (api._authorize) answers through this.
        return exc.answer

    @app.post(
        "/hooks/{repo}",
        status_code=202,
        tags=["webhooks"],
        summary="Receive a push webhook (GitHub, GitLab, Gitea, Forgejo, Bitbucket, generic)",
    )
    async def hook(repo: str, request: Request) -> JSONResponse:
        loaded = ctx.loaded()
        repo_cfg = loaded.model.repos.get(repo)
        if repo_cfg is None:
            # Not transient: a 4xx/5xx would only make the provider retry for nothing.
            log.info("webhook for an unknown repo ignored", repo=repo)
            return reply(200, {"status": "ignored", "reason": f"unknown repo {repo!r}"})
        body = await read_capped(request, loaded.model.server.max_body)
        if isinstance(body, JSONResponse):
            return body
        env = repo_cfg.webhook_secret_env
        secret = read_secret_env(env)
        if env and not secret:
            log.error("webhook secret unavailable", repo=repo, env=env)
            return error(
                503,
                f"repos.{repo}.webhook_secret_env: environment variable {env} is not set",
            )
        if not env:
            hooks.warn_unsigned_once(repo)
        status, data = await run_in_threadpool(
            _deliver, ctx, repo, repo_cfg, dict(request.headers), body, secret
        )
        if status == 202:
            wake(ctx)
        return reply(status, data)

    @app.get("/healthz", tags=["service"], summary="Liveness, with the queue depth")
    def healthz() -> JSONResponse:
        return reply(200, {"ok": True, "queue_depth": ctx.queue.depth()})

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics")
    def prometheus() -> Response:
        return Response(metrics.render(ctx.state), media_type=metrics.CONTENT_TYPE)

    app.include_router(api_router(ctx))
    return app


def read_secret_env(env: str | None) -> str | None:
    """The webhook secret from the environment variable `env` (None when unset or empty)."""
    return (read_secret(env) or None) if env else None


# -- running it ------------------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    """`[server] listen` ("HOST" or "HOST:PORT") as (host, port)."""
    host, _, port = listen.rpartition(":")
    if not host:
        return listen, DEFAULT_PORT
    return host, int(port)


@dataclass
class RunningServer:
    """uvicorn serving an app from a thread; `stop` ends it and waits."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start(app: FastAPI, listen: str, *, ready_timeout: float = 10.0) -> RunningServer:
    """Serve `app` on `listen` (port 0 picks a free one) from a daemon thread; return once it
    accepts connections. uvicorn installs no signal handlers off the main thread."""
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it keep-alive answers wait ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"[server] listen {listen}: cannot bind: {exc.strerror or exc}") from None
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", backlog=1024)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="pipeline-http", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"HTTP server on {host}:{port} did not start")
        time.sleep(0.01)
    return RunningServer(server=server, thread=thread, host=host, port=port)
