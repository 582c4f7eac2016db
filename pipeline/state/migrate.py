"""Bringing a state database to the schema this code expects, with Alembic's migrations.

`upgrade(engine)` runs at every `State` start. At the newest revision it costs one query and
no Alembic import (a CLI command stays quick); otherwise it takes a lock, so two processes
starting together migrate once, and runs `migrations/versions` in order. A database made
before migrations existed (pipeline 0.1: tables but no `alembic_version`) is stamped at the
baseline `0001` first, so its history is kept and upgraded in place.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The newest revision in migrations/versions; tests/state/test_migrate.py checks they agree.
HEAD = "0005"
BASELINE = "0001"  # the schema of pipeline 0.1, the last release before migrations


def current(conn: Connection) -> str | None:
    """The database's Alembic revision, or None when it has no `alembic_version` table."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine) -> None:
    """Migrate the database behind `engine` to HEAD; a no-op (one query) when it is there.

    Raises sqlalchemy errors from the migration itself; nothing is half-applied on SQLite and
    PostgreSQL, whose DDL is transactional."""
    with contextlib.suppress(DBAPIError), engine.connect() as conn:
        if current(conn) == HEAD:
            return
    # Imported here: Alembic costs about half a second of imports, paid only when migrating.
    from alembic import command
    from alembic.config import Config

    with _lock(engine), engine.begin() as conn:
        found = current(conn)
        if found == HEAD:
            return  # another process migrated while we waited for the lock
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        if found is None and inspect(conn).has_table("runs"):
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")


# The key of the PostgreSQL advisory lock migrations are run under (any constant bigint).
_PG_MIGRATION_LOCK = 0x70697065


@contextlib.contextmanager
def _lock(engine: Engine) -> Iterator[None]:
    """Hold a lock while migrating, so instances starting together migrate once: a file lock
    beside a SQLite file; a session advisory lock on PostgreSQL (pg_advisory_lock, released
    when the block ends; PostgreSQL docs, "Advisory Locks"); nothing for an in-memory one."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_MIGRATION_LOCK})
                conn.commit()
        return
    path = engine.url.database
    if engine.url.get_backend_name() != "sqlite" or not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrate.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
