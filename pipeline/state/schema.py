"""Tables of the state database: runs, steps, builds, releases, deployments, leases, events.

Every column of text a person reads later (errors, step details, summaries, reasons, notes) is
`RedactedText`: secrets are masked as the value is written, whichever function writes it, so
no later reader (the API, `pipeline history` in a process that never saw the secret) can show
one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from pipeline.redact import redact


class RedactedText(TypeDecorator[str]):
    """TEXT whose every written value passes through `pipeline.redact.redact` (URL credentials
    and registered secrets become `***`): in ORM inserts and updates and in Core `update()` /
    `insert()` values alike, as SQLAlchemy binds them (its TypeDecorator.process_bind_param).

    Only for text shown to people: a value read back to act on (settings, digests, refs) must
    stay exact, so it keeps plain Text/String."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return redact(value) if isinstance(value, str) and value else value


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One pass of work: triggered by the CLI, a poll, a webhook, a hook, a schedule or the API."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(32))
    repo: Mapped[str | None] = mapped_column(String(128))
    revision: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # running|succeeded|failed|noop|interrupted
    owner: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(RedactedText)
    summary: Mapped[str | None] = mapped_column(RedactedText)


class Step(Base):
    """One step of a run, written before it starts and again when it ends."""

    __tablename__ = "steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # fetch|plan|build|push|pull|start|health|...
    subject: Mapped[str | None] = mapped_column(String(128))  # image or service name
    host: Mapped[str | None] = mapped_column(String(128))
    revision: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # running|succeeded|failed|skipped
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    detail: Mapped[str | None] = mapped_column(RedactedText)
    error: Mapped[str | None] = mapped_column(RedactedText)


class BuildRow(Base):
    """A successful build of an image: what `planner.ImageRecord` is read from."""

    __tablename__ = "builds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image: Mapped[str] = mapped_column(String(128), index=True)
    revision: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(160))
    ref: Mapped[str] = mapped_column(Text)  # what hosts pull: registry/image@digest, or image id
    spec_hash: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Release(Base):
    """One rollout of a service to all its hosts: the history users read."""

    __tablename__ = "releases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service: Mapped[str] = mapped_column(String(128), index=True)
    revision: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(160))
    ref: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # deploy|rollback
    reason: Mapped[str | None] = mapped_column(RedactedText)
    # running|succeeded|failed|rolled_back|superseded|interrupted
    status: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(RedactedText)
    # unhealthy|crashed|infrastructure|interrupted: decides whether the revision is retried
    failure_kind: Mapped[str | None] = mapped_column(String(16))
    # A rollback: the release whose image and settings it brought back (its id, not a digest)
    restores: Mapped[int | None] = mapped_column(Integer)


class ReleaseHost(Base):
    """One host of a release's rollout, written before the host is touched: the container it
    returns to on undo (`previous_*`), the new container once created, and the step reached.

    Crash recovery reads these rows, not what happens to run on the host."""

    __tablename__ = "release_hosts"
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), primary_key=True)
    host: Mapped[str] = mapped_column(String(128), primary_key=True)
    # planned|pulled|stopped_old|started|checked|switched|retired|undone
    phase: Mapped[str] = mapped_column(String(16))
    previous_container: Mapped[str | None] = mapped_column(String(80))
    previous_running: Mapped[bool | None] = mapped_column()
    previous_revision: Mapped[str | None] = mapped_column(String(64))
    previous_digest: Mapped[str | None] = mapped_column(String(160))
    new_container: Mapped[str | None] = mapped_column(String(80))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReleaseSettings(Base):
    """The service's settings as a release deployed them (JSON: the `[services.NAME]` table and
    its env file's text), so a rollback restores them. Never shown in history or the API."""

    __tablename__ = "release_settings"
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), primary_key=True)
    settings: Mapped[str] = mapped_column(Text)


class Pin(Base):
    """A service held on a release (after `pipeline rollback`) until a newer commit or an
    explicit `pipeline deploy`; passes leave a pinned service alone."""

    __tablename__ = "pins"
    service: Mapped[str] = mapped_column(String(128), primary_key=True)
    release_id: Mapped[int] = mapped_column(Integer)
    revision: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(RedactedText)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The head commit of the service's repo when the pin was made; another head releases it.
    head: Mapped[str | None] = mapped_column(String(64))


class Deployment(Base):
    """What runs for a service on a host now, as pipeline last left it."""

    __tablename__ = "deployments"
    service: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(128), primary_key=True)
    revision: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(160))
    ref: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    container_id: Mapped[str | None] = mapped_column(String(80))
    release_id: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Lock(Base):
    """A lease: held by `owner` until `expires_at`; an expired lease is free for the next owner."""

    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    owner: Mapped[str] = mapped_column(String(160))
    expires_at: Mapped[float] = mapped_column()


class Event(Base):
    """A trigger, persisted before it is acknowledged; the runner works them off in order."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("source", "delivery_id", name="uq_event_delivery"),
        Index("ix_events_status", "status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # poll|webhook|hook|cron|watch|api|cli|recover|retry
    source: Mapped[str] = mapped_column(String(32))
    delivery_id: Mapped[str | None] = mapped_column(String(160))
    repo: Mapped[str | None] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # push|tag|rebuild|deploy|rollback|config
    ref: Mapped[str | None] = mapped_column(String(255))
    sha: Mapped[str | None] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(128))  # image or service, for rebuild/deploy
    payload: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # queued|working|done|failed|superseded|ignored
    owner: Mapped[str | None] = mapped_column(String(160))  # host:pid of the worker, when working
    run_id: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str | None] = mapped_column(RedactedText)
    # A queued event put off until then (its commit not on the remote yet); NULL: claim at once.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Instance(Base):
    """A `pipeline serve` process sharing this database: `owner` (host:pid, as in leases and
    events) and its last heartbeat; one whose heartbeat is older than `cluster.INSTANCE_TTL`
    is dead, and a live instance takes its work over."""

    __tablename__ = "instances"
    owner: Mapped[str] = mapped_column(String(160), primary_key=True)
    url: Mapped[str | None] = mapped_column(String(255))  # its HTTP API, when it serves one
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[float] = mapped_column()  # epoch seconds


class ScheduleSlot(Base):
    """The last slot of a timed job (a repo's poll, an image's cron rebuild) that some instance
    claimed: `slot` counts intervals since the epoch, so each interval's tick fires once for the
    whole set of instances."""

    __tablename__ = "schedule_slots"
    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(String(160))


def upsert_insert(engine: Engine) -> Any:
    """`insert` of `engine`'s dialect, whose statements take `on_conflict_do_update` (SQLite and
    PostgreSQL spell it alike: SQLAlchemy's "INSERT…ON CONFLICT (Upsert)" docs). The PostgreSQL
    module is imported only for a PostgreSQL database: it imports asyncpg's dialect too."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert
