"""Leases: named locks in the state database, held by an owner (host:pid) until an expiry.

A crashed holder's lease is recoverable without a human: it expires, and on this machine a
dead pid frees it at once (`owner_alive_local`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pipeline.errors import LockedError
from pipeline.state.schema import Lock


def default_owner() -> str:
    """Who holds a lease: host and pid, so a dead holder can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive_local(owner: str) -> bool:
    """True when `owner` (host:pid) is a live process on this machine, or on another machine."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's holder: only its expiry frees it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Leases:
    """The leases of one state database (`State.leases`): `engine` tells the SQL dialect,
    `session()` opens one transaction, `clock()` gives epoch seconds."""

    def __init__(
        self,
        engine: Engine,
        session: Callable[[], AbstractContextManager[Session]],
        clock: Callable[[], float],
    ) -> None:
        self.engine, self.session, self.clock = engine, session, clock

    def acquire(self, name: str, owner: str, ttl: float) -> bool:
        """Take the lease `name` for `ttl` seconds if it is free, expired, or already ours."""
        now = self.clock()
        # SQLite and PostgreSQL share this upsert; it is atomic, so two owners never both win.
        insert = postgresql_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        stmt = insert(Lock).values(name=name, owner=owner, expires_at=now + ttl)
        stmt = stmt.on_conflict_do_update(
            index_elements=[Lock.name],
            set_={"owner": owner, "expires_at": now + ttl},
            where=(Lock.expires_at < now) | (Lock.owner == owner),
        )
        with self.session() as s:
            s.execute(stmt)
            held = s.get(Lock, name)
            return held is not None and held.owner == owner

    def release(self, name: str, owner: str) -> None:
        """Give the lease `name` up if `owner` holds it."""
        with self.session() as s:
            s.execute(delete(Lock).where(Lock.name == name, Lock.owner == owner))

    def lock_holder(self, name: str) -> Lock | None:
        """Who holds the lease `name` now; None when it is free or expired."""
        with self.session() as s:
            row = s.get(Lock, name)
            return row if row and row.expires_at >= self.clock() else None

    def break_locks_of(self, owner_alive: Callable[[str], bool]) -> list[str]:
        """Free the leases whose holder process is gone, without waiting for their expiry."""
        with self.session() as s:
            dead = [lk for lk in s.scalars(select(Lock)) if not owner_alive(lk.owner)]
            for lk in dead:
                s.delete(lk)
            return [lk.name for lk in dead]

    @contextmanager
    def lease(self, name: str, owner: str, ttl: float = 600) -> Iterator[None]:
        """Hold `name` for the duration of the block, or raise LockedError naming the holder."""
        if not self.acquire(name, owner, ttl) and (
            not self.break_locks_of(owner_alive_local) or not self.acquire(name, owner, ttl)
        ):
            holder = self.lock_holder(name)
            who = (
                f"{holder.owner}, expires in {holder.expires_at - self.clock():.0f}s"
                if holder
                else "?"
            )
            raise LockedError(f"{name} is locked by {who}")
        try:
            yield
        finally:
            self.release(name, owner)
