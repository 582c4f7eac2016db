"""Rollout records (`release_hosts`): per host of a release, what it goes back to on undo and how
far the rollout got. Written before a host is touched, so crash recovery reads what was
recorded, not what happens to run on the host."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.state.schema import Release, ReleaseHost, Run

# The phases of `release_hosts.phase`, in the order a host goes through them.
PHASES = (
    "planned", "pulled", "stopped_old", "started", "checked", "routed", "switched", "retired",
    "undone",
)  # fmt: skip
# Phases of a host whose serving containers the rollout changed (and undo has not restored).
TOUCHED = ("stopped_old", "started", "checked", "routed", "switched")


@dataclass(frozen=True)
class PreviousContainer:
    """What one host ran before a release touched it: the container to go back to (None when
    the service had none there), whether it was running, and its revision and digest."""

    host: str
    container: str | None
    running: bool
    revision: str | None
    digest: str | None


class RolloutRecords:
    """The `release_hosts` records of one state database (`State.rollouts`), given its session
    factory and clock."""

    def __init__(
        self,
        session: Callable[[], AbstractContextManager[Session]],
        now: Callable[[], datetime],
    ) -> None:
        self.session, self.now = session, now

    def plan_release_hosts(self, release_id: int, hosts: Iterable[PreviousContainer]) -> None:
        """Record every host of a release as "planned" with its previous container, in one
        transaction, before any of them is touched."""
        now = self.now()
        with self.session() as s:
            for prev in hosts:
                s.merge(
                    ReleaseHost(
                        release_id=release_id,
                        host=prev.host,
                        phase="planned",
                        previous_container=prev.container,
                        previous_running=prev.running,
                        previous_revision=prev.revision,
                        previous_digest=prev.digest,
                        new_container=None,
                        updated_at=now,
                    )
                )

    def set_host_phase(
        self, release_id: int, host: str, phase: str, *, new_container: str | None = None
    ) -> None:
        """Record that a host of a release reached `phase` (and its new container, once made)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        with self.session() as s:
            row = s.get(ReleaseHost, (release_id, host))
            if row is None:
                raise ValueError(f"release {release_id} has no host {host!r}")
            row.phase, row.updated_at = phase, self.now()
            if new_container is not None:
                row.new_container = new_container

    def release_hosts(self, release_id: int) -> list[ReleaseHost]:
        """The hosts of a release, as recorded."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(ReleaseHost)
                    .where(ReleaseHost.release_id == release_id)
                    .order_by(ReleaseHost.host)
                )
            )

    def abandoned_releases(
        self, owner_alive: Callable[[str], bool], service: str | None = None
    ) -> list[Release]:
        """Releases still "running" whose run's owner is gone (or that have no run), oldest
        first: a process died in the middle of their rollout."""
        with self.session() as s:
            q = (
                select(Release, Run.owner)
                .outerjoin(Run, Run.id == Release.run_id)
                .where(Release.status == "running")
                .order_by(Release.id)
            )
            if service is not None:
                q = q.where(Release.service == service)
            return [rel for rel, owner in s.execute(q) if owner is None or not owner_alive(owner)]

    def unrestored_releases(self, service: str | None = None) -> list[Release]:
        """Failed releases whose undo the engine refused on some host (a row still in a
        touched phase), each the newest release of its service: recovery tries again."""
        with self.session() as s:
            newest = (
                select(Release.service, func.max(Release.id).label("id"))
                .group_by(Release.service)
                .subquery()
            )
            q = (
                select(Release)
                .join(newest, newest.c.id == Release.id)
                .where(
                    Release.status == "failed",
                    Release.id.in_(
                        select(ReleaseHost.release_id).where(ReleaseHost.phase.in_(TOUCHED))
                    ),
                )
                .order_by(Release.id)
            )
            if service is not None:
                q = q.where(Release.service == service)
            return list(s.scalars(q))
