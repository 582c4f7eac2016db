"""Secrets never reach the state database: every text column people read is redacted as it is
written, so no later reader (the API, `pipeline history` in another process) can show one."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.redact import register_secret
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

SECRET = "env-file-token-5c1e9a"  # what an app echoes from its env_file while failing
LINE = f"auth failed for token {SECRET}"
URL_LINE = "fetch of https://deploy:url-pass-77ab@git.example.com/x.git failed"

CONFIG = """
[pipeline]
data_dir = "data"

[hosts.web-1]
docker = "tcp://10.88.240.2:2375"

[repos.shop]
url = "https://git.example.com/acme/shop.git"

[images.web]
repo = "shop"

[services.web]
image = "web"
hosts = ["web-1"]
"""


@pytest.fixture
def state(tmp_path: Path) -> State:
    register_secret(SECRET)
    return State.in_dir(tmp_path / "data")


def _rows(state: State, sql: str) -> list[tuple[object, ...]]:
    # The database file itself, read without SQLAlchemy (and so without any read-side mask).
    with sqlite3.connect(state.url.removeprefix("sqlite:///")) as db:
        return list(db.execute(sql))


def _run_error(state: State, text: str) -> None:
    state.finish_run(state.start_run("cli", "shop"), "failed", error=text)


def _run_summary(state: State, text: str) -> None:
    state.finish_run(state.start_run("cli", "shop"), "succeeded", summary=text)


def _step_start_detail(state: State, text: str) -> None:
    state.start_step(state.start_run("cli"), "health", "web", detail=text)


def _step_end_detail(state: State, text: str) -> None:
    step = state.start_step(state.start_run("cli"), "health", "web")
    state.finish_step(step, "failed", detail=text)


def _step_error(state: State, text: str) -> None:
    step = state.start_step(state.start_run("cli"), "health", "web")
    state.finish_step(step, "failed", error=text)


def _release(state: State, reason: str | None) -> int:
    return state.start_release(
        "web", "a" * 40, "sha256:x", "r@sha256:x", "h", kind="deploy", reason=reason, run_id=None
    )


def _release_reason(state: State, text: str) -> None:
    _release(state, text)


def _release_error(state: State, text: str) -> None:
    state.finish_release(_release(state, None), "rolled_back", text, failure_kind="crashed")


def _superseded_note(state: State, text: str) -> None:
    state.record_superseded("web", "b" * 40, text, run_id=None)


def _pin_reason(state: State, text: str) -> None:
    state.rollbacks.pin_service("web", release_id=1, revision="a" * 40, head=None, reason=text)


def _event_note(state: State, text: str) -> None:
    queue = EventQueue(state)
    event_id, _ = queue.put(source="cli", kind="config")
    queue.finish([event_id], "failed", note=text)


def _stale_run_error(state: State, text: str) -> None:
    # An error set on the ORM object (not through an update statement) is masked too.
    run_id = state.start_run("cli", "shop", owner="gone-host:1")
    with state.session() as s:
        from pipeline.state.schema import Run

        row = s.get(Run, run_id)
        assert row is not None
        row.error = text


WRITES: list[tuple[Callable[[State, str], None], str]] = [
    (_run_error, "SELECT error FROM runs"),
    (_run_summary, "SELECT summary FROM runs"),
    (_step_start_detail, "SELECT detail FROM steps"),
    (_step_end_detail, "SELECT detail FROM steps"),
    (_step_error, "SELECT error FROM steps"),
    (_release_reason, "SELECT reason FROM releases"),
    (_release_error, "SELECT error FROM releases"),
    (_superseded_note, "SELECT reason FROM releases"),
    (_pin_reason, "SELECT reason FROM pins"),
    (_event_note, "SELECT note FROM events"),
    (_stale_run_error, "SELECT error FROM runs"),
]


@pytest.mark.parametrize(("write", "select"), WRITES, ids=[w.__name__ for w, _ in WRITES])
def test_each_write_path_stores_the_secret_masked(
    state: State, write: Callable[[State, str], None], select: str
) -> None:
    """A registered secret and URL credentials written through each state function are stored
    as `***`, the rest of the line kept."""
    write(state, f"{LINE}\n{URL_LINE}")
    stored = [row[0] for row in _rows(state, select)]
    masked = "auth failed for token ***\nfetch of https://***@git.example.com/x.git failed"
    assert stored == [masked]


def test_history_in_another_process_shows_no_stored_secret(state: State, tmp_path: Path) -> None:
    """`pipeline history --json` run in a process that never registered the secret shows the
    failed release's reason and error with `***` in its place."""
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    _release_error(state, LINE)
    _release_reason(state, f"deploy requested: {LINE}")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "history", "web", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    rows = json.loads(result.stdout)
    assert {r["error"] for r in rows} == {None, "auth failed for token ***"}
    assert "deploy requested: auth failed for token ***" in {r["reason"] for r in rows}
