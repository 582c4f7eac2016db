"""The dashboard's routes, served by `pipeline serve` at `/`: pages rendered from Jinja2
templates, a run's steps streamed live as Server-Sent Events, the login, and the actions
(deploy, rollback, rebuild) that queue the same events the API's routes queue.

Who may do what (`access`): actions always need a login and the session's CSRF token; read
pages need the login unless `[server] dashboard = "open"` and the server listens on loopback
(`ServerSection.dashboard_open`). The login's secret travels only in a POST body; no token is
ever put in a page, a URL or a log line.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from pipeline.dashboard import access, views
from pipeline.redact import redact
from pipeline.state.queue import REVISION_PATTERN, RequestError, queue_request

log = structlog.get_logger(__name__)

_HERE = Path(__file__).parent
STATIC = StaticFiles(directory=_HERE / "static")
_FORM_MAX = 16 * 1024  # bytes: a login or an action form
_LIVE_EVERY = 0.5  # seconds between two looks at a run's records for its live page
_LIVE_FOR = 300.0  # seconds a stream lasts; the browser's EventSource reconnects by itself
# No inline script or style, nothing from elsewhere: every page's assets are the package's own.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=_HERE / "templates")
    templates.env.filters["short"] = views.short
    templates.env.filters["words"] = views.words
    templates.env.filters["utc_text"] = views.utc_text
    # Every value a page prints is redacted, as every API answer is (`api.reply`): records are
    # redacted when stored, but an engine's error in a status row is not a record.
    # A macro's output (Markup) is left as it is: its own values were redacted as it rendered.
    templates.env.finalize = lambda value: (
        redact(value) if isinstance(value, str) and not isinstance(value, Markup) else value
    )
    return templates


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body, capped at _FORM_MAX bytes (larger: empty)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _FORM_MAX:
            return {}
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def dashboard_router(
    backend: views.Backend, closing: Callable[[], bool] = lambda: False
) -> APIRouter:
    """The dashboard's pages and actions bound to `backend` (the service's context); live
    streams end soon after `closing()` turns true (the server is stopping)."""
    router = APIRouter(include_in_schema=False)
    templates = _templates()
    sessions = access.Sessions()

    def server() -> Any:
        return backend.loaded().model.server

    def session_of(request: Request) -> access.Session | None:
        return sessions.read(request.cookies.get(access.COOKIE))

    def readable(request: Request) -> bool:
        return session_of(request) is not None or server().dashboard_open(backend.listen)

    def page(request: Request, name: str, status: int = 200, **data: Any) -> HTMLResponse:
        session = session_of(request)
        context = {"session": session, "csrf": session.csrf if session else "", **data}
        return templates.TemplateResponse(
            request, name, context, status_code=status, headers=_HEADERS
        )

    def to_login(request: Request) -> Response:
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    def guarded(
        render: Callable[[Request], Any],
    ) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if not readable(request):
                return to_login(request)
            result: Response = await render(request)
            return result

        return endpoint

    @router.get("/favicon.ico")
    def favicon() -> Response:
        """The pages link /static/favicon.svg; this answers what browsers and tools ask first."""
        return FileResponse(_HERE / "static" / "favicon.svg", media_type="image/svg+xml")

    # -- login ----------------------------------------------------------------------------
    @router.get("/login")
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return page(
            request, "login.html", next=_local(next), configured=access.login_configured(server())
        )

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        target = _local(form.get("next", "/"))
        cfg = server()
        if not await run_in_threadpool(access.check_login, cfg, form.get("secret", "")):
            log.warning("dashboard login refused", client=_client(request))
            return page(
                request,
                "login.html",
                401,
                next=target,
                configured=access.login_configured(cfg),
                refused=True,
            )
        _session, cookie = sessions.new()
        log.info("dashboard login", client=_client(request))
        answer = RedirectResponse(target, status_code=303)
        answer.set_cookie(
            access.COOKIE,
            cookie,
            max_age=access.SESSION_MAX_AGE,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return answer

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await _form(request)
        if not access.csrf_ok(session_of(request), form.get("csrf")):
            return page(request, "refused.html", 403, why="the form's CSRF token is not valid")
        answer = RedirectResponse("/", status_code=303)
        answer.delete_cookie(access.COOKIE, path="/", httponly=True, samesite="strict")
        return answer

    # -- read pages -----------------------------------------------------------------------
    async def overview_page(request: Request) -> Response:
        data = await run_in_threadpool(views.overview, backend)
        return page(request, "overview.html", o=data)

    async def run_page(request: Request) -> Response:
        which = request.path_params["run"]
        run_id = _resolve(which)
        view = await run_in_threadpool(views.run_view, backend.state, run_id) if run_id else None
        if which == "latest":
            return page(request, "run.html", live="latest", v=view)
        if view is None:
            return page(request, "refused.html", 404, why=f"no run with id {which}")
        return page(request, "run.html", live=str(view.run["id"]), v=view)

    async def run_steps(request: Request) -> Response:
        """A run's live part alone (what the stream sends), for a page without EventSource."""
        html, _ = await run_in_threadpool(_run_fragment, request.path_params["run"])
        return HTMLResponse(html, headers=_HEADERS)

    async def run_stream(request: Request) -> Response:
        which = request.path_params["run"]
        return StreamingResponse(
            _live(request, which),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def service_page(request: Request) -> Response:
        name = request.path_params["name"]
        view = await run_in_threadpool(views.service_view, backend, name)
        if view is None:
            return page(request, "refused.html", 404, why=f"unknown service {name!r}")
        return page(request, "service.html", s=view)

    async def plan_page(request: Request) -> Response:
        if backend.plan is None:
            return page(request, "plan.html", plan=None, error="the planner is not available")
        try:
            plan = await run_in_threadpool(backend.plan)
        except Exception as exc:  # a fetch that failed is the page's answer, not a 500
            return page(request, "plan.html", plan=None, error=redact(str(exc)))
        return page(request, "plan.html", plan=plan, error=None)

    router.add_api_route("/", guarded(overview_page), methods=["GET"])
    router.add_api_route("/runs/{run}", guarded(run_page), methods=["GET"])
    router.add_api_route("/runs/{run}/steps", guarded(run_steps), methods=["GET"])
    router.add_api_route("/runs/{run}/stream", guarded(run_stream), methods=["GET"])
    router.add_api_route("/services/{name}", guarded(service_page), methods=["GET"])
    router.add_api_route("/plan", guarded(plan_page), methods=["GET"])

    def _run_fragment(which: str) -> tuple[str, bool]:
        """The run's live part as HTML, and whether that run has finished."""
        run_id = _resolve(which)
        view = views.run_view(backend.state, run_id) if run_id is not None else None
        html = templates.get_template("_run.html").render(v=view)
        return html, view is not None and view.finished

    def _resolve(which: str) -> int | None:
        if which == "latest":
            runs = backend.state.runs(1)
            return runs[0].id if runs else None
        return int(which) if which.isdigit() else None

    async def _live(request: Request, which: str) -> AsyncIterator[str]:
        """Server-Sent Events (WHATWG HTML, "server-sent events"): the run's live part as an
        `update` event each time it changes, `done` once a given run has finished."""
        loop = asyncio.get_running_loop()
        end = loop.time() + _LIVE_FOR
        sent = None
        yield "retry: 1000\n\n"
        while loop.time() < end and not closing() and not await request.is_disconnected():
            html, finished = await run_in_threadpool(_run_fragment, which)
            if html != sent:
                sent = html
                yield "event: update\n" + "".join(f"data: {line}\n" for line in html.split("\n"))
                yield "\n"
            if which != "latest" and finished:
                yield "event: done\ndata: \n\n"
                return
            await asyncio.sleep(_LIVE_EVERY)

    # -- actions --------------------------------------------------------------------------
    async def act(request: Request, kind: str, name: str, field: str | None) -> Response:
        form = await _form(request)
        session = session_of(request)
        if session is None:
            log.warning("dashboard action refused: no login", kind=kind, name=name)
            return page(request, "refused.html", 401, why="log in first")
        if not access.csrf_ok(session, form.get("csrf")):
            log.warning("dashboard action refused: bad CSRF token", kind=kind, name=name)
            return page(request, "refused.html", 403, why="the form's CSRF token is not valid")
        target = (form.get(field) or "").strip() or None if field else None
        if target is not None and not re.fullmatch(REVISION_PATTERN, target):
            return page(request, "refused.html", 400, why=f"{field}: not a revision or release")
        try:
            event_id = await run_in_threadpool(
                queue_request,
                backend.queue,
                backend.loaded().model,
                kind,
                name,
                target,
                source="dashboard",
            )
        except RequestError as exc:
            return page(request, "refused.html", 404, why=str(exc))
        log.info("dashboard event queued", kind=kind, name=name, revision=target, event_id=event_id)
        try:
            backend.wake()
        except Exception as exc:  # the event is stored: a failed nudge only delays it
            log.warning("could not wake the worker", error=f"{type(exc).__name__}: {exc}")
        return RedirectResponse("/runs/latest", status_code=303)

    @router.post("/services/{name}/deploy")
    async def deploy(name: str, request: Request) -> Response:
        return await act(request, "deploy", name, "revision")

    @router.post("/services/{name}/rollback")
    async def rollback(name: str, request: Request) -> Response:
        return await act(request, "rollback", name, "to")

    @router.post("/images/{name}/rebuild")
    async def rebuild(name: str, request: Request) -> Response:
        return await act(request, "rebuild", name, None)

    return router


def _local(target: str) -> str:
    """`target` when it is a path of this server, else "/" (no open redirect after login)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None
