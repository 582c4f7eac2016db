"""Reads of the API need the token where the server is reachable from other machines: the
default of `[server] read_token_required` from `listen`, its config check, and the answers of
every `GET /api/*` route (TestClient over the app, a real SQLite state in tmp_path)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.config.load import parse
from pipeline.config.model import ServerSection, decode, listens_beyond_loopback
from pipeline.errors import ConfigError
from pipeline.service.server import ServerContext, create_app
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

TOKEN = "read-token-for-api-tests-3f9"
TOKEN_ENV = "PIPELINE_TEST_READ_TOKEN"


@pytest.mark.parametrize(
    ("listen", "beyond"),
    [
        ("127.0.0.1:8700", False),
        ("127.0.0.1", False),
        ("127.8.9.10:80", False),
        ("localhost:8700", False),
        ("LOCALHOST", False),
        ("::1", False),
        ("[::1]:8700", False),
        ("[::ffff:127.0.0.1]:8700", False),
        ("0.0.0.0:8700", True),
        ("0.0.0.0", True),
        ("::", True),
        ("[::]:8700", True),
        ("10.88.240.1:8700", True),
        ("192.168.1.5", True),
        ("[2001:db8::1]:8700", True),
        ("pipeline.example.com:8700", True),
    ],
)
def test_listen_address_decides_the_default(listen: str, beyond: bool) -> None:
    """Reads need the token by default exactly when `listen` reaches beyond loopback (any
    address but 127.0.0.0/8, ::1 and localhost, host names included)."""
    assert listens_beyond_loopback(listen) is beyond


@pytest.mark.parametrize(
    ("table", "needed"),
    [
        ({}, False),
        ({"listen": "0.0.0.0:8700"}, True),
        ({"listen": "0.0.0.0:8700", "read_token_required": False}, False),
        ({"listen": "127.0.0.1:8700", "read_token_required": True}, True),
    ],
)
def test_read_token_required_overrides_the_default(table: dict[str, object], needed: bool) -> None:
    """An explicit `read_token_required` wins over the default taken from `listen`."""
    assert decode(ServerSection, table).reads_need_token() is needed


@pytest.mark.parametrize(
    ("server", "where"),
    [
        ('listen = "0.0.0.0:8700"', "pipeline.toml:3: server.listen: "),
        (
            'listen = "127.0.0.1:8700"\nread_token_required = true',
            "pipeline.toml:4: server.read_token_required: ",
        ),
    ],
)
def test_required_reads_without_a_token_are_a_config_error(server: str, where: str) -> None:
    """Reads that need the token with no `api_token_env` are refused by validate, at the key's
    file:line, naming read_token_required and how to fix it."""
    with pytest.raises(ConfigError) as caught:
        parse(f"\n[server]\n{server}\n", Path("pipeline.toml"))
    (problem,) = caught.value.problems
    assert problem.startswith(where), problem
    assert "read_token_required" in problem and "api_token_env" in problem


@pytest.mark.parametrize(
    "server",
    [
        'listen = "0.0.0.0:8700"\nread_token_required = false',
        f'listen = "0.0.0.0:8700"\napi_token_env = "{TOKEN_ENV}"',
        'listen = "127.0.0.1:8700"',
    ],
)
def test_open_or_tokened_reads_validate(server: str) -> None:
    """Reads left open on purpose, reads with a token, and loopback without one all validate."""
    parse(f"[server]\n{server}\n", Path("pipeline.toml"))


def _client(tmp_path: Path, server: str, bound: str | None = None) -> Iterator[TestClient]:
    loaded = parse(f"[server]\n{server}\n", tmp_path / "pipeline.toml")
    state = State.in_dir(tmp_path / "data")
    run_id = state.start_run("cli", "app")
    assert run_id == 1  # what /api/runs/{run_id} is asked for
    ctx = ServerContext(
        loaded=lambda: loaded,
        state=state,
        queue=EventQueue(state),
        status=lambda: [],
        wake=lambda: None,
        started_at=time.time(),
        listen=bound,
    )
    with TestClient(create_app(ctx)) as client:
        yield client


@pytest.fixture
def public(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app of a server listening on every address, with the API token set."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    yield from _client(tmp_path, f'listen = "0.0.0.0:8700"\napi_token_env = "{TOKEN_ENV}"')


@pytest.fixture
def loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app of a server on loopback, the API token set but not required for reads."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    yield from _client(tmp_path, f'listen = "127.0.0.1:8700"\napi_token_env = "{TOKEN_ENV}"')


def _read_paths(client: TestClient) -> list[str]:
    """Every GET route under /api the app has (new ones included), with ids filled in."""
    described = client.get("/openapi.json").json()["paths"]
    paths = [
        path.replace("{run_id}", "1")
        for path, operations in described.items()
        if path.startswith("/api/") and "get" in operations
    ]
    assert {"/api/status", "/api/runs", "/api/runs/1", "/api/history", "/api/events"} <= set(paths)
    return paths


def test_reads_beyond_loopback_need_the_token(public: TestClient) -> None:
    """Listening beyond loopback, every GET /api/* answers 401 with an RFC 6750 challenge and
    no data without the token or with a wrong one, and 200 with it."""
    for path in _read_paths(public):
        missing = public.get(path)
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"] == 'Bearer realm="pipeline"'
        assert "api_token_env" in missing.json()["error"]
        assert set(missing.json()) == {"error"}
        wrong = public.get(path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401, path
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        basic = public.get(path, headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401, path
        good = public.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200, (path, good.text)


def test_reads_on_loopback_are_open_by_default(loopback: TestClient) -> None:
    """On loopback, every GET /api/* answers 200 without a token."""
    for path in _read_paths(loopback):
        assert loopback.get(path).status_code == 200, path


def test_healthz_and_metrics_stay_open(public: TestClient) -> None:
    """/healthz and /metrics answer without a token even where reads of /api need one."""
    assert public.get("/healthz").status_code == 200
    assert public.get("/metrics").status_code == 200


def test_required_reads_with_the_token_variable_unset_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When reads need the token and its variable is unset at run time, they answer 403 naming
    the variable, never the data."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for client in _client(tmp_path, f'read_token_required = true\napi_token_env = "{TOKEN_ENV}"'):
        r = client.get("/api/runs", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403
        assert TOKEN_ENV in r.json()["error"]


def test_writes_still_need_the_token_where_reads_do_not(loopback: TestClient) -> None:
    """On loopback, reads are open but deploy still answers 401 without the token."""
    r = loopback.post("/api/deploy/web")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="pipeline"'


def test_a_reload_to_loopback_does_not_open_reads_before_the_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started on 0.0.0.0 whose config now says loopback (`listen` changes only on
    restart) still asks reads for the token."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    server = f'listen = "127.0.0.1:8700"\napi_token_env = "{TOKEN_ENV}"'
    for client in _client(tmp_path, server, bound="0.0.0.0:8700"):
        assert client.get("/api/runs").status_code == 401
        token = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/runs", headers=token).status_code == 200
