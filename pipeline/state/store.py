"""The state database: every run and step, builds, releases, deployments, leases and events.

SQLite in the data dir by default (WAL, so the service and the CLI read and write together), or
PostgreSQL (`[pipeline] database`, see `state.database`) shared by several instances; one code
path serves both. Each write is its own short transaction, so a crash leaves a true record.
Errors, details, summaries and reasons are redacted by their column type as they are written
(`schema.RedactedText`), so callers pass them as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, func, select, update
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import FailureKind
from pipeline.plan.blocked import Blocked, ReleaseFact, blocked_revision, infrastructure_retry
from pipeline.plan.planner import ImageRecord, ServiceRecord
from pipeline.state import migrate
from pipeline.state.cluster import Cluster
from pipeline.state.leases import Leases, default_owner
from pipeline.state.leases import owner_alive_local as owner_alive_local  # re-exported
from pipeline.state.rollbacks import Rollbacks, ServiceSettings
from pipeline.state.rollouts import PreviousContainer as PreviousContainer  # re-exported
from pipeline.state.rollouts import RolloutRecords
from pipeline.state.schema import BuildRow, Deployment, Release, ReleaseSettings, Run, Step
from pipeline.timeutil import epoch, iso, utc

Clock = Callable[[], float]
# Releases of a service read to decide whether its last revision waits: enough to count the
# infrastructure failures in a row past the longest backoff.
_RELEASES_CONSIDERED = 20


def release_fact(rel: Release) -> ReleaseFact:
    """A release row as the pure rules of `plan.blocked` read it."""
    return ReleaseFact(
        revision=rel.revision,
        digest=rel.digest,
        spec_hash=rel.spec_hash,
        kind=rel.kind,
        status=rel.status,
        failure_kind=rel.failure_kind,
        finished_at=epoch(rel.finished_at or rel.started_at),
    )


def release_json(rel: Release) -> dict[str, Any]:
    """A release as `pipeline history --json` and the API show it; `failure_kind` is null
    unless it failed (and for releases recorded before failure kinds were)."""
    return {
        "id": rel.id,
        "service": rel.service,
        "revision": rel.revision,
        "kind": rel.kind,
        "status": rel.status,
        "failure_kind": rel.failure_kind,
        "reason": rel.reason,
        "digest": rel.digest,
        "run_id": rel.run_id,
        "started_at": iso(rel.started_at),
        "finished_at": iso(rel.finished_at),
        "error": rel.error,
    }


def run_json(run: Run) -> dict[str, Any]:
    """A run as the API (`/api/runs`) and the dashboard show it."""
    return {
        "id": run.id,
        "trigger": run.trigger,
        "repo": run.repo,
        "revision": run.revision,
        "status": run.status,
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "error": run.error,
        "summary": run.summary,
    }


def step_json(step: Step) -> dict[str, Any]:
    """A step of a run as the API (`/api/runs/ID`) and the dashboard show it."""
    return {
        "kind": step.kind,
        "subject": step.subject,
        "host": step.host,
        "revision": step.revision,
        "status": step.status,
        "started_at": iso(step.started_at),
        "finished_at": iso(step.finished_at),
        "detail": step.detail,
        "error": step.error,
    }


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class State:
    """Facade over the state database; time is injected through `clock` (epoch seconds).

    Beside its own records (runs, steps, builds, releases, deployments) it holds four objects
    over the same database: `state.leases` (`lease`, `acquire`, ...: `state.leases.Leases`),
    `state.cluster` (instances' heartbeats and timed jobs' slots: `state.cluster.Cluster`),
    `state.rollouts` (per-host rollout records: `state.rollouts.RolloutRecords`) and
    `state.rollbacks` (release settings and pins: `state.rollbacks.Rollbacks`).
    """

    def __init__(self, url: str | URL, *, clock: Clock = time.time) -> None:
        self.url = url
        self.clock = clock
        is_sqlite = (url if isinstance(url, str) else url.drivername).startswith("sqlite")
        # A server's connections can be dropped under us (a restart, a failover): test each one
        # as it is taken from the pool. A SQLite file needs no such round trip.
        self.engine: Engine = create_engine(url, future=True, pool_pre_ping=not is_sqlite)
        if is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate.upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.leases = Leases(self.engine, self.session, clock)
        self.cluster = Cluster(self.engine, self.session, clock, self.now)
        self.rollbacks = Rollbacks(self.session, self.now)
        self.rollouts = RolloutRecords(self.session, self.now)

    @classmethod
    def in_dir(cls, data_dir: Path, *, clock: Clock = time.time) -> State:
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{data_dir / 'state.db'}", clock=clock)

    def now(self) -> datetime:
        return utc(self.clock())

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    # -- runs and steps -------------------------------------------------------------------
    def start_run(self, trigger: str, repo: str | None = None, owner: str | None = None) -> int:
        with self.session() as s:
            run = Run(
                trigger=trigger,
                repo=repo,
                status="running",
                owner=owner or default_owner(),
                started_at=self.now(),
            )
            s.add(run)
            s.flush()
            return run.id

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        error: str | None = None,
        summary: str | None = None,
        revision: str | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "status": status,
            "finished_at": self.now(),
            "error": error or None,
            "summary": summary,
        }
        if revision:
            values["revision"] = revision
        with self.session() as s:
            s.execute(update(Run).where(Run.id == run_id).values(**values))

    def start_step(
        self,
        run_id: int,
        kind: str,
        subject: str | None = None,
        *,
        host: str | None = None,
        revision: str | None = None,
        detail: str | None = None,
    ) -> int:
        with self.session() as s:
            step = Step(
                run_id=run_id,
                kind=kind,
                subject=subject,
                host=host,
                revision=revision,
                status="running",
                started_at=self.now(),
                detail=detail or None,
            )
            s.add(step)
            s.flush()
            return step.id

    def finish_step(
        self, step_id: int, status: str, *, detail: str | None = None, error: str | None = None
    ) -> None:
        values: dict[str, Any] = {"status": status, "finished_at": self.now()}
        if detail is not None:
            values["detail"] = detail
        if error is not None:
            values["error"] = error
        with self.session() as s:
            s.execute(update(Step).where(Step.id == step_id).values(**values))

    def runs(self, limit: int = 50) -> list[Run]:
        with self.session() as s:
            return list(s.scalars(select(Run).order_by(Run.id.desc()).limit(limit)))

    def run(self, run_id: int) -> Run | None:
        with self.session() as s:
            return s.get(Run, run_id)

    def steps(self, run_id: int) -> list[Step]:
        with self.session() as s:
            return list(s.scalars(select(Step).where(Step.run_id == run_id).order_by(Step.id)))

    def running_run_after(self, repo: str | None, after: int) -> int | None:
        """The newest run still running with an id above `after` for `repo` (or for every
        repo); None when there is none."""
        with self.session() as s:
            return s.scalars(
                select(Run.id)
                .where(
                    Run.id > after, Run.status == "running", (Run.repo == repo) | Run.repo.is_(None)
                )
                .order_by(Run.id.desc())
                .limit(1)
            ).first()

    def last_success_by_service(self) -> dict[str, datetime]:
        """Per service, when its newest succeeded release finished (UTC, naive from SQLite)."""
        with self.session() as s:
            rows = s.execute(
                select(Release.service, func.max(Release.finished_at))
                .where(Release.status == "succeeded", Release.finished_at.is_not(None))
                .group_by(Release.service)
            )
            return {service: finished for service, finished in rows if finished is not None}

    def stale_runs(self, owner_alive: Callable[[str], bool]) -> list[int]:
        """Ids of runs still "running" whose owner is gone (nothing is changed)."""
        with self.session() as s:
            rows = s.execute(select(Run.id, Run.owner).where(Run.status == "running"))
            return [run_id for run_id, owner in rows if not owner_alive(owner)]

    def interrupt_stale_runs(self, owner_alive: Callable[[str], bool]) -> list[int]:
        """Mark runs (and their open steps and releases) whose owner is gone as interrupted."""
        with self.session() as s:
            stale = [
                r
                for r in s.scalars(select(Run).where(Run.status == "running"))
                if not owner_alive(r.owner)
            ]
            now = self.now()
            for run in stale:
                run.status, run.finished_at = "interrupted", now
                run.error = run.error or "interrupted: its process ended before it finished"
                s.execute(
                    update(Step)
                    .where(Step.run_id == run.id, Step.status == "running")
                    .values(status="interrupted", finished_at=now)
                )
                s.execute(
                    update(Release)
                    .where(Release.run_id == run.id, Release.status == "running")
                    .values(
                        status="interrupted",
                        finished_at=now,
                        error="interrupted: its process ended before it finished",
                        failure_kind="interrupted",
                    )
                )
            return [r.id for r in stale]

    # -- builds -----------------------------------------------------------------------------
    def record_build(
        self, image: str, revision: str, digest: str, ref: str, spec_hash: str, run_id: int | None
    ) -> None:
        with self.session() as s:
            s.add(
                BuildRow(
                    image=image,
                    revision=revision,
                    digest=digest,
                    ref=ref,
                    spec_hash=spec_hash,
                    run_id=run_id,
                    created_at=self.now(),
                )
            )

    def last_build(self, image: str) -> BuildRow | None:
        with self.session() as s:
            return s.scalars(
                select(BuildRow)
                .where(BuildRow.image == image)
                .order_by(BuildRow.id.desc())
                .limit(1)
            ).first()

    def image_records(self, images: list[str]) -> dict[str, ImageRecord]:
        out = {}
        for image in images:
            row = self.last_build(image)
            if row:
                out[image] = ImageRecord(
                    revision=row.revision, digest=row.digest, spec_hash=row.spec_hash
                )
        return out

    # -- releases (per-service rollouts) ----------------------------------------------------
    def start_release(
        self,
        service: str,
        revision: str,
        digest: str,
        ref: str,
        spec_hash: str,
        *,
        kind: str,
        reason: str | None,
        run_id: int | None,
        settings: ServiceSettings | None = None,
        restores: int | None = None,
    ) -> int:
        """Record a release as running; with it, in one transaction, the `settings` it deploys
        (kept for a later rollback, never shown) and, for a rollback, the release it `restores`."""
        with self.session() as s:
            rel = Release(
                service=service,
                revision=revision,
                digest=digest,
                ref=ref,
                spec_hash=spec_hash,
                kind=kind,
                reason=reason,
                status="running",
                run_id=run_id,
                started_at=self.now(),
                restores=restores,
            )
            s.add(rel)
            s.flush()
            if settings is not None:
                s.add(ReleaseSettings(release_id=rel.id, settings=settings.to_json()))
            return rel.id

    def finish_release(
        self,
        release_id: int,
        status: str,
        error: str | None = None,
        *,
        failure_kind: FailureKind | None = None,
    ) -> None:
        """End a release in a terminal `status` with its error (stored redacted) and, when it
        failed, its `failure_kind` (see `pipeline.errors.FailureKind`)."""
        with self.session() as s:
            s.execute(
                update(Release)
                .where(Release.id == release_id)
                .values(
                    status=status,
                    finished_at=self.now(),
                    error=error or None,
                    failure_kind=failure_kind,
                )
            )

    def record_superseded(
        self,
        service: str,
        revision: str,
        note: str,
        run_id: int | None,
        at: datetime | None = None,
    ) -> None:
        """A commit that was never rolled out because a newer one of its branch came first;
        `at` is when it arrived (history is in that order). Recorded once per service."""
        self._record_unbuilt(service, revision, "superseded", run_id, at, reason=note)

    def record_never_appeared(
        self,
        service: str,
        revision: str,
        error: str,
        run_id: int | None,
        at: datetime | None = None,
    ) -> None:
        """A commit a trigger announced that never showed on the remote (`failure_kind`
        "never_appeared", no image): `history` shows it failed; it keeps no revision out of
        later rollouts (`plan.blocked`). `at` is when it was announced."""
        self._record_unbuilt(
            service, revision, "failed", run_id, at, error=error, failure_kind="never_appeared"
        )

    def _record_unbuilt(
        self,
        service: str,
        revision: str,
        status: str,
        run_id: int | None,
        at: datetime | None,
        *,
        reason: str | None = None,
        error: str | None = None,
        failure_kind: FailureKind | None = None,
    ) -> None:
        """A release row of a commit that was never built (digest ""), once per service,
        revision and status."""
        now = self.now()
        with self.session() as s:
            seen = s.scalars(
                select(Release.id).where(
                    Release.service == service,
                    Release.revision == revision,
                    Release.status == status,
                    Release.digest == "",
                )
            ).first()
            if seen is not None:
                return
            s.add(
                Release(
                    service=service,
                    revision=revision,
                    digest="",
                    ref="",
                    spec_hash="",
                    kind="deploy",
                    reason=reason,
                    status=status,
                    run_id=run_id,
                    started_at=at or now,
                    finished_at=now,
                    error=error or None,
                    failure_kind=failure_kind,
                )
            )

    def record_note(self, service: str, kind: str, note: str) -> None:
        """A line in `service`'s history that is not a rollout (status "note", no revision):
        e.g. `pipeline lock release` saying whose lease it freed. Planning and rollback skip it."""
        now = self.now()
        with self.session() as s:
            s.add(
                Release(
                    service=service,
                    revision="",
                    digest="",
                    ref="",
                    spec_hash="",
                    kind=kind,
                    reason=note,
                    status="note",
                    run_id=None,
                    started_at=now,
                    finished_at=now,
                )
            )

    def releases(
        self, service: str | None = None, limit: int = 50, *, run_id: int | None = None
    ) -> list[Release]:
        """Releases newest first, of one service and/or one run when given."""
        with self.session() as s:
            # By start: a superseded commit is recorded after the newer one's rollout, but it
            # arrived before it.
            q = select(Release).order_by(Release.started_at.desc(), Release.id.desc()).limit(limit)
            if service:
                q = q.where(Release.service == service)
            if run_id is not None:
                q = q.where(Release.run_id == run_id)
            return list(s.scalars(q))

    def services_released_by(self, run_id: int) -> list[str]:
        """The services a run rolled out (or tried to)."""
        with self.session() as s:
            rows = s.scalars(
                select(Release.service).where(
                    Release.run_id == run_id, Release.status != "superseded"
                )
            )
            return sorted(set(rows))

    def successful_releases(self, service: str) -> list[Release]:
        """Succeeded releases of a service, newest first."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Release)
                    .where(Release.service == service, Release.status == "succeeded")
                    .order_by(Release.id.desc())
                )
            )

    def service_records(self, services: list[str]) -> dict[str, ServiceRecord]:
        """Per service, its last succeeded release and where it runs now (its deployments'
        hosts, or its cluster's name); services never deployed are left out."""
        with self.session() as s:
            rows = s.execute(
                select(Deployment.service, Deployment.host).where(Deployment.service.in_(services))
            )
            targets: dict[str, set[str]] = {}
            for service, host in rows:
                targets.setdefault(service, set()).add(host)
        out = {}
        for service in services:
            ok = self.successful_releases(service)
            if ok:
                out[service] = ServiceRecord(
                    revision=ok[0].revision,
                    digest=ok[0].digest,
                    spec_hash=ok[0].spec_hash,
                    targets=frozenset(targets.get(service, ())),
                )
        return out

    def failed_revisions(self, services: list[str]) -> dict[str, Blocked]:
        """Per service, the revision not to roll out automatically now, why and until when
        (`pipeline.plan.blocked`): after an application failure or a manual rollback until a
        newer commit; after an infrastructure failure until its backoff ends (state clock)."""
        now = self.clock()
        return self._decide(services, lambda facts: blocked_revision(facts, now))

    def infrastructure_retries(self, services: list[str]) -> dict[str, Blocked]:
        """Per service, the revision whose last rollout failed for an infrastructure reason and
        `until` when a pass may retry it, including a time already past (the service's own
        timer queues that pass)."""
        return self._decide(services, infrastructure_retry)

    def _decide(
        self, services: list[str], decide: Callable[[list[ReleaseFact]], Blocked | None]
    ) -> dict[str, Blocked]:
        out = {}
        with self.session() as s:
            for service in services:
                rows = s.scalars(
                    select(Release)
                    .where(Release.service == service, Release.status != "note")
                    .order_by(Release.id.desc())
                    .limit(_RELEASES_CONSIDERED)
                )
                blocked = decide([release_fact(r) for r in rows])
                if blocked is not None:
                    out[service] = blocked
        return out

    # -- deployments (per service and host) -------------------------------------------------
    def set_deployment(
        self,
        service: str,
        host: str,
        *,
        revision: str,
        digest: str,
        ref: str,
        spec_hash: str,
        container_id: str | None,
        release_id: int | None,
    ) -> None:
        with self.session() as s:
            row = s.get(Deployment, (service, host))
            if row is None:
                row = Deployment(service=service, host=host)
                s.add(row)
            row.revision, row.digest, row.ref, row.spec_hash = revision, digest, ref, spec_hash
            row.container_id, row.release_id, row.updated_at = container_id, release_id, self.now()

    def deployment(self, service: str, host: str) -> Deployment | None:
        """What pipeline last left running for `service` on `host`; None if nothing."""
        with self.session() as s:
            return s.get(Deployment, (service, host))

    def deployments(self) -> list[Deployment]:
        with self.session() as s:
            return list(s.scalars(select(Deployment).order_by(Deployment.service, Deployment.host)))

    def forget_deployment(self, service: str, host: str) -> None:
        with self.session() as s:
            s.execute(
                delete(Deployment).where(Deployment.service == service, Deployment.host == host)
            )
