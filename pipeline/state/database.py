"""Which database holds the state: `[pipeline] database` (PostgreSQL, shared by several
`pipeline serve` instances) or SQLite in `data_dir`, opened through one SQLAlchemy code path.

The password comes only from `database_password_env` / `database_password_file` (registered
as a secret, so redaction masks it) and never appears in a message: errors name the URL
rendered with `***` for its password.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from pipeline.config.load import LoadedConfig, read_secret
from pipeline.errors import ConfigError, PipelineError
from pipeline.state import migrate
from pipeline.state.store import State


class DatabaseError(PipelineError):
    """The state database cannot be reached or migrated; the message names the URL with its
    password masked."""


def database_url(loaded: LoadedConfig) -> URL:
    """The SQLAlchemy URL of the state database: `[pipeline] database` with its password from
    `database_password_env`/`_file` and the psycopg (v3) driver for `postgresql://`; else
    `sqlite:///DATA_DIR/state.db` (the directory made). Raises ConfigError for an unreadable
    password file, DatabaseError for a URL SQLAlchemy cannot parse."""
    section = loaded.model.pipeline
    if not section.database:
        loaded.data_dir.mkdir(parents=True, exist_ok=True)
        return make_url(f"sqlite:///{loaded.data_dir / 'state.db'}")
    try:
        url = make_url(section.database)
    except ArgumentError:
        raise DatabaseError(f"{loaded.locate('pipeline', 'database')}: pipeline.database: "
                            "not a database URL") from None  # fmt: skip
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    password = read_secret(
        section.database_password_env, section.database_password_file, loaded.base_dir
    )
    if password is None and section.database_password_env and not section.database_password_file:
        # Said here, not as the server's "no password supplied" after a connection attempt.
        raise ConfigError([
            f"{loaded.locate('pipeline', 'database_password_env')}: "
            f"pipeline.database_password_env: the variable {section.database_password_env} "
            "is not set"
        ])  # fmt: skip
    if password:
        url = url.set(password=password)
    return url


def shown(url: URL) -> str:
    """`url` as messages show it: its password (if any) as `***`."""
    return url.render_as_string(hide_password=True)


def open_state(loaded: LoadedConfig, *, clock: Callable[[], float] = time.time) -> State:
    """The state of `loaded`'s database, migrated to the newest schema (see `database_url`).

    Raises DatabaseError naming the (masked) URL when it cannot be reached or migrated."""
    url = database_url(loaded)
    try:
        return State(url, clock=clock)
    except SQLAlchemyError as exc:
        raise _failed(url, exc) from None


def _failed(url: URL, exc: SQLAlchemyError) -> DatabaseError:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return DatabaseError(f"state database {shown(url)}: {reason}")


def revision(loaded: LoadedConfig) -> tuple[str, str | None]:
    """(the database's URL as shown, its Alembic revision: None when it has no schema yet or
    one made before migrations), read without changing anything. Raises DatabaseError."""
    url = database_url(loaded)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return shown(url), migrate.current(conn)
    except SQLAlchemyError as exc:
        raise _failed(url, exc) from None
    finally:
        engine.dispose()


def upgrade(loaded: LoadedConfig) -> tuple[str, str | None, str]:
    """Migrate the database to the newest schema (`migrate.HEAD`), keeping its records;
    return (URL as shown, revision before, revision after). Raises DatabaseError."""
    url = database_url(loaded)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            before = migrate.current(conn)
        migrate.upgrade(engine)
        with engine.connect() as conn:
            after = migrate.current(conn) or "?"
        return shown(url), before, after
    except SQLAlchemyError as exc:
        raise _failed(url, exc) from None
    finally:
        engine.dispose()
