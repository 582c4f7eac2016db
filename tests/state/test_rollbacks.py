"""What rollbacks keep in the state database: each release's settings (never shown), the release
a rollback restored, and pins; and that the settings' env values stay out of every output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from fastapi.testclient import TestClient
from sqlalchemy import inspect, update

from pipeline.config.load import load
from pipeline.service.server import ServerContext, create_app
from pipeline.state.queue import EventQueue
from pipeline.state.rollbacks import ServiceSettings
from pipeline.state.schema import ReleaseSettings
from pipeline.state.store import State

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "state" / "pipeline-0.1.db"
SECRET = "sk_live_51Hx9Zq2vT7rLmN4pQ"  # looks like a real API key; registered nowhere
FILE_SECRET = "pg-pass-7f3a9c21e04b"
CONFIG = f"""
[pipeline]
data_dir = "data"

[hosts.h1]
docker = "tcp://127.0.0.1:2375"

[repos.app]
url = "file:///srv/app.git"

[images.web]
repo = "app"

[services.web]
image = "web"
hosts = ["h1"]
ports = ["8080:8080"]
env = {{ GREETING = "hello", API_KEY = "{SECRET}" }}
env_file = "web.env"
labels = {{ tier = "one" }}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pipeline.toml").write_text(CONFIG)
    (tmp_path / "web.env").write_text(f"# database\nDB_PASSWORD={FILE_SECRET}\n")
    return tmp_path / "pipeline.toml"


def _settings(config: Path) -> ServiceSettings:
    loaded = load(config)
    return ServiceSettings(loaded.model.services["web"], (config.parent / "web.env").read_text())


def _release(state: State, settings: ServiceSettings | None, restores: int | None = None) -> int:
    run_id = state.start_run("cli", "app")
    release_id = state.start_release(
        "web",
        "a" * 40,
        "sha256:" + "b" * 64,
        "reg/web@sha256:" + "b" * 64,
        "spec",
        kind="rollback" if restores else "deploy",
        reason="image web rebuilt",
        run_id=run_id,
        settings=settings,
        restores=restores,
    )
    state.finish_release(release_id, "succeeded")
    state.finish_run(run_id, "succeeded", summary="builds: web; rollouts: web", revision="a" * 40)
    return release_id


def test_settings_are_kept_with_their_release_and_read_back(project: Path) -> None:
    """A release's settings come back as the same validated table and env file text; a release
    recorded without settings has none; their repr shows no value."""
    state = State.in_dir(project.parent / "data")
    settings = _settings(project)
    with_settings, without = _release(state, settings), _release(state, None)
    assert state.rollbacks.release_settings(with_settings) == settings
    assert state.rollbacks.release_settings(without) is None
    assert SECRET not in repr(settings) and FILE_SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [("env", {"API_KEY": 12345678, "SECRET_TWO": SECRET}, "env"), ("memory", SECRET, "memory")],
)
def test_settings_that_no_longer_validate_are_none_and_logged_without_values(
    project: Path, key: str, value: object, where: str
) -> None:
    """Stored settings the config model no longer accepts read as None; the warning names the
    key, not the value (an env value of the wrong type, a memory size that is a secret)."""
    state = State.in_dir(project.parent / "data")
    release_id = _release(state, _settings(project))
    stored = json.loads(state.rollbacks.release_settings(release_id).to_json())  # type: ignore[union-attr]
    stored["service"][key] = value
    with state.session() as s:
        s.execute(
            update(ReleaseSettings)
            .where(ReleaseSettings.release_id == release_id)
            .values(settings=json.dumps(stored))
        )
    with structlog.testing.capture_logs() as logs:
        assert state.rollbacks.release_settings(release_id) is None
    assert where in str(logs) and SECRET not in str(logs) and "12345678" not in str(logs)


def test_rollback_rows_name_the_release_they_restore(project: Path) -> None:
    """`past_releases` gives every release oldest first with the release a rollback restored."""
    state = State.in_dir(project.parent / "data")
    first = _release(state, None)
    back = _release(state, None, restores=first)
    state.record_superseded("web", "c" * 40, "superseded by aaaa", None)
    rows = state.rollbacks.past_releases("web")
    assert [(r.id, r.kind, r.restores) for r in rows] == [
        (first, "deploy", None),
        (back, "rollback", first),
    ]


def test_pin_replace_and_unpin(project: Path) -> None:
    """A pin is recorded with its head, a second pin replaces it, unpinning removes it once."""
    state = State.in_dir(project.parent / "data")
    for release_id, revision, reason in ((4, "a" * 40, "rollback to r2"), (5, "b" * 40, "to r1")):
        state.rollbacks.pin_service(
            "web", release_id=release_id, revision=revision, head="c" * 40, reason=reason
        )
    (pin,) = state.rollbacks.pins().values()
    assert (pin.release_id, pin.revision, pin.head, pin.reason) == (
        5,
        "b" * 40,
        "c" * 40,
        "to r1",
    )
    assert pin.since.tzinfo is not None
    assert state.rollbacks.unpin_service("web") is True
    assert state.rollbacks.unpin_service("web") is False
    assert state.rollbacks.pins() == {}


def test_previous_release_database_gains_rollback_columns(tmp_path: Path) -> None:
    """A pipeline 0.1 database upgraded in place has `releases.restores` and `pins.head`."""
    db = tmp_path / "state.db"
    shutil.copy(FIXTURE, db)
    state = State(f"sqlite:///{db}")
    with state.engine.connect() as conn:
        assert "restores" in {c["name"] for c in inspect(conn).get_columns("releases")}
        assert "head" in {c["name"] for c in inspect(conn).get_columns("pins")}
    (old,) = state.rollbacks.past_releases("web")
    assert old.restores is None


def test_env_values_of_release_settings_stay_out_of_history_status_and_api(
    project: Path,
) -> None:
    """With a release whose settings hold secret-looking env and env file values, neither
    `history --json`, `status --json`, `/api/runs`, `/api/runs/{id}` nor `/api/status` shows
    them."""
    state = State.in_dir(project.parent / "data")
    _release(state, _settings(project))
    state.rollbacks.pin_service(
        "web", release_id=1, revision="a" * 40, head=None, reason="rollback to r1"
    )
    outputs = []
    for args in (["history", "--json"], ["status", "--json"]):
        res = subprocess.run(
            [sys.executable, "-m", "pipeline", *args, "-c", str(project)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        outputs.append(res.stdout + res.stderr)
    history = json.loads(outputs[0])
    assert history[0]["status"] == "succeeded"
    assert json.loads(outputs[1])[0]["pinned"]["reason"] == "rollback to r1"

    from pipeline.deploy.connections import Connections
    from pipeline.deploy.operations import status_rows

    loaded = load(project)
    connections = Connections(loaded)
    ctx = ServerContext(
        loaded=lambda: loaded,
        state=state,
        queue=EventQueue(state),
        status=lambda: status_rows(state, connections),
        wake=lambda: None,
        started_at=0.0,
    )
    with TestClient(create_app(ctx)) as client:
        for path in ("/api/runs", "/api/runs/1", "/api/status"):
            r = client.get(path)
            assert r.status_code == 200, r.text
            outputs.append(r.text)
    assert outputs[-1] and json.loads(outputs[-1])[0]["pinned"]["revision"] == "a" * 40
    for text in outputs:
        assert SECRET not in text and FILE_SECRET not in text
