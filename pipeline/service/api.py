"""The `/api` routes of `pipeline serve`, and what every route shares: the context, redacted JSON
answers, a capped body reader and bearer-token checks.

Writes (deploy, rollback) always need the token named by `[server] api_token_env` and only queue
an event for the worker. Reads (status, runs, history, events) need it too when
`[server] read_token_required` (by default: when the server listens beyond loopback). One
router-wide dependency checks both, before a route reads anything.
"""

from __future__ import annotations

import hmac
import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from pipeline.config.load import LoadedConfig, read_secret
from pipeline.redact import redact_value
from pipeline.service.handoff import Stopping
from pipeline.state.queue import REVISION_PATTERN, EventQueue, RequestError, queue_request
from pipeline.state.store import State, release_json, run_json, step_json

log = structlog.get_logger(__name__)

_REVISION = REVISION_PATTERN
_API_BODY_MAX = 16 * 1024


@dataclass
class ServerContext:
    """What the HTTP server needs from the service; `loaded` is called on every request because
    the service reloads the config live."""

    loaded: Callable[[], LoadedConfig]
    state: State
    queue: EventQueue
    status: Callable[[], list[dict[str, Any]]]
    wake: Callable[[], None]
    started_at: float
    # The `[server] listen` the HTTP server was started on: a reload that changes `listen` only
    # takes effect on restart, so whether reads need the token follows this one. None: the
    # live config's.
    listen: str | None = None
    # What the dashboard reads besides the records (the daemon provides them; None: not shown):
    # each repo's followed head, a commit's subject line, the planner's output now, and
    # whether commit `old` is an ancestor of `new` in a repo (`ancestor(repo, old, new)`).
    repos: Callable[[], list[dict[str, Any]]] | None = None
    subject: Callable[[str, str], str | None] | None = None
    plan: Callable[[], dict[str, Any]] | None = None
    ancestor: Callable[[str, str, str], bool | None] | None = None
    # Rolls a service back now and answers how it went (`Service.rollback_now`); None: only
    # queued rollbacks.
    rollback_now: Callable[[str, str | None, Callable[[str], None]], dict[str, Any]] | None = None
    # The token of `DATA_DIR/serve.json` (`pipeline.service.handoff`): taken in place of the API
    # token, so a command on this machine that can read the data directory can hand over.
    local_token: str | None = None


def reply(status: int, data: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON answer with every string in it redacted."""
    return JSONResponse(redact_value(data), status_code=status, headers=headers)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return reply(status, {"error": message}, headers)


async def read_capped(request: Request, cap: int) -> bytes | JSONResponse:
    """The raw body, or a 413 answer as soon as Content-Length or the bytes received pass `cap`.

    Reading stops at the cap, so an oversized body is never held in memory whole.
    """
    too_big = error(
        413,
        f"request body is larger than [server] max_body ({cap} bytes)",
        # The rest of the body is left unread: the connection cannot be reused.
        {"Connection": "close"},
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            return error(400, f"Content-Length: not a number: {declared[:40]!r}")
        if int(declared) > cap:
            return too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return too_big
        chunks.append(chunk)
    return b"".join(chunks)


def wake(ctx: ServerContext) -> None:
    """Nudge the worker; the event is already stored, so a failure here only delays it."""
    try:
        ctx.wake()
    except Exception as exc:  # a broken nudge must not turn an accepted event into a 500
        log.warning("could not wake the worker", error=f"{type(exc).__name__}: {exc}")


class DeployRequest(BaseModel):
    """Deploy a service, at `revision` (a commit or ref) or at the followed branch's head."""

    model_config = ConfigDict(extra="forbid")
    revision: str | None = Field(default=None, pattern=_REVISION)


class RollbackRequest(BaseModel):
    """Roll a service back, image and settings, to the release before the current one, or to
    `to`: `r42` (or `42`) is release 42, anything else a revision prefix; it stays pinned there
    until a newer commit or a deploy."""

    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(
        default=None,
        pattern=_REVISION,
        description="release id (r42 or 42) or revision prefix; default: the previous release",
    )
    wait: bool = Field(
        default=False,
        description="roll back now, streaming its progress lines and outcome (200, NDJSON), "
        "instead of queueing it (202)",
    )


class RebuildRequest(BaseModel):
    """Rebuild an image now, pulling its base image fresh (what its `rebuild` schedule does)."""

    model_config = ConfigDict(extra="forbid")


class Refused(Exception):
    """A request refused before its route ran; `answer` is what the client gets (the server
    registers the handler that sends it)."""

    def __init__(self, answer: JSONResponse) -> None:
        super().__init__(answer.status_code)
        self.answer = answer


# Parses `Authorization: Bearer TOKEN` (None when absent or another scheme) and describes the
# scheme in the OpenAPI document, so /docs offers to send the token.
_bearer = HTTPBearer(
    auto_error=False,
    description="the token from the environment variable named by [server] api_token_env",
)
# RFC 6750 section 3: no error code when the request carried no token, invalid_token when it
# carried a wrong one.
_CHALLENGE = 'Bearer realm="pipeline"'
_CHALLENGE_INVALID = _CHALLENGE + ', error="invalid_token"'


def _token_refusal(
    loaded: LoadedConfig,
    credentials: HTTPAuthorizationCredentials | None,
    what: str,
    local_token: str | None = None,
) -> JSONResponse | None:
    """None when `credentials` carry the API token or `local_token` (`ServerContext`); else the
    403 (no token configured) or 401 answer. `what` ("read" or "write") names the endpoints in
    the message."""
    if (
        local_token
        and credentials is not None
        and hmac.compare_digest(credentials.credentials.strip().encode(), local_token.encode())
    ):
        return None
    env = loaded.model.server.api_token_env
    if env is None:
        return error(403, f"the API's {what} endpoints are disabled: set [server] api_token_env")
    token = read_secret(env)
    if not token:
        return error(
            403,
            f"the API's {what} endpoints are disabled: environment variable {env} "
            "(named by [server] api_token_env) is not set",
        )
    if credentials is None:
        return error(
            401,
            f"the API's {what} endpoints need Authorization: 'Bearer <token>' with the token "
            "from [server] api_token_env",
            {"WWW-Authenticate": _CHALLENGE},
        )
    # compare_digest on bytes: constant time whatever the token, even non-ASCII ones.
    if not hmac.compare_digest(credentials.credentials.strip().encode(), token.encode()):
        return error(
            401,
            "Authorization: the bearer token is not the one from [server] api_token_env",
            {"WWW-Authenticate": _CHALLENGE_INVALID},
        )
    return None


def _authorize(ctx: ServerContext) -> Callable[..., Any]:
    """The dependency every /api route runs first: writes need the API token; reads (GET, HEAD)
    need it when `[server] read_token_required` (see `ServerSection.reads_need_token`).

    Raises Refused with the 401/403 answer."""

    async def authorize(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        loaded = ctx.loaded()
        if request.method in ("GET", "HEAD"):
            if not loaded.model.server.reads_need_token(ctx.listen):
                return
            what = "read"
        else:
            what = "write"
        refused = _token_refusal(loaded, credentials, what, ctx.local_token)
        if refused is not None:
            raise Refused(refused)

    return authorize


def _body_model(raw: bytes, model: type[BaseModel]) -> BaseModel | JSONResponse:
    if not raw.strip():
        return model()
    try:
        return model.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) if first else "body"
        what = first["msg"] if first else f"not JSON: {exc}"
        return error(400, f"{where}: {what}")


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    # The body is read by hand (capped, after the token check), so describe it for /docs here.
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def _rolled_back(
    rollback_now: Callable[[str, str | None, Callable[[str], None]], dict[str, Any]],
    service: str,
    to: str | None,
) -> Response:
    """Roll `service` back now on a thread of its own and answer as it goes: 200 and an NDJSON
    stream (`application/x-ndjson`), one `{"line": TEXT}` per progress line as it comes, then
    `{"done": ANSWER}` (`Service.rollback_now`'s answer); 503 when the service is stopping.
    A client that goes away ends its stream, not the rollback."""
    documents: queue.Queue[dict[str, Any]] = queue.Queue()

    def work() -> None:
        try:
            done = rollback_now(service, to, lambda line: documents.put({"line": line}))
            documents.put({"done": done})
        except Stopping as exc:
            documents.put({"stopping": str(exc)})
        except Exception as exc:  # the client is told; the service goes on
            log.error("rollback.failed", service=service, error=f"{type(exc).__name__}: {exc}")
            documents.put({"done": {"service": service, "ok": False, "refused": False,
                                    "error": f"{type(exc).__name__}: {exc}"}})  # fmt: skip

    threading.Thread(target=work, name=f"rollback-{service}", daemon=True).start()
    first = await run_in_threadpool(documents.get)
    if "stopping" in first:
        return error(503, first["stopping"])

    def stream() -> Iterator[bytes]:
        document = first
        while True:
            yield json.dumps(redact_value(document)).encode() + b"\n"
            if "done" in document:
                return
            document = documents.get()

    return StreamingResponse(stream(), media_type="application/x-ndjson")


def api_router(ctx: ServerContext) -> APIRouter:
    """The /api routes bound to `ctx`."""
    router = APIRouter(prefix="/api", tags=["api"], dependencies=[Depends(_authorize(ctx))])

    @router.get("/status", summary="What runs where, as `pipeline status --json`")
    def status() -> JSONResponse:
        return reply(200, ctx.status())

    @router.get("/runs", summary="Runs, newest first")
    def runs(limit: int = Query(50, ge=1, le=1000)) -> JSONResponse:
        return reply(200, [run_json(r) for r in ctx.state.runs(limit)])

    @router.get("/runs/{run_id}", summary="One run, its steps and the releases it made")
    def run(run_id: int) -> JSONResponse:
        found = ctx.state.run(run_id)
        if found is None:
            return error(404, f"no run with id {run_id}")
        steps = [step_json(s) for s in ctx.state.steps(run_id)]
        releases = [release_json(r) for r in ctx.state.releases(limit=1000, run_id=run_id)]
        return reply(200, {**run_json(found), "steps": steps, "releases": releases})

    @router.get("/history", summary="Releases, newest first, as `pipeline history --json`")
    def history(
        service: str | None = Query(None, max_length=128),
        limit: int = Query(50, ge=1, le=1000),
    ) -> JSONResponse:
        return reply(200, [release_json(r) for r in ctx.state.releases(service, limit)])

    @router.get("/events", summary="Queued and handled events, newest first")
    def events(limit: int = Query(50, ge=1, le=1000)) -> JSONResponse:
        return reply(200, ctx.queue.recent(limit))

    @router.get("/instances", summary="The instances sharing the state database")
    def instances() -> JSONResponse:
        """Every `pipeline serve` heard of in the last hour: owner (host:pid), url, started_at,
        heartbeat_at, heartbeat_age (seconds) and alive (heard within INSTANCE_TTL)."""
        return reply(200, ctx.state.cluster.instances())

    async def _read_body(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
        loaded = ctx.loaded()  # the token was checked by the router's dependency
        raw = await read_capped(request, min(_API_BODY_MAX, loaded.model.server.max_body))
        if isinstance(raw, JSONResponse):
            return raw
        return _body_model(raw, model)

    async def _queue_service_event(
        kind: str, service: str, request: Request, model: type[BaseModel], field: str | None
    ) -> JSONResponse:
        body = await _read_body(request, model)
        if isinstance(body, JSONResponse):
            return body
        return await _queue(kind, service, getattr(body, field) if field else None)

    async def _queue(kind: str, service: str, target: str | None) -> JSONResponse:
        loaded = ctx.loaded()
        try:
            event_id = await run_in_threadpool(
                queue_request, ctx.queue, loaded.model, kind, service, target, source="api"
            )
        except RequestError as exc:
            return error(404, str(exc))
        log.info("api event queued", kind=kind, service=service, revision=target, event_id=event_id)
        wake(ctx)
        return reply(202, {"status": "queued", "event_id": event_id})

    @router.post(
        "/deploy/{service}",
        status_code=202,
        summary="Queue a deploy of a service (bearer token)",
        openapi_extra=_openapi_body(DeployRequest),
    )
    async def deploy(service: str, request: Request) -> JSONResponse:
        return await _queue_service_event("deploy", service, request, DeployRequest, "revision")

    @router.post(
        "/rollback/{service}",
        status_code=202,
        summary="Queue a rollback of a service, or with `wait` do it now (bearer token)",
        openapi_extra=_openapi_body(RollbackRequest),
    )
    async def rollback(service: str, request: Request) -> Response:
        """202 and the queued event's id; with `"wait": true`, the rollback done now, streamed
        (`_rolled_back`); 404 for an unknown service, 503 when the service stops (nothing was
        done)."""
        body = await _read_body(request, RollbackRequest)
        if isinstance(body, JSONResponse):
            return body
        assert isinstance(body, RollbackRequest)
        if not body.wait or ctx.rollback_now is None:
            return await _queue("rollback", service, body.to)
        if service not in ctx.loaded().model.services:
            return error(404, f"unknown service {service!r}: not in [services]")
        return await _rolled_back(ctx.rollback_now, service, body.to)

    @router.post(
        "/rebuild/{image}",
        status_code=202,
        summary="Queue a rebuild of an image, its base pulled fresh (bearer token)",
        openapi_extra=_openapi_body(RebuildRequest),
    )
    async def rebuild(image: str, request: Request) -> JSONResponse:
        return await _queue_service_event("rebuild", image, request, RebuildRequest, None)

    return router
