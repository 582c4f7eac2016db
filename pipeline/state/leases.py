"""Leases: named locks in the state database, held by an owner (host:pid) until an expiry.

A lease lives exactly as long as its holder: it expires `LEASE_TTL` seconds after its last
renewal, a heartbeat thread renews it every third of that while it is held, and on this machine
a dead pid frees it at once (`owner_alive_local`). A holder whose renewal finds another owner
has lost it (`HeldLease.lost`) and must stop at its next step boundary.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import structlog
from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pipeline.errors import LockedError
from pipeline.state.schema import Lock, upsert_insert

log = structlog.get_logger(__name__)

# Seconds a lease outlives its holder's last renewal; the heartbeat renews every third of it,
# so two missed renewals in a row are survived, and a holder stuck longer loses the lease. Under
# 10 s, so a lease of an instance that died on another machine is free within 10 s.
LEASE_TTL = 9.0


class LeaseLost(LockedError):
    """The lease was taken by another owner while we held it (a renewal found it gone): stop at
    the next step boundary and undo; another holder may be working on the same thing."""


def default_owner() -> str:
    """Who holds a lease: host and pid, so a dead holder can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_of(owner: str) -> str:
    """The process ("HOST:PID") an owner is: itself, or "HOST:PID" of "HOST:PID/TAG", an owner
    of its own that a process gives work it runs beside its other work (a rollback a command
    handed to `pipeline serve`), so that the two never share a lease; it lives and dies with
    the process."""
    return owner.partition("/")[0]


def owner_alive_local(owner: str) -> bool:
    """True when `owner` (host:pid, or host:pid/tag: `process_of`) is a live process on this
    machine, or on another machine."""
    host, _, pid = process_of(owner).rpartition(":")
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
        insert = upsert_insert(self.engine)
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

    def renew(self, name: str, owner: str, ttl: float) -> bool:
        """Extend `owner`'s lease `name` to `ttl` seconds from now; False when `owner` does not
        hold it (any more)."""
        with self.session() as s:
            result = s.execute(
                update(Lock)
                .where(Lock.name == name, Lock.owner == owner)
                .values(expires_at=self.clock() + ttl)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def release(self, name: str, owner: str) -> None:
        """Give the lease `name` up if `owner` holds it."""
        with self.session() as s:
            s.execute(delete(Lock).where(Lock.name == name, Lock.owner == owner))

    def lock_holder(self, name: str) -> Lock | None:
        """Who holds the lease `name` now; None when it is free or expired."""
        with self.session() as s:
            row = s.get(Lock, name)
            return row if row and row.expires_at >= self.clock() else None

    def held(self) -> list[Lock]:
        """Every lease held now (expired ones left out), by name."""
        with self.session() as s:
            rows = s.scalars(
                select(Lock).where(Lock.expires_at >= self.clock()).order_by(Lock.name)
            )
            return list(rows)

    def force_release(self, name: str) -> str | None:
        """Free the lease `name` whoever holds it (a human decided: `pipeline lock release`);
        return the owner it was taken from, None when it was free. The holder, if alive, finds
        it lost at its next renewal (`HeldLease.lost`) and stops at its next step boundary."""
        with self.session() as s:
            row = s.get(Lock, name)
            if row is None:
                return None
            owner = row.owner
            s.delete(row)
            return owner

    def break_locks_of(self, owner_alive: Callable[[str], bool]) -> list[str]:
        """Free the leases whose holder process is gone, without waiting for their expiry."""
        with self.session() as s:
            dead = [lk for lk in s.scalars(select(Lock)) if not owner_alive(lk.owner)]
            for lk in dead:
                s.delete(lk)
            return [lk.name for lk in dead]

    @contextmanager
    def waiting(
        self,
        name: str,
        owner: str,
        *,
        ttl: float = 60.0,
        timeout: float = 60.0,
        sleep: Callable[[float], None],
    ) -> Iterator[None]:
        """Hold `name` for a short critical section (no heartbeat: the block must end within
        `ttl` seconds), waiting up to `timeout` seconds while another owner holds it; a dead
        local holder's lease is freed at once. Raises LockedError naming the holder when the
        wait runs out. Used where two processes (a CLI deploy beside `pipeline serve`, or
        several instances on one database) read-modify-write one shared thing."""
        deadline = self.clock() + timeout
        while not self.acquire(name, owner, ttl):
            if self.break_locks_of(owner_alive_local):
                continue
            if self.clock() >= deadline:
                holder = self.lock_holder(name)
                raise LockedError(
                    f"{name} is locked by {holder.owner if holder else '?'}; waited {timeout:g}s"
                )
            sleep(0.05)
        try:
            yield
        finally:
            self.release(name, owner)

    @contextmanager
    def lease(
        self,
        name: str,
        owner: str,
        ttl: float = LEASE_TTL,
        *,
        heartbeat: bool = True,
        wait: Callable[[threading.Event, float], bool] | None = None,
    ) -> Iterator[HeldLease]:
        """Hold `name` for the duration of the block, or raise LockedError naming the holder.

        While held, a heartbeat thread renews it every `ttl`/3 (`wait(stop, seconds)` paces it;
        default `stop.wait`); `heartbeat=False` leaves renewals to the caller (`beat()`)."""
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
        held = HeldLease(self, name, owner, ttl)
        if heartbeat:
            held.start(wait)
        try:
            yield held
        finally:
            held.stop()
            if not held.lost:  # a lost lease is someone else's now
                self.release(name, owner)


class HeldLease:
    """A lease while its block runs: `beat()` renews it once, the heartbeat thread calls it every
    ttl/3, `lost` tells whether another owner took it, `check()` raises LeaseLost if so."""

    def __init__(self, leases: Leases, name: str, owner: str, ttl: float) -> None:
        self.leases, self.name, self.owner, self.ttl = leases, name, owner, ttl
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def beat(self) -> bool:
        """Renew the lease for another ttl; False (and `lost` from then on) when it has another
        owner now. A database error is logged and counts as a missed beat, not a loss."""
        if self.lost:
            return False
        try:
            if self.leases.renew(self.name, self.owner, self.ttl):
                return True
        except Exception as exc:  # the next beat may succeed; the expiry bounds the damage
            log.warning("lease.renew_failed", lease=self.name, error=str(exc))
            return True
        holder = self.leases.lock_holder(self.name)
        log.error("lease.lost", lease=self.name, owner=self.owner,
                  holder=holder.owner if holder else None)  # fmt: skip
        self._lost.set()
        return False

    def check(self) -> None:
        """Raise LeaseLost when the lease went to another owner (call at step boundaries)."""
        if self.lost:
            holder = self.leases.lock_holder(self.name)
            raise LeaseLost(
                f"{self.name}: lease lost to {holder.owner if holder else 'another owner'}"
                " while held; stopping"
            )

    def start(self, wait: Callable[[threading.Event, float], bool] | None = None) -> None:
        pause = wait or (lambda stop, seconds: stop.wait(seconds))

        def loop() -> None:
            while not pause(self._stop, self.ttl / 3):
                if not self.beat():
                    return

        self._thread = threading.Thread(target=loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
