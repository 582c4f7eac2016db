"""The state database's schema migrations (Alembic): a database made by the previous release is
upgraded in place with its history kept, a new one starts at the newest revision."""

from __future__ import annotations

import shutil
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from pipeline.state import migrate
from pipeline.state.store import State

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "state" / "pipeline-0.1.db"


def test_head_constant_is_the_newest_migration() -> None:
    """`migrate.HEAD` (the fast path's check) names the one head of migrations/versions, so a
    new migration cannot be skipped by a stale constant."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrate.MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_heads() == [migrate.HEAD]


def test_previous_release_database_is_upgraded_with_its_history(tmp_path: Path) -> None:
    """A state.db written by pipeline 0.1 (no alembic_version table) gains the new tables and
    columns, and its runs and releases are still there, readable through State."""
    db = tmp_path / "state.db"
    shutil.copy(FIXTURE, db)
    state = State(f"sqlite:///{db}")
    with state.engine.connect() as conn:
        assert migrate.current(conn) == migrate.HEAD
        tables = set(inspect(conn).get_table_names())
        columns = {c["name"] for c in inspect(conn).get_columns("releases")}
    assert {"release_hosts", "release_settings", "pins"} <= tables
    assert "failure_kind" in columns
    (release,) = state.releases("web")
    assert (release.status, release.revision, release.reason) == (
        "succeeded",
        "a" * 40,
        "image web rebuilt",
    )
    assert state.runs()[0].status == "succeeded"


def test_new_database_starts_at_head_and_reopens_without_migrating(tmp_path: Path) -> None:
    """A fresh database is created at the newest revision; opening it again finds it there."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    State(url).engine.dispose()
    state = State(url)
    with state.engine.connect() as conn:
        assert migrate.current(conn) == migrate.HEAD
