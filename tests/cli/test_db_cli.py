"""`pipeline db current` and `pipeline db upgrade`: the state database's schema version, and a
database made by the previous release upgraded in place with its history kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.state import migrate
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

# Made by pipeline at schema 0004 (the release before several instances): one succeeded run,
# one succeeded release of web and one handled webhook event.
PREVIOUS = Path(__file__).resolve().parents[1] / "fixtures" / "state" / "pipeline-0004.db"

CONFIG = '[pipeline]\ndata_dir = "data"\n'


def _pipeline(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "-c", str(tmp_path / "pipeline.toml")],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def test_db_upgrade_keeps_the_history_of_a_previous_release_database(tmp_path: Path) -> None:
    """A state.db from before this change shows 0004 in `pipeline db current`, is upgraded by
    `pipeline db upgrade` to the newest schema, and its release and event history reads back
    unchanged."""
    (tmp_path / "pipeline.toml").write_text(CONFIG)
    (tmp_path / "data").mkdir()
    shutil.copy(PREVIOUS, tmp_path / "data" / "state.db")

    before = _pipeline(tmp_path, "db", "current", "--json")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["revision"] == "0004"

    upgraded = _pipeline(tmp_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from 0004 to {migrate.HEAD}" in upgraded.stdout

    state = State.in_dir(tmp_path / "data")
    with state.engine.connect() as conn:
        assert migrate.current(conn) == migrate.HEAD
    (release,) = state.releases("web")
    assert (release.service, release.revision, release.status, release.reason) == (
        "web",
        "b" * 40,
        "succeeded",
        "image web rebuilt",
    )
    (run,) = state.runs()
    assert (run.status, run.summary) == ("succeeded", "web deployed")
    (event,) = EventQueue(state).recent()
    assert (event["delivery_id"], event["status"], event["run_id"]) == ("gh-1", "done", run.id)


def test_db_current_names_an_unreachable_database_without_its_password(tmp_path: Path) -> None:
    """A PostgreSQL database that cannot be reached makes `pipeline db current` exit 1 with a
    message naming the URL with its password masked, never the password itself."""
    (tmp_path / "pipeline.toml").write_text(
        '[pipeline]\ndatabase = "postgresql://pipeline@127.0.0.1:9/pipeline"\n'
        'database_password_env = "PIPELINE_TEST_DB_PASSWORD"\n'
    )
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "db", "current", "-c", str(tmp_path / "pipeline.toml")],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "PIPELINE_TEST_DB_PASSWORD": "s3cret-db-pass-99"},
    )  # fmt: skip
    assert res.returncode == 1
    assert "postgresql+psycopg://***@127.0.0.1:9/pipeline" in res.stderr
    assert "s3cret-db-pass-99" not in res.stdout + res.stderr


def test_commands_say_in_one_line_why_the_database_is_out_of_reach(tmp_path: Path) -> None:
    """With the password variable unset, every command that opens the state database says so
    at the key (exit 2); with a server that does not answer, one line naming the masked URL
    (exit 1); never a traceback, never the password."""
    (tmp_path / "pipeline.toml").write_text(
        '[pipeline]\ndata_dir = "data"\n'
        'database = "postgresql://pipeline@127.0.0.1:9/pipeline"\n'
        'database_password_env = "PIPELINE_TEST_DB_PASSWORD"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_TEST_DB_PASSWORD"}
    for command in (["status"], ["history"], ["lock", "status"]):
        unset = subprocess.run(
            [sys.executable, "-m", "pipeline", *command, "-c", str(tmp_path / "pipeline.toml")],
            capture_output=True, text=True, check=False, timeout=60, env=env,
        )  # fmt: skip
        assert unset.returncode == 2, (command, unset.stderr)
        assert "Traceback" not in unset.stderr
        assert "pipeline.toml:4: pipeline.database_password_env" in unset.stderr
        assert "PIPELINE_TEST_DB_PASSWORD is not set" in unset.stderr
    env["PIPELINE_TEST_DB_PASSWORD"] = "s3cret-db-pw"
    down = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", "-c", str(tmp_path / "pipeline.toml")],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert down.returncode == 1, down.stderr
    assert "Traceback" not in down.stderr and "s3cret-db-pw" not in down.stderr
    assert "127.0.0.1:9" in down.stderr and len(down.stderr.strip().splitlines()) <= 2
