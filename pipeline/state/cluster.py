"""Several `pipeline serve` instances on one database: who is alive, and timed jobs that fire
once per interval for all of them.

Each instance heartbeats its `instances` row every `HEARTBEAT` seconds; one whose heartbeat is
older than `INSTANCE_TTL` is dead (`Cluster.owner_alive`), so its events, runs, leases and
interrupted rollouts are taken over by a live instance within 10 s of its death. A poll or
cron tick first claims its interval's slot (`claim_slot`): an atomic upsert that only one
instance wins, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pipeline.state.leases import owner_alive_local, process_of
from pipeline.state.schema import Instance, ScheduleSlot, upsert_insert
from pipeline.timeutil import iso, utc

HEARTBEAT = 2.0  # seconds between an instance's heartbeats
# An instance silent this long is dead: four missed heartbeats, and with the worker's 1 s look
# for dead owners, its work is taken over within 10 s of its death.
INSTANCE_TTL = 8.0
# Rows of instances dead this long are dropped from `instances` (and from GET /api/instances).
FORGET_AFTER = 3600.0


class Cluster:
    """The instances of one state database (`State.cluster`): `engine` tells the dialect,
    `session()` opens one transaction, `clock()` gives epoch seconds, `now()` a UTC datetime."""

    def __init__(
        self,
        engine: Engine,
        session: Callable[[], AbstractContextManager[Session]],
        clock: Callable[[], float],
        now: Callable[[], datetime],
    ) -> None:
        self.engine, self.session, self.clock, self.now = engine, session, clock, now

    def _insert(self) -> Any:
        return upsert_insert(self.engine)

    def heartbeat(self, owner: str, url: str | None = None) -> None:
        """Record that instance `owner` (host:pid) is alive now, serving its API at `url`."""
        stmt = self._insert()(Instance).values(
            owner=owner, url=url, started_at=self.now(), heartbeat_at=self.clock()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[Instance.owner], set_={"heartbeat_at": self.clock(), "url": url}
        )
        with self.session() as s:
            s.execute(stmt)

    def leave(self, owner: str) -> None:
        """Remove instance `owner` (it stops cleanly)."""
        with self.session() as s:
            s.execute(delete(Instance).where(Instance.owner == owner))

    def heartbeats(self) -> dict[str, float]:
        """owner -> last heartbeat (epoch seconds) of every instance recorded."""
        with self.session() as s:
            rows = s.execute(select(Instance.owner, Instance.heartbeat_at))
            return {owner: float(beat) for owner, beat in rows}

    def instances(self) -> list[dict[str, Any]]:
        """Every instance heard of in the last hour, as the API shows it: owner, url,
        started_at, heartbeat_at (ISO 8601), seconds since that heartbeat, and alive (heard
        within INSTANCE_TTL). Older rows are deleted."""
        now = self.clock()
        with self.session() as s:
            s.execute(delete(Instance).where(Instance.heartbeat_at < now - FORGET_AFTER))
            rows = list(s.scalars(select(Instance).order_by(Instance.started_at)))
        return [
            {
                "owner": r.owner,
                "url": r.url,
                "started_at": iso(r.started_at),
                "heartbeat_at": iso(utc(r.heartbeat_at)),
                "heartbeat_age": round(now - r.heartbeat_at, 3),
                "alive": now - r.heartbeat_at <= INSTANCE_TTL,
            }
            for r in rows
        ]

    def owner_alive(self) -> Callable[[str], bool]:
        """A liveness test of owners (host:pid) as of now: dead when its process is gone from
        this machine (`owner_alive_local`), or when it is an instance whose last heartbeat is
        older than INSTANCE_TTL; a CLI process elsewhere (no row) counts as alive: only its
        leases' expiry frees what it holds."""
        beats, now = self.heartbeats(), self.clock()

        def alive(owner: str) -> bool:
            if not owner_alive_local(owner):
                return False
            beat = beats.get(process_of(owner))
            return beat is None or now - beat <= INSTANCE_TTL

        return alive

    def claim_slot(self, name: str, interval: float, owner: str) -> bool:
        """Claim the current `interval`-second slot (epoch seconds // interval) of timed job
        `name` for `owner`; True for exactly one caller per slot across every instance, False
        when the slot was claimed already. The upsert is atomic (ON CONFLICT … WHERE)."""
        slot = math.floor(self.clock() / interval)
        stmt = self._insert()(ScheduleSlot).values(name=name, slot=slot, owner=owner)
        stmt = stmt.on_conflict_do_update(
            index_elements=[ScheduleSlot.name],
            set_={"slot": slot, "owner": owner},
            where=ScheduleSlot.slot < slot,
        )
        with self.session() as s:
            # RETURNING yields the row only when it was inserted or updated (not skipped).
            return s.execute(stmt.returning(ScheduleSlot.name)).first() is not None

    def last_slot(self, name: str) -> int | None:
        """The last slot of timed job `name` that an instance claimed (`claim_slot`: epoch
        seconds // its interval at the claim), or None when none was ever claimed. The job
        ran once inside that slot, whether it found anything to do or not."""
        with self.session() as s:
            row = s.get(ScheduleSlot, name)
            return row.slot if row is not None else None
