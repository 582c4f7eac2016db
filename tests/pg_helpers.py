"""A throwaway PostgreSQL server for tests: a cluster made by Debian's `initdb` in a temporary
directory, started by `pg_ctl` on a free loopback port (as the `postgres` user when run as
root: PostgreSQL refuses to run as root), stopped and removed afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "pg-test-secret-4711"


def pg_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None when it can."""
    if not (PG_BIN / "initdb").is_file():
        return "PostgreSQL is not installed (apt-get install postgresql)"
    return None


@dataclass(frozen=True)
class PgServer:
    """A running server: superuser `pipeline` (password PASSWORD) on 127.0.0.1:`port`."""

    port: int

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        """The SQLAlchemy URL of `database` (psycopg 3), with or without the password."""
        auth = f"pipeline:{PASSWORD}" if password else "pipeline"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database's name (so each test starts from nothing)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        dsn = f"host=127.0.0.1 port={self.port} user=pipeline password={PASSWORD} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a generated name, not user input
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def pg_server() -> Iterator[PgServer]:
    """Start a throwaway server; stop it and delete its files when the block ends."""
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    data, pwfile = root / "data", root / "pw"
    pwfile.write_text(PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    port = _free_port()
    started = False
    try:
        subprocess.run(
            _as_owner([str(PG_BIN / "initdb"), "-D", str(data), "-U", "pipeline",
                       f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                       "--no-sync"]),
            check=True, capture_output=True,
        )  # fmt: skip
        options = f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off"
        subprocess.run(
            _as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-w",
                       "-l", str(root / "log"), "start"]),
            check=True, capture_output=True,
        )  # fmt: skip
        started = True
        yield PgServer(port)
    finally:
        if started:
            subprocess.run(
                _as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                           "stop"]),
                check=False, capture_output=True,
            )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
