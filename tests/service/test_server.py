"""The HTTP server of `pipeline serve`: real deliveries (tests/fixtures/webhooks) over HTTP, a real
SQLite state in tmp_path, and uvicorn on loopback where the transport matters (body limits)."""

from __future__ import annotations

import hashlib
import hmac
import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from fastapi.testclient import TestClient

from pipeline.config.load import LoadedConfig, parse
from pipeline.redact import register_secret
from pipeline.service import metrics
from pipeline.service.server import ServerContext, create_app, decide, start
from pipeline.sources.webhooks.verify import PushEvent
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

# Real deliveries, byte for byte as the providers send them (copied from the shared set;
# tests/fixtures/webhooks/README.md gives their sources and how each provider signs).
SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks"
pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared webhook deliveries not found at {SHARED}"
)

SECRET = "hook-secret-for-server-tests"
TOKEN = "api-token-for-server-tests"
SECRET_ENV = "PIPELINE_TEST_HOOK_SECRET"
TOKEN_ENV = "PIPELINE_TEST_API_TOKEN"
MAX_BODY = 64 * 1024

CONFIG = """
[server]
listen = "127.0.0.1:0"
max_body = {max_body}
{api}

[hosts.local]
docker = "unix:///var/run/docker.sock"

[repos.app]
url = "file:///srv/app.git"
branch = "changes"
webhook_secret_env = "{secret_env}"

[repos.gl]
url = "file:///srv/gl.git"
branch = "master"
webhook_secret_env = "{secret_env}"

[repos.bb]
url = "file:///srv/bb.git"
branch = "feature/issue-819"
webhook_secret_env = "{secret_env}"

[repos.rel]
url = "file:///srv/rel.git"
tags = "simple-*"
webhook_secret_env = "{secret_env}"

[repos.open]
url = "file:///srv/open.git"
branch = "changes"

[repos.hub]
url = "git@github.com:example-org/shop.git"
branch = "master"
webhook_secret_env = "{secret_env}"

[repos.sys]
url = "/srv/git/shop.git"
branch = "master"
webhook_repository = "acme/shop"
webhook_secret_env = "{secret_env}"

[repos.tagged]
url = "/srv/git/tagged.git"
tags = "*"
webhook_secret_env = "{secret_env}"

[images.web]
repo = "app"

[services.web]
image = "web"
hosts = ["local"]
"""


def delivery(name: str) -> bytes:
    """A delivery's exact bytes, never re-serialised."""
    return (SHARED / name).read_bytes()


def sig256(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github(
    event: str, body: bytes, delivery_id: str = "72d3162e-0001", **extra: str
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id,
        "X-Hub-Signature-256": sig256(body),
    }
    headers.update(extra)
    return headers


@dataclass
class Service:
    """The app under test with what a test inspects: client, state, queue and wake calls."""

    client: TestClient
    ctx: ServerContext
    config: list[LoadedConfig]
    wakes: list[float] = field(default_factory=list)

    @property
    def queue(self) -> EventQueue:
        return self.ctx.queue

    def reconfigure(self, api: str = "") -> None:
        """Swap the live config, as the service's reload does."""
        self.config[0] = _config(self.config[0].path, api)


def _config(path: Path, api: str = "") -> LoadedConfig:
    text = CONFIG.format(max_body=MAX_BODY, api=api, secret_env=SECRET_ENV)
    return parse(text, path)


def _context(tmp_path: Path, wakes: list[float], config: list[LoadedConfig]) -> ServerContext:
    state = State.in_dir(tmp_path / "data")
    return ServerContext(
        loaded=lambda: config[0],
        state=state,
        queue=EventQueue(state),
        status=lambda: [{"service": "web", "host": "local", "state": "running"}],
        wake=lambda: wakes.append(time.time()),
        started_at=time.time(),
    )


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """The app over TestClient with a fresh state, the webhook secret set and no API token."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = [_config(tmp_path / "pipeline.toml")]
    wakes: list[float] = []
    ctx = _context(tmp_path, wakes, config)
    with TestClient(create_app(ctx)) as client:
        yield Service(client=client, ctx=ctx, config=config, wakes=wakes)


# -- webhooks ------------------------------------------------------------------------------


def test_github_push_is_queued_and_committed(svc: Service, tmp_path: Path) -> None:
    """A signed GitHub push to the followed branch answers 202 only once its event is stored."""
    body = delivery("github/push.json")
    r = svc.client.post("/hooks/app", content=body, headers=github("push", body))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    # A second connection (as another process would) already sees the committed event.
    events = EventQueue(State.in_dir(tmp_path / "data")).recent()
    assert len(events) == 1
    assert events[0]["id"] == r.json()["event_id"]
    assert events[0]["kind"] == "push"
    assert events[0]["ref"] == "refs/heads/changes"
    assert events[0]["sha"] == "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
    assert events[0]["delivery_id"] == "72d3162e-0001"
    assert len(svc.wakes) == 1


def test_same_delivery_again_is_a_duplicate(svc: Service) -> None:
    """A redelivery with the same delivery id answers duplicate and queues nothing more."""
    body = delivery("github/push.json")
    first = svc.client.post("/hooks/app", content=body, headers=github("push", body))
    again = svc.client.post("/hooks/app", content=body, headers=github("push", body))
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    assert svc.queue.depth() == 1
    assert len(svc.wakes) == 1


def test_bad_signature_is_refused_naming_the_header(svc: Service) -> None:
    """A delivery signed with another secret gets 401 naming X-Hub-Signature-256; nothing queued."""
    body = delivery("github/push.json")
    headers = github("push", body, **{"X-Hub-Signature-256": sig256(body, "other-secret")})
    r = svc.client.post("/hooks/app", content=body, headers=headers)
    assert r.status_code == 401
    assert "X-Hub-Signature-256" in r.json()["error"]
    assert svc.queue.recent() == []


def test_missing_signature_is_refused(svc: Service) -> None:
    """With a secret configured, an unsigned delivery gets 401 naming the expected header."""
    body = delivery("github/push.json")
    headers = github("push", body)
    del headers["X-Hub-Signature-256"]
    r = svc.client.post("/hooks/app", content=body, headers=headers)
    assert r.status_code == 401
    assert "X-Hub-Signature-256" in r.json()["error"]
    assert svc.queue.recent() == []


def test_malformed_json_is_a_400(svc: Service) -> None:
    """A correctly signed body that is not JSON gets 400 and queues nothing."""
    body = b'{"ref": "refs/heads/changes", '
    r = svc.client.post("/hooks/app", content=body, headers=github("push", body))
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]
    assert svc.queue.recent() == []


def test_ping_answers_pong(svc: Service) -> None:
    """GitHub's ping (sent when a hook is created) answers pong and queues nothing."""
    body = delivery("github/ping.json")
    r = svc.client.post("/hooks/app", content=body, headers=github("ping", body))
    assert (r.status_code, r.json()) == (200, {"status": "pong"})
    assert svc.queue.recent() == []


def test_branch_deletion_is_ignored(svc: Service) -> None:
    """A branch deletion is acknowledged as ignored with its reason, and nothing is queued."""
    body = delivery("github/push-delete-branch.json")
    r = svc.client.post("/hooks/app", content=body, headers=github("push", body))
    assert r.status_code == 200
    assert r.json() == {"status": "ignored", "reason": "branch deletion"}
    assert svc.queue.recent() == []


def test_push_to_another_branch_is_ignored(svc: Service) -> None:
    """A push to a branch the repo does not follow is acknowledged as ignored."""
    body = delivery("github/push-new-branch.json")
    r = svc.client.post("/hooks/app", content=body, headers=github("push", body))
    assert r.status_code == 200
    assert r.json()["status"] == "ignored"
    assert "'master' is not the followed branch 'changes'" in r.json()["reason"]
    assert svc.queue.depth() == 0


def test_unknown_repo_is_acknowledged_and_ignored(svc: Service) -> None:
    """A delivery for a repo not in the config gets 200 ignored, so the provider does not retry."""
    body = delivery("github/push.json")
    r = svc.client.post("/hooks/nope", content=body, headers=github("push", body))
    assert r.status_code == 200
    assert r.json()["status"] == "ignored"
    assert "unknown repo" in r.json()["reason"]
    assert svc.queue.recent() == []


def test_gitlab_push_is_queued(svc: Service) -> None:
    """A GitLab push with the right X-Gitlab-Token queues a push event with its after SHA."""
    body = delivery("gitlab/push.json")
    headers = {
        "Content-Type": "application/json",
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": SECRET,
        "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
    }
    r = svc.client.post("/hooks/gl", content=body, headers=headers)
    assert r.status_code == 202, r.text
    [event] = svc.queue.recent()
    assert (event["repo"], event["kind"], event["ref"]) == ("gl", "push", "refs/heads/master")
    assert event["sha"] == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    wrong = svc.client.post("/hooks/gl", content=body, headers={**headers, "X-Gitlab-Token": "x"})
    assert wrong.status_code == 401
    assert "X-Gitlab-Token" in wrong.json()["error"]


def test_bitbucket_cloud_push_is_queued(svc: Service) -> None:
    """A Bitbucket Cloud repo:push signed in X-Hub-Signature queues the pushed branch's head."""
    body = delivery("bitbucket-cloud/push.json")
    headers = {
        "Content-Type": "application/json",
        "X-Event-Key": "repo:push",
        "X-Request-UUID": "a2b8d2c6-bb-0001",
        "X-Hub-Signature": sig256(body),
    }
    r = svc.client.post("/hooks/bb", content=body, headers=headers)
    assert r.status_code == 202, r.text
    [event] = svc.queue.recent()
    assert event["ref"] == "refs/heads/feature/issue-819"
    assert event["sha"] == "5ecffa3874e96920f24a2b3c0d0038e47d5cd1a4"


def test_tag_push_is_queued_for_a_tags_repo_only(svc: Service) -> None:
    """A tag matching the repo's tags glob queues kind "tag"; a branch-following repo ignores it."""
    body = delivery("github/push-tag.json")
    r = svc.client.post("/hooks/rel", content=body, headers=github("push", body, "tag-1"))
    assert r.status_code == 202, r.text
    [event] = svc.queue.recent()
    assert (event["kind"], event["ref"]) == ("tag", "refs/tags/simple-tag")
    assert event["sha"] == "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    r = svc.client.post("/hooks/app", content=body, headers=github("push", body, "tag-2"))
    assert r.status_code == 200
    assert r.json()["status"] == "ignored"
    assert svc.queue.depth() == 1


def test_unsigned_delivery_is_accepted_when_no_secret_is_configured(svc: Service) -> None:
    """A repo without webhook_secret_env accepts unsigned deliveries and warns once, not per hit."""
    body = delivery("github/push.json")
    headers = github("push", body)
    del headers["X-Hub-Signature-256"]
    with structlog.testing.capture_logs() as logs:
        first = svc.client.post(
            "/hooks/open", content=body, headers={**headers, "X-GitHub-Delivery": "u1"}
        )
        second = svc.client.post(
            "/hooks/open", content=body, headers={**headers, "X-GitHub-Delivery": "u2"}
        )
    assert (first.status_code, second.status_code) == (202, 202)
    warnings = [e for e in logs if e["log_level"] == "warning" and "unsigned" in e["event"]]
    assert len(warnings) == 1


def test_missing_secret_variable_refuses_instead_of_accepting_unsigned(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo whose webhook_secret_env is unset in the environment answers 503, never unchecked."""
    monkeypatch.delenv(SECRET_ENV)
    body = delivery("github/push.json")
    r = svc.client.post("/hooks/app", content=body, headers=github("push", body))
    assert r.status_code == 503
    assert SECRET_ENV in r.json()["error"]
    assert svc.queue.recent() == []


# -- delivery forms and repository identity ---------------------------------------------------

FORM = "application/x-www-form-urlencoded"


def gitlab(event: str, uuid: str = "13792a34-0001") -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Gitlab-Event": event,
        "X-Gitlab-Token": SECRET,
        "X-Gitlab-Event-UUID": uuid,
    }


def test_form_encoded_github_push_is_queued_and_form_ping_pongs(svc: Service) -> None:
    """GitHub's default content type (a form, the JSON in `payload`, signed as sent) queues the
    push's commit; a form-encoded ping answers pong."""
    body = delivery("github/push-form.txt")
    r = svc.client.post(
        "/hooks/hub", content=body, headers=github("push", body, **{"Content-Type": FORM})
    )
    assert r.status_code == 202, r.text
    [event] = svc.queue.recent()
    assert (event["ref"], event["sha"]) == (
        "refs/heads/master",
        "009a12040858af96a17cb12695bb363d55891eda",
    )
    ping = (SHARED.with_name("webhooks-extra") / "github" / "ping-form.txt").read_bytes()
    headers = github("ping", ping, "ping-1", **{"Content-Type": FORM})
    r = svc.client.post("/hooks/hub", content=ping, headers=headers)
    assert (r.status_code, r.json()) == (200, {"status": "pong"})


@pytest.mark.parametrize(
    ("repo", "name", "headers", "reason"),
    [
        # an organisation hook's push of another repository, url compared (github.com)
        ("hub", "github/push-organization.json", "github", "push of agoda-com/samsahai-example"),
        # a system hook's push of another project, a local url with webhook_repository
        ("sys", "gitlab/system-hook-push.json", "System Hook", "push of mike/diaspora"),
        ("sys", "gitlab/push.json", "Push Hook", "push of mike/diaspora"),
        ("sys", "github/push-form.txt", "github", "push of example-org/shop"),
        # a release of another project's tag
        ("tagged", "gitlab/release-hook.json", "Release Hook", None),
    ],
)
def test_delivery_of_another_repository_is_ignored(
    svc: Service, repo: str, name: str, headers: str, reason: str | None
) -> None:
    """A delivery naming another repository than the repo's is answered 200 "ignored: push of
    OWNER/NAME" and queues nothing, even on the followed branch."""
    body = delivery(name)
    if headers == "github":
        sent = github("push", body, **({"Content-Type": FORM} if name.endswith(".txt") else {}))
    else:
        sent = gitlab(headers)
    r = svc.client.post(f"/hooks/{repo}", content=body, headers=sent)
    if reason is None:  # a repo without webhook_repository and a local url: accepted as before
        assert r.status_code == 202, r.text
        return
    assert (r.status_code, r.json()) == (200, {"status": "ignored", "reason": reason})
    assert svc.queue.recent() == []
    assert svc.wakes == []


def test_delivery_of_the_repos_own_repository_is_queued(svc: Service) -> None:
    """A system-hook push naming the repository given in webhook_repository is queued."""
    data = json.loads(delivery("gitlab/system-hook-push.json"))
    data["project"]["path_with_namespace"] = "acme/shop"
    for key in ("git_http_url", "git_ssh_url", "web_url", "homepage", "url", "ssh_url", "http_url"):
        data["project"].pop(key, None)
    data.pop("repository")
    body = json.dumps(data).encode()
    r = svc.client.post("/hooks/sys", content=body, headers=gitlab("System Hook"))
    assert r.status_code == 202, r.text
    [event] = svc.queue.recent()
    assert (event["kind"], event["sha"]) == ("push", "da1560886d4f094c3e6c9ef40349f7d38b5d27d7")


@pytest.mark.parametrize(
    ("name", "headers", "sha"),
    [
        (
            "gitlab/release-hook.json",
            gitlab("Release Hook"),
            "2626dbdb936782b5c54816b1c6d45b1279303c6d",
        ),
        ("gitea/release-published.json", None, None),
    ],
)
def test_release_event_queues_its_tag_for_a_tags_repo(
    svc: Service, name: str, headers: dict[str, str] | None, sha: str | None
) -> None:
    """A GitLab Release Hook and a Gitea release (published) queue a tag event of their tag for
    a repo following tags; a branch-following repo ignores them, saying a tag was released."""
    body = delivery(name)
    if headers is None:
        headers = {
            "Content-Type": "application/json",
            "X-Gitea-Event": "release",
            "X-Gitea-Delivery": "gitea-rel-1",
            "X-Gitea-Signature": sig256(body).removeprefix("sha256="),
        }
    r = svc.client.post("/hooks/tagged", content=body, headers=headers)
    assert r.status_code == 202, r.text
    [event] = svc.queue.recent()
    tag = json.loads(body).get("tag") or json.loads(body)["release"]["tag_name"]
    assert (event["kind"], event["ref"], event["sha"]) == ("tag", f"refs/tags/{tag}", sha)
    r = svc.client.post("/hooks/app", content=body, headers=headers)
    assert r.json()["status"] == "ignored"
    assert f"tag {tag!r} released, but the repo follows branch" in r.json()["reason"]


# -- body limits, over a real socket ----------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, ServerContext]]:
    """The app under uvicorn on 127.0.0.1 (a free port); yields (port, context)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = [_config(tmp_path / "pipeline.toml")]
    ctx = _context(tmp_path, [], config)
    server = start(create_app(ctx), "127.0.0.1:0")
    try:
        yield server.port, ctx
    finally:
        server.stop()


def _send_oversized(port: int, headers: str, chunks: Iterator[bytes]) -> tuple[int, int]:
    """Send headers, then body chunks until the server answers; return (status, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(headers.encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is there: stop sending, as a real client's reader would
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(chunk)
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1]), sent


TEN_MB = 10 * 1024 * 1024


def test_oversized_body_with_content_length_is_refused_unread(
    live: tuple[int, ServerContext],
) -> None:
    """A 10 MB Content-Length gets 413 before a single body byte is sent; nothing is queued."""
    port, ctx = live
    head = (
        "POST /hooks/app HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n"
        f"Content-Length: {TEN_MB}\r\n\r\n"
    )
    status, sent = _send_oversized(port, head, iter(()))
    assert (status, sent) == (413, 0)
    assert ctx.queue.recent() == []


def test_oversized_chunked_body_is_refused_while_streaming(live: tuple[int, ServerContext]) -> None:
    """A 10 MB chunked body (no Content-Length) gets 413 long before it is all sent."""
    port, ctx = live
    head = (
        "POST /hooks/app HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 16384
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(TEN_MB // len(piece)))
    status, sent = _send_oversized(port, head, chunks)
    assert status == 413
    assert sent < TEN_MB // 2
    assert ctx.queue.recent() == []


def test_live_server_acknowledges_a_signed_push(live: tuple[int, ServerContext]) -> None:
    """Under uvicorn, a signed GitHub push gets 202 and is stored."""
    import httpx

    port, ctx = live
    body = delivery("github/push.json")
    r = httpx.post(f"http://127.0.0.1:{port}/hooks/app", content=body, headers=github("push", body))
    assert r.status_code == 202
    assert ctx.queue.depth() == 1


# -- service endpoints -------------------------------------------------------------------------


def test_healthz_reports_queue_depth(svc: Service) -> None:
    """/healthz answers ok with the number of queued events."""
    svc.queue.put(source="cli", kind="config")
    assert svc.client.get("/healthz").json() == {"ok": True, "queue_depth": 1}


def test_status_is_the_status_rows_redacted(svc: Service) -> None:
    """/api/status is ctx.status() as JSON, with registered secrets masked."""
    register_secret("leaky-password-9f3")
    svc.ctx.status = lambda: [{"service": "web", "state": "error: leaky-password-9f3"}]
    assert svc.client.get("/api/status").json() == [{"service": "web", "state": "error: ***"}]


def test_an_exception_is_a_500_without_traceback(svc: Service) -> None:
    """A failing route answers 500 {"error": "internal error"}, no traceback and no secret."""
    register_secret("exploding-secret-77")

    def boom() -> list[dict[str, Any]]:
        raise RuntimeError("db at postgres://u:exploding-secret-77@db failed")

    svc.ctx.status = boom
    with structlog.testing.capture_logs() as logs:
        r = svc.client.get("/api/status")
    assert (r.status_code, r.json()) == (500, {"error": "internal error"})
    assert "exploding-secret-77" not in repr(logs)
    assert any(e["event"] == "request failed" for e in logs)


def test_runs_and_run_detail(svc: Service) -> None:
    """/api/runs lists runs newest first; /api/runs/{id} adds steps; an unknown id is 404."""
    state = svc.ctx.state
    old = state.start_run("cli", "app")
    new = state.start_run("webhook", "app")
    step = state.start_step(new, "build", "web", revision="abc")
    state.finish_step(step, "succeeded", detail="built")
    state.finish_run(new, "succeeded", summary="1 build", revision="abc")
    runs = svc.client.get("/api/runs", params={"limit": 10}).json()
    assert [r["id"] for r in runs] == [new, old]
    assert runs[0]["status"] == "succeeded"
    detail = svc.client.get(f"/api/runs/{new}").json()
    assert detail["summary"] == "1 build"
    assert [(s["kind"], s["subject"], s["status"]) for s in detail["steps"]] == [
        ("build", "web", "succeeded")
    ]
    missing = svc.client.get("/api/runs/9999")
    assert missing.status_code == 404
    assert "9999" in missing.json()["error"]


def test_run_detail_and_history_show_releases_with_failure_kind(svc: Service) -> None:
    """/api/runs/{id} lists the releases of the run and /api/history every release, each with
    its failure_kind (null when it succeeded)."""
    state = svc.ctx.state
    run = state.start_run("cli", "app")
    for revision, status, kind in [
        ("a" * 40, "succeeded", None),
        ("b" * 40, "rolled_back", "infrastructure"),
    ]:
        rel = state.start_release(
            "web", revision, "sha256:x", "r@sha256:x", "h", kind="deploy", reason="test", run_id=run
        )
        state.finish_release(rel, status, failure_kind=kind)  # type: ignore[arg-type]
    state.finish_run(run, "failed")
    detail = svc.client.get(f"/api/runs/{run}").json()
    assert [(r["status"], r["failure_kind"]) for r in detail["releases"]] == [
        ("rolled_back", "infrastructure"),
        ("succeeded", None),
    ]
    history = svc.client.get("/api/history", params={"service": "web"}).json()
    assert [r["failure_kind"] for r in history] == ["infrastructure", None]
    assert svc.client.get("/api/history", params={"service": "api"}).json() == []


def test_events_lists_recent_events(svc: Service) -> None:
    """/api/events shows stored events newest first."""
    a = svc.queue.put(source="cli", kind="config")[0]
    b = svc.queue.put(source="poll", kind="push", repo="app")[0]
    assert [e["id"] for e in svc.client.get("/api/events").json()] == [b, a]


def test_write_endpoints_are_disabled_without_a_token(svc: Service) -> None:
    """Without [server] api_token_env, deploy and rollback answer 403 saying how to enable them."""
    for path in ("/api/deploy/web", "/api/rollback/web"):
        r = svc.client.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403
        assert "api_token_env" in r.json()["error"]
    assert svc.queue.recent() == []


def test_write_endpoints_check_the_token(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a token configured: wrong or missing token 401, unknown service 404, else 202 queued."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    svc.reconfigure(api=f'api_token_env = "{TOKEN_ENV}"')
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert svc.client.post("/api/deploy/web").status_code == 401
    wrong = svc.client.post("/api/deploy/web", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert svc.client.post("/api/deploy/nope", headers=good).status_code == 404
    bad = svc.client.post("/api/deploy/web", headers=good, json={"revision": "--upload-pack=x"})
    assert bad.status_code == 400
    assert svc.queue.recent() == []

    deploy = svc.client.post("/api/deploy/web", headers=good, json={"revision": "abc123"})
    assert deploy.status_code == 202
    rollback = svc.client.post("/api/rollback/web", headers=good)
    assert rollback.status_code == 202
    events = {e["id"]: e for e in svc.queue.recent()}
    queued = events[deploy.json()["event_id"]]
    assert (queued["source"], queued["kind"], queued["subject"]) == ("api", "deploy", "web")
    assert (queued["sha"], queued["repo"]) == ("abc123", "app")
    assert events[rollback.json()["event_id"]]["kind"] == "rollback"
    assert len(svc.wakes) == 2


def test_metrics_expose_the_pipeline_series(svc: Service) -> None:
    """/metrics serves the run, duration, queue-depth and last-success series in text format."""
    state = svc.ctx.state
    release = state.start_release(
        "web", "abc", "sha256:1", "ref", "h", kind="deploy", reason=None, run_id=None
    )
    state.finish_release(release, "succeeded")
    svc.queue.put(source="cli", kind="config")
    metrics.observe_run("succeeded")
    metrics.observe_build(12.5)
    metrics.observe_rollout(3.0)
    r = svc.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        'pipeline_runs_total{outcome="succeeded"}',
        "pipeline_build_duration_seconds_bucket",
        "pipeline_rollout_duration_seconds_count",
        "pipeline_queue_depth 1.0",
        'pipeline_last_success_timestamp_seconds{service="web"}',
    ):
        assert name in text


def test_openapi_docs_are_served(svc: Service) -> None:
    """/docs and /openapi.json describe the webhook and API routes."""
    assert svc.client.get("/docs").status_code == 200
    paths = svc.client.get("/openapi.json").json()["paths"]
    assert {"/hooks/{repo}", "/api/deploy/{service}", "/healthz", "/metrics"} <= set(paths)


# -- deciding what a delivery means (pure) ----------------------------------------------------


def _ev(
    kind: str, ref: str | None = None, after: str | None = "a" * 40, repository: str = ""
) -> PushEvent:
    names = (repository, f"https://github.com/{repository}.git") if repository else ()
    return PushEvent(
        "github",
        kind,
        ref,
        None,
        after,
        "d",
        reason="why" if kind == "ignored" else "",
        repository=names,
    )


DECIDE_CASES: list[tuple[dict[str, str], list[PushEvent], str, str | None]] = [
    ({"branch": "main"}, [_ev("push", "refs/heads/main")], "queue", "push"),
    ({}, [_ev("push", "refs/heads/main")], "queue", "push"),
    ({"branch": "main"}, [_ev("push", "refs/heads/dev")], "ignore", None),
    ({"branch": "main"}, [_ev("tag", "refs/tags/v1")], "ignore", None),
    ({"tags": "v*"}, [_ev("tag", "refs/tags/v1.2")], "queue", "tag"),
    ({"tags": "v*"}, [_ev("tag", "refs/tags/x1")], "ignore", None),
    ({"tags": "v*"}, [_ev("push", "refs/heads/main")], "ignore", None),
    ({"branch": "main"}, [_ev("ping")], "pong", None),
    ({"branch": "main"}, [_ev("ignored")], "ignore", None),
    (
        {"branch": "main"},
        [_ev("push", "refs/heads/dev"), _ev("push", "refs/heads/main")],
        "queue",
        "push",
    ),
    # repository identity: the url compared on the same host, else webhook_repository
    (
        {"url": "https://github.com/acme/shop"},
        [_ev("push", "refs/heads/main", repository="acme/shop")],
        "queue",
        "push",
    ),
    (
        {"url": "https://github.com/acme/shop"},
        [_ev("push", "refs/heads/main", repository="acme/other")],
        "ignore",
        None,
    ),
    (
        {"url": "https://github.com/acme/shop"},
        [_ev("tag", "refs/tags/v1", repository="acme/other")],
        "ignore",
        None,
    ),
    (
        {"url": "https://mirror.example/shop.git"},
        [_ev("push", "refs/heads/main", repository="acme/other")],
        "queue",
        "push",
    ),
    (
        {"webhook_repository": "acme/shop"},
        [_ev("push", "refs/heads/main", repository="acme/other")],
        "ignore",
        None,
    ),
    (
        {"webhook_repository": "acme/shop"},
        [_ev("push", "refs/heads/main", repository="ACME/Shop")],
        "queue",
        "push",
    ),
    ({"webhook_repository": "acme/shop"}, [_ev("ping", repository="acme/other")], "pong", None),
    ({}, [_ev("push", "refs/heads/main", repository="acme/other")], "queue", "push"),
]


@pytest.mark.parametrize(("repo", "events", "action", "kind"), DECIDE_CASES)
def test_decide_table(
    repo: dict[str, str], events: list[PushEvent], action: str, kind: str | None
) -> None:
    """decide queues exactly the ref changes a repo follows (branch, or tags by glob)."""
    from pipeline.config.model import RepoSection, decode

    section = decode(RepoSection, {"url": "file:///srv/x.git", **repo})
    decision = decide(section, events)
    assert (decision.action, decision.kind) == (action, kind)
