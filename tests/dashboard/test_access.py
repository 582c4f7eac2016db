"""The dashboard's access rules and actions over the app in process (TestClient, a real SQLite
state in tmp_path): who sees the pages, the login and its cookie, CSRF on every action, the
password hash format, a finished run's live stream, and what the pages print (times, digests,
labels, the last poll or webhook, a release that went back)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.config.load import parse
from pipeline.dashboard.access import check_password, hash_password
from pipeline.errors import ConfigError
from pipeline.redact import register_secret
from pipeline.service.server import ServerContext, create_app
from pipeline.sources.git import Mirror
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

TOKEN = "dashboard-token-for-tests-7c1"
TOKEN_ENV = "PIPELINE_TEST_DASHBOARD_TOKEN"
PASSWORD = "correct horse battery staple"
SERVICES = """
[hosts.h1]
docker = "tcp://127.0.0.1:2375"

[repos.shop]
url = "/srv/git/shop.git"
poll = "5s"

[images.web]
repo = "shop"
context = "web"

[services.web]
image = "web"
hosts = ["h1"]
"""

Client = Callable[..., TestClient]
STREAM = ("/runs/latest/stream",)


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """`client(server_table)`: a TestClient over the app of a config with that [server]."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    made: list[TestClient] = []

    def make(
        server: str = 'listen = "127.0.0.1:8700"',
        status: list[dict[str, object]] | None = None,
        **extra: object,
    ) -> TestClient:
        text = f'[server]\n{server}\napi_token_env = "{TOKEN_ENV}"\n{SERVICES}'
        loaded = parse(text, tmp_path / "pipeline.toml")
        state = State.in_dir(tmp_path / "data")
        ctx = ServerContext(
            loaded=lambda: loaded,
            state=state,
            queue=EventQueue(state),
            status=lambda: status or [],
            wake=lambda: None,
            started_at=time.time(),
            listen=loaded.model.server.listen,
            **extra,  # type: ignore[arg-type]
        )
        c = TestClient(create_app(ctx), follow_redirects=False)
        c.__enter__()
        c.app_state = ctx  # type: ignore[attr-defined]
        made.append(c)
        return c

    yield make
    for c in made:
        c.__exit__(None, None, None)


def _queued(c: TestClient) -> list[dict[str, object]]:
    return c.app_state.queue.recent(100)  # type: ignore[attr-defined, no-any-return]


def _login(c: TestClient, secret: str = TOKEN) -> str:
    """Log in; return the CSRF token the service page's forms carry."""
    res = c.post("/login", data={"secret": secret, "next": "/services/web"})
    assert res.status_code == 303, res.text
    page = c.get("/services/web").text
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


@pytest.mark.parametrize(
    ("server", "open_"),
    [
        ('listen = "127.0.0.1:8700"', True),
        ('listen = "127.0.0.1:8700"\ndashboard = "login"', False),
        ('listen = "127.0.0.1:8700"\nread_token_required = true', False),
        ('listen = "0.0.0.0:8700"', False),
        ('listen = "0.0.0.0:8700"\ndashboard = "open"', False),
    ],
)
def test_read_pages_open_only_on_loopback_when_asked(
    client: Client, server: str, open_: bool
) -> None:
    """Read pages are shown without a login only on loopback with `dashboard = "open"`;
    otherwise every one redirects to the login page."""
    c = client(server)
    # (An open stream of the latest run does not end: its redirect is checked, not its 200.)
    for path in ("/", "/runs/latest", "/services/web", "/plan", *(() if open_ else STREAM)):
        res = c.get(path)
        if open_:
            assert res.status_code == 200, (path, res.text)
        else:
            assert res.status_code == 303, path
            assert res.headers["location"].startswith("/login?next=")


def test_login_sets_a_strict_httponly_cookie_and_never_shows_the_token(client: Client) -> None:
    """The token logs in through a POST body; the session cookie is HttpOnly and
    SameSite=Strict, and the token is in no page, redirect or cookie."""
    c = client('listen = "0.0.0.0:8700"')
    wrong = c.post("/login", data={"secret": "not-it", "next": "/"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    res = c.post("/login", data={"secret": TOKEN, "next": "/"})
    assert res.status_code == 303 and res.headers["location"] == "/"
    cookie = res.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert TOKEN not in res.headers["set-cookie"]
    for path in ("/", "/services/web", "/runs/latest", "/login"):
        page = c.get(path)
        assert page.status_code == 200 and TOKEN not in page.text, path


def test_password_login_and_hash_format(client: Client) -> None:
    """A password whose scrypt hash is `[server] password_hash` logs in; another does not."""
    stored = hash_password(PASSWORD)
    assert re.fullmatch(r"scrypt:32768:8:1\$[^$]+\$[0-9a-f]{128}", stored)
    assert check_password(stored, PASSWORD) and not check_password(stored, PASSWORD + "!")
    assert not check_password("md5$x$y", PASSWORD)
    c = client(f'listen = "0.0.0.0:8700"\npassword_hash = "{stored}"')
    assert c.post("/login", data={"secret": "nope"}).status_code == 401
    assert c.post("/login", data={"secret": PASSWORD}).status_code == 303


def test_a_malformed_password_hash_is_a_located_error_without_its_value(tmp_path: Path) -> None:
    """validate names file:line and server.password_hash, and does not echo the value."""
    with pytest.raises(ConfigError) as caught:
        parse('[server]\npassword_hash = "hunter2-plain"\n', tmp_path / "pipeline.toml")
    (problem,) = caught.value.problems
    assert "pipeline.toml:2" in problem and "server.password_hash" in problem
    assert "hunter2" not in problem


def test_actions_need_login_and_the_sessions_csrf_token(client: Client) -> None:
    """Deploy, rollback and rebuild are refused without a login (401) and with a forged or
    missing CSRF token (403), queueing nothing; with both they queue the API's events."""
    c = client()
    actions = [
        ("/services/web/deploy", {"revision": "main"}, "deploy"),
        ("/services/web/rollback", {"to": "r1"}, "rollback"),
        ("/images/web/rebuild", {}, "rebuild"),
    ]
    for path, form, _ in actions:
        assert c.post(path, data={**form, "csrf": "forged"}).status_code == 401, path
    csrf = _login(c)
    for path, form, _ in actions:
        assert c.post(path, data={**form, "csrf": "forged"}).status_code == 403, path
        assert c.post(path, data=form).status_code == 403, path
    assert _queued(c) == []
    option = {"revision": "--upload-pack=x", "csrf": csrf}
    assert c.post("/services/web/deploy", data=option).status_code == 400
    for path, form, _ in actions:
        res = c.post(path, data={**form, "csrf": csrf})
        assert res.status_code == 303 and res.headers["location"] == "/runs/latest", path
    queued = list(reversed(_queued(c)))
    assert [(e["kind"], e["subject"], e["sha"], e["source"]) for e in queued] == [
        ("deploy", "web", "main", "dashboard"),
        ("rollback", "web", "r1", "dashboard"),
        ("rebuild", "web", None, "dashboard"),
    ]


def test_a_finished_runs_stream_sends_its_steps_then_done(client: Client) -> None:
    """The live stream of a finished run sends its steps and outcome once, then `done`."""
    c = client()
    state: State = c.app_state.state  # type: ignore[attr-defined]
    run_id = state.start_run("webhook", "shop")
    step = state.start_step(run_id, "pull", "web", host="h1", revision="a" * 40)
    state.finish_step(step, "succeeded", detail="pulled")
    state.finish_run(run_id, "succeeded", revision="a" * 40)
    with c.stream("GET", f"/runs/{run_id}/stream") as res:
        body = "".join(res.iter_text())
    assert res.headers["content-type"].startswith("text/event-stream")
    assert "event: update" in body and 'data-host="h1"' in body and "pulled" in body
    assert '<tr class="step succeeded" data-kind="pull" data-host="h1">' in body
    assert body.rstrip().endswith("event: done\ndata:")


def test_pages_redact_what_they_show(client: Client) -> None:
    """A secret in what the engine reports (a status row's error) is shown as ***."""
    secret = "engine-secret-5d2e9a"
    register_secret(secret)
    row = {"service": "web", "host": "h1", "revision": "a" * 40, "digest": "sha256:" + "b" * 64}
    row |= {"state": f"unreachable: tls key {secret} refused", "health": None}
    row |= {"updated_at": "2026-01-01T00:00:00+00:00", "pinned": None}
    page = client(status=[row]).get("/").text
    assert "unreachable: tls key *** refused" in page and secret not in page


SHA_A, SHA_B = "a" * 40, "b" * 40


def _release(state: State, revision: str, status: str = "succeeded") -> int:
    release = state.start_release(
        "web", revision, "sha256:" + "d" * 64, "main", "x", kind="deploy", reason=None, run_id=None
    )
    state.finish_release(release, status)
    return release


def test_rollback_choices_carry_their_time_for_the_viewers_zone(client: Client) -> None:
    """The rollback list's options carry their release's time for the page's script to show
    in the viewer's zone (no raw ISO text), and no select or input is wider than the page."""
    c = client()
    state: State = c.app_state.state  # type: ignore[attr-defined]
    release = _release(state, SHA_A)
    page = c.get("/services/web").text
    (started,) = re.findall(r'data-datetime="([^"]+)"', page)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", started)
    option = re.search(rf'<option value="r{release}"[^>]*>([^<]*)</option>', page)
    assert option and option.group(1).endswith(" UTC") and "+00:00" not in option.group(1)
    assert f'data-label="r{release} · {SHA_A[:12]}"' in page
    script = c.get("/static/app.js").text
    assert 'querySelectorAll("option[data-datetime]")' in script
    css = c.get("/static/style.css").text
    assert re.search(r"input, select, button \{[^}]*max-width: 100%", css)
    assert re.search(r"main \{[^}]*overflow-wrap: anywhere", css)


def test_overview_shows_the_last_poll_or_webhook_whichever_is_newer(client: Client) -> None:
    """A repo's last poll (its claimed poll slot, which a poll that found nothing leaves) or
    last webhook is shown, whichever is newer, saying which; "none yet" before either."""
    heads = [{"name": "shop", "follows": "main", "head": None, "subject": None}]
    c = client(repos=lambda: [dict(h) for h in heads])
    state: State = c.app_state.state  # type: ignore[attr-defined]

    def last() -> str:
        page = c.get("/").text
        cell = re.search(r'<td class="last-trigger">(.*?)</td>', page, re.S)
        assert cell, page
        return cell.group(1)

    assert "none yet" in last()
    now = time.time()
    state.cluster.clock = lambda: now - 60
    assert state.cluster.claim_slot("poll:shop", 5, "other-instance:1")
    assert last().startswith('<span title="polled within 5 s after this">poll</span> <time')
    c.app_state.queue.put(source="webhook", kind="push", repo="shop", sha=SHA_A)  # type: ignore[attr-defined]
    assert last().startswith("<span>webhook</span> <time")
    state.cluster.clock = lambda: now + 30
    assert state.cluster.claim_slot("poll:shop", 5, "other-instance:1")
    shown = last()
    assert shown.startswith("<span title=") and ">poll</span>" in shown
    slot_start = int((now + 30) // 5) * 5
    assert re.search(r'datetime="([^"]+)"', shown).group(1) == (  # type: ignore[union-attr]
        time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(slot_start))
    )


def test_overview_digest_is_twelve_hex_like_the_cli(client: Client) -> None:
    """The overview shows an image digest as 12 hex characters without "sha256:", the full
    digest in its title."""
    digest = "sha256:" + "0123456789abcdef" * 4
    row = {"service": "web", "host": "h1", "revision": SHA_A, "digest": digest}
    row |= {"state": "running", "health": None, "updated_at": None, "pinned": None}
    page = client(status=[row]).get("/").text
    assert f'<code title="{digest}">0123456789ab</code>' in page


def _git_history(tmp_path: Path) -> tuple[Mirror, str, str]:
    """A mirror of a real repo with two commits on main: (mirror, first, second)."""
    work = tmp_path / "shop"
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "PATH": "/usr/bin:/bin"}
    who = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *who, *args], cwd=work, env=env, check=True, text=True, capture_output=True
        )
        return done.stdout.strip()

    work.mkdir()
    git("init", "-q", "-b", "main")
    shas = []
    for message in ("first", "second"):
        git("commit", "-q", "--allow-empty", "-m", message)
        shas.append(git("rev-parse", "HEAD"))
    mirror = Mirror(work.as_uri(), tmp_path / "mirror.git")
    mirror.fetch(branch="main")
    return mirror, shas[0], shas[1]


def test_a_release_back_to_an_older_revision_shows_back_to_not_a_range(
    client: Client, tmp_path: Path
) -> None:
    """A release whose revision is an ancestor of the one before it (the mirror's git
    merge-base --is-ancestor) reads "back to X from Y"; one that moved forward, a range."""
    mirror, first, second = _git_history(tmp_path)
    c = client(ancestor=lambda repo, old, new: mirror.is_ancestor(old, new))
    state: State = c.app_state.state  # type: ignore[attr-defined]
    r1, r2, r3 = (_release(state, sha) for sha in (first, second, first))
    page = c.get("/services/web").text

    def meta(release: int) -> str:
        found = re.search(rf'id="r{release}".*?<p class="meta">(.*?)·', page, re.S)
        assert found, page
        return " ".join(found.group(1).split())

    assert meta(r3) == f"back to <code>{first[:12]}</code> from <code>{second[:12]}</code>"
    assert meta(r2) == f"commits <code>{first[:12]}..{second[:12]}</code>"
    assert meta(r1) == f"commit <code>{first[:12]}</code>"


def test_outcomes_read_as_words(client: Client) -> None:
    """A stored outcome such as rolled_back is shown as "rolled back"."""
    c = client()
    _release(c.app_state.state, SHA_A, "rolled_back")  # type: ignore[attr-defined]
    page = c.get("/services/web").text
    assert '<span class="status rolled_back">rolled back</span>' in page
    assert ">rolled_back<" not in page


def test_the_favicon_is_served_and_linked(client: Client) -> None:
    """/favicon.ico answers with the package's SVG icon, which every page links."""
    c = client('listen = "0.0.0.0:8700"')
    icon = c.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.text.startswith("<svg") and c.get("/static/favicon.svg").text == icon.text
    assert '<link rel="icon" href="/static/favicon.svg"' in c.get("/login").text
