"""The durable event queue: every trigger is a row in the state database before it is acknowledged.

Triggers (webhooks, polls, cron ticks, file events, API calls) only `put`; a worker `claim`s,
runs, and `finish`es; several instances' workers share one PostgreSQL queue, one pass per repo
at a time. Pushes and tags of one repo coalesce: the worker deploys the
newest of a claimed group. A worker killed mid-run leaves its events "working" under its owner;
`requeue_interrupted` puts them back at the next start, so nothing accepted is lost. An event
whose commit the remote does not show yet is `defer`red: queued again, not claimed before its
`not_before` time (unless a newer push of its repo is claimed, which supersedes it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, exists, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from pipeline.config.model import Config
from pipeline.state.schema import Event
from pipeline.state.store import State
from pipeline.timeutil import aware, iso, utc

KINDS = frozenset({"push", "tag", "rebuild", "deploy", "rollback", "config"})
FINAL_STATUSES = frozenset({"done", "failed", "superseded", "ignored"})
# Kinds that mean "the repo moved": only the newest matters, so a group of them is one run.
_COALESCING = ("push", "tag")
# Built once: on every webhook's acknowledgement path, building the statement per call (ORM
# or Core) costs several times the SQLite work itself.
_EVENTS: Table = Event.__table__  # type: ignore[assignment]
_INSERT = insert(_EVENTS).returning(_EVENTS.c.id)
# The key of the advisory lock PostgreSQL claims are made under (any constant bigint).
_PG_CLAIM_LOCK = 0x636C61696D
_DEPTH = select(func.count()).select_from(_EVENTS).where(_EVENTS.c.status == "queued")


@dataclass(frozen=True)
class QueuedEvent:
    """One claimed trigger, as the worker sees it."""

    id: int
    source: str
    repo: str | None
    kind: str
    ref: str | None
    sha: str | None
    subject: str | None
    delivery_id: str | None
    received_at: datetime


def _queued(row: Event) -> QueuedEvent:
    return QueuedEvent(
        id=row.id,
        source=row.source,
        repo=row.repo,
        kind=row.kind,
        ref=row.ref,
        sha=row.sha,
        subject=row.subject,
        delivery_id=row.delivery_id,
        received_at=aware(row.received_at),
    )


class EventQueue:
    """Events table as a queue; safe to share between the server's threads and the worker."""

    def __init__(self, state: State) -> None:
        self.state = state
        # Writers in this process take turns here rather than in SQLite's busy handler, whose
        # back-off sleeps (up to 100 ms) would dominate a webhook's acknowledgement time.
        self._write = threading.Lock()

    def put(
        self,
        *,
        source: str,
        kind: str,
        repo: str | None = None,
        ref: str | None = None,
        sha: str | None = None,
        subject: str | None = None,
        delivery_id: str | None = None,
        payload: str | None = None,
    ) -> tuple[int, bool]:
        """Persist (committed) a queued event; return (id, True), or (existing id, False) when
        this (source, delivery_id) was seen before, in which case nothing is queued."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r} (one of {', '.join(sorted(KINDS))})")
        values = {
            "source": source,
            "delivery_id": delivery_id,
            "repo": repo,
            "kind": kind,
            "ref": ref,
            "sha": sha,
            "subject": subject,
            "payload": payload,
            "status": "queued",
            "received_at": self.state.now(),
        }
        with self._write:
            try:
                with self.state.engine.begin() as conn:
                    return int(conn.execute(_INSERT, values).scalar_one()), True
            except IntegrityError:
                # Redeliveries are rare, so the unique constraint detects them rather than a
                # select before every insert; it also covers another process storing it first.
                seen = self._find_delivery(source, delivery_id) if delivery_id else None
                if seen is None:
                    raise
                return seen, False

    def _find_delivery(self, source: str, delivery_id: str) -> int | None:
        with self.state.session() as s:
            return s.scalars(
                select(Event.id).where(Event.source == source, Event.delivery_id == delivery_id)
            ).first()

    def claim(self, owner: str) -> list[QueuedEvent]:
        """Mark the oldest queued event that is due (not deferred past now) and whose repo no
        pass is working on, and every queued push/tag of the same repo when it is one (deferred
        ones too: the newest supersedes them), "working" under `owner`; return them oldest
        first ([] when nothing is due).

        Several instances may claim at once: rows are selected `FOR UPDATE SKIP LOCKED` on
        PostgreSQL (PostgreSQL docs, SELECT "The Locking Clause"), under a transaction-scoped
        advisory lock so that each claim sees the ones before it and a repo has one pass at a
        time cluster-wide; SQLite has one writer at a time and ignores the locking clause."""
        with self._write, self.state.session() as s:
            if self.state.engine.dialect.name == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_CLAIM_LOCK})
            due = or_(Event.not_before.is_(None), Event.not_before <= self.state.now())
            working = aliased(Event)
            # A repo-less event (a config change) runs a pass over every repo: it waits for
            # every pass, and every pass waits for it.
            busy = exists().where(
                working.status == "working",
                or_(working.repo == Event.repo, working.repo.is_(None), Event.repo.is_(None)),
            )
            first = s.scalars(
                select(Event)
                .where(Event.status == "queued", due, ~busy)
                .order_by(Event.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if first is None:
                return []
            ids = [first.id]
            if first.kind in _COALESCING and first.repo is not None:
                ids = list(
                    s.scalars(
                        select(Event.id)
                        .where(
                            Event.status == "queued",
                            Event.repo == first.repo,
                            Event.kind.in_(_COALESCING),
                        )
                        .order_by(Event.id)
                        .with_for_update(skip_locked=True)
                    )
                )
            # The status guard makes the claim safe against another process claiming the same
            # rows between the select and this update: only rows still queued become ours.
            s.execute(
                update(Event)
                .where(Event.id.in_(ids), Event.status == "queued")
                .values(status="working", owner=owner, not_before=None)
                .execution_options(synchronize_session=False)
            )
            rows = s.scalars(
                select(Event)
                .where(Event.id.in_(ids), Event.status == "working", Event.owner == owner)
                .order_by(Event.id)
                .execution_options(populate_existing=True)
            )
            return [_queued(r) for r in rows]

    def finish(
        self,
        ids: Sequence[int],
        status: str,
        *,
        run_id: int | None = None,
        note: str | None = None,
    ) -> None:
        """Close events with a final status: done, failed, superseded or ignored."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"unknown final status {status!r} (one of {sorted(FINAL_STATUSES)})")
        if not ids:
            return
        with self._write, self.state.session() as s:
            s.execute(
                update(Event)
                .where(Event.id.in_(list(ids)))
                .values(
                    status=status,
                    finished_at=self.state.now(),
                    run_id=run_id,
                    note=note or None,
                    owner=None,
                )
                .execution_options(synchronize_session=False)
            )

    def defer(self, event_id: int, until: float, note: str) -> None:
        """Put claimed event `event_id` back in the queue, not to be claimed before `until`
        (epoch seconds) unless a newer push of its repo is; `note` says what it waits for."""
        with self._write, self.state.session() as s:
            s.execute(
                update(Event)
                .where(Event.id == event_id)
                .values(status="queued", owner=None, not_before=utc(until), note=note)
                .execution_options(synchronize_session=False)
            )

    def next_due_in(self) -> float | None:
        """Seconds until the earliest deferred event is due (0 when one is), None when no
        queued event is deferred."""
        when = self._of_queued(func.min(_EVENTS.c.not_before))
        if when is None:
            return None
        return max(0.0, (when - self.state.now()).total_seconds())

    def _of_queued(self, aggregate: Any) -> datetime | None:
        """A time aggregated over the queued events (`func.max(column)`), None if none."""
        with self.state.engine.connect() as conn:
            value = conn.execute(select(aggregate).where(_EVENTS.c.status == "queued"))
            return aware(value.scalar_one())

    def newer_waiting(self, repo: str, than_id: int) -> bool:
        """True when a push or tag of `repo` is queued with an id above `than_id`."""
        with self.state.session() as s:
            found = s.scalars(
                select(Event.id)
                .where(
                    Event.status == "queued",
                    Event.repo == repo,
                    Event.kind.in_(_COALESCING),
                    Event.id > than_id,
                )
                .limit(1)
            ).first()
            return found is not None

    def waiting_shas(
        self, repo: str, than_id: int, *, ignore_source: str | None = None
    ) -> list[str | None]:
        """The commits (None: not known) of pushes and tags of `repo` queued above `than_id`,
        except those queued by `ignore_source`."""
        return [
            sha for sha, _ in self.waiting_revisions(repo, than_id, ignore_source=ignore_source)
        ]

    def waiting_revisions(
        self, repo: str, than_id: int, *, ignore_source: str | None = None
    ) -> list[tuple[str | None, str | None]]:
        """(commit, ref) of the pushes and tags of `repo` queued above `than_id`, oldest first,
        except those queued by `ignore_source`; either may be None (a release names a tag and
        no commit, a retry a commit and no ref)."""
        query = select(Event.sha, Event.ref).where(
            Event.status == "queued",
            Event.repo == repo,
            Event.kind.in_(_COALESCING),
            Event.id > than_id,
        )
        if ignore_source is not None:
            query = query.where(Event.source != ignore_source)
        with self.state.session() as s:
            return [(sha, ref) for sha, ref in s.execute(query.order_by(Event.id))]

    def quiet_for(self) -> float | None:
        """Seconds since the newest queued event arrived; None when nothing waits."""
        received = self._of_queued(func.max(_EVENTS.c.received_at))
        if received is None:
            return None
        return max(0.0, (self.state.now() - received).total_seconds())

    def depth(self) -> int:
        """How many events wait to be claimed."""
        with self.state.engine.connect() as conn:
            return int(conn.execute(_DEPTH).scalar_one())

    def requeue_interrupted(self, owner_alive: Callable[[str], bool]) -> int:
        """Put events left "working" by a dead (or no) owner back in the queue; return how many."""
        with self._write, self.state.session() as s:
            working = list(
                s.execute(select(Event.id, Event.owner).where(Event.status == "working"))
            )
            dead = [i for i, owner in working if owner is None or not owner_alive(owner)]
            if dead:
                s.execute(
                    update(Event)
                    .where(Event.id.in_(dead), Event.status == "working")
                    .values(status="queued", owner=None)
                    .execution_options(synchronize_session=False)
                )
            return len(dead)

    def get(self, event_id: int) -> Event:
        """The event row `event_id`; raises LookupError when there is none."""
        with self.state.session() as s:
            row = s.get(Event, event_id)
        if row is None:
            raise LookupError(f"event {event_id} does not exist")
        return row

    def newest_push(self, repo: str) -> Event | None:
        """The newest push or tag event of `repo`, in any status; None when it has none."""
        with self.state.session() as s:
            return s.scalars(
                select(Event)
                .where(Event.repo == repo, Event.kind.in_(_COALESCING))
                .order_by(Event.id.desc())
                .limit(1)
            ).first()

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest events, newest first, as plain data for the API (payloads left out)."""
        with self.state.session() as s:
            rows = list(s.scalars(select(Event).order_by(Event.id.desc()).limit(limit)))
        return [_event_dict(r) for r in rows]


def _event_dict(row: Event) -> dict[str, Any]:
    return {
        "id": row.id,
        "source": row.source,
        "repo": row.repo,
        "kind": row.kind,
        "ref": row.ref,
        "sha": row.sha,
        "subject": row.subject,
        "delivery_id": row.delivery_id,
        "status": row.status,
        "owner": row.owner,
        "run_id": row.run_id,
        "received_at": iso(row.received_at),
        "finished_at": iso(row.finished_at),
        "note": row.note,
        "not_before": iso(row.not_before),
    }


# A revision or rollback target a person sends reaches git and docker later: refuse anything
# that could be read as an option or walk a path.
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$"


class RequestError(ValueError):
    """A person's request names no service (or image) of the config; nothing was queued."""


def queue_request(
    queue: EventQueue,
    cfg: Config,
    kind: str,
    name: str,
    target: str | None = None,
    *,
    source: str,
) -> int:
    """Queue what a person asked for through the API or the dashboard (`source`): "deploy"
    service `name` at `target` (a revision; None: the followed head), "rollback" it to
    `target` (a release or revision; None: the previous release), or "rebuild" image `name`.
    The worker runs it as it runs every event. Returns the event's id; raises RequestError
    when `name` is not in the config's [services] (or [images] for a rebuild)."""
    if kind == "rebuild":
        image = cfg.images.get(name)
        if image is None:
            raise RequestError(f"unknown image {name!r}: not in [images]")
        repo: str | None = image.repo
    else:
        svc = cfg.services.get(name)
        if svc is None:
            raise RequestError(f"unknown service {name!r}: not in [services]")
        owner = cfg.images.get(svc.image)
        repo = owner.repo if owner else None
    event_id, _ = queue.put(source=source, kind=kind, repo=repo, subject=name, sha=target)
    return event_id
