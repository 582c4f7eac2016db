"""Crash recovery: rollouts a dead process left "running" are brought to an end from what was
recorded before each host was touched (`release_hosts`), never from what runs on the hosts.

`pipeline run`, `deploy`, `rebuild` and `rollback` call `recover_interrupted` before their pass,
`pipeline serve` at its start, and every rollout calls `recover_service` under its service's
lease before it touches a host. A revision interrupted this way gets one fresh attempt
(`fresh_attempt_due`), not a loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from pipeline.deploy.rollout import Rollout, RolloutResult, Target, container_name
from pipeline.deploy.steps import reached_by_phase, recovery_action, undo_for
from pipeline.errors import LockedError, PipelineError
from pipeline.hosts.engine import ContainerInfo
from pipeline.plan.blocked import blocked_revision
from pipeline.state.schema import Release
from pipeline.state.store import PreviousContainer, owner_alive_local, release_fact

if TYPE_CHECKING:
    from pipeline.deploy.runner import Runner

log = structlog.get_logger(__name__)

# A revision whose rollout was interrupted this many times is not retried on its own again.


def recover_service(
    executor: Rollout, owner_alive: Callable[[str], bool] = owner_alive_local
) -> list[RolloutResult]:
    """Recover the service's releases left running by a dead owner, and put back hosts whose
    undo the engine refused before; the caller holds the service's lease."""
    state, service = executor.state, executor.service
    records = state.rollouts
    releases = records.abandoned_releases(owner_alive, service)
    releases += records.unrestored_releases(service)
    return [recover_release(executor, rel) for rel in releases]


def recover_release(executor: Rollout, release: Release) -> RolloutResult:
    """Bring a release a dead process left running to an end from its records: finish it when
    every host had passed its check (and its new container still runs), else put every host
    back on its recorded previous container and mark the release interrupted. A failed
    release whose undo was refused is put back and then marked rolled back."""
    rows = executor.state.rollouts.release_hosts(release.id)
    service = executor.service
    bound = log.bind(service=service, revision=release.revision[:12], release=release.id)
    news: dict[str, ContainerInfo] = {}
    if release.status == "running" and recovery_action({r.host: r.phase for r in rows}) == (
        "finish"
    ):
        for r in rows:
            info = _inspect_quietly(executor, r.host, r.new_container)
            if info is None or info.status != "running":
                break
            news[r.host] = info
    if rows and len(news) == len(rows):
        target = Target(release.revision, release.digest, {}, release.spec_hash, pull=False)
        for r in rows:
            if r.phase == "checked" and executor.proxies:
                executor.route_to(r.host, news[r.host])
                executor.state.rollouts.set_host_phase(release.id, r.host, "routed")
            if r.phase in ("checked", "routed"):
                executor.record_deployment(r.host, news[r.host], target, release.id)
                executor.state.rollouts.set_host_phase(release.id, r.host, "switched")
        for r in rows:
            if r.phase != "retired":
                executor.retire(
                    r.host,
                    news[r.host],
                    release.id,
                    None,
                    release.revision,
                    keep=r.previous_container,
                )
        executor.state.finish_release(release.id, "succeeded")
        executor.report(
            f"{service}: finished the interrupted rollout of {release.revision[:12]}: every "
            "host had passed its check"
        )
        bound.warning("recovery.finished", hosts=[r.host for r in rows])
        return RolloutResult(service, True, release.id, None, [r.host for r in rows])
    problems = []
    for r in rows:
        if r.host not in executor.engines:
            problems.append(f"host {r.host}: no longer configured for {service}")
            continue
        prev = PreviousContainer(
            r.host, r.previous_container, bool(r.previous_running), r.previous_revision,
            r.previous_digest,
        )  # fmt: skip
        undos = undo_for(reached_by_phase(r.phase))
        new = r.new_container or container_name(service, release.revision, release.id)
        error = None
        if undos:
            error = executor.undo.undo_host(r.host, undos, prev, new, release.id, None)
        if error:
            problems.append(error)
    if release.status == "failed":  # its own rollout could not undo everything
        if problems:
            bound.error("recovery.still_not_put_back", problems=problems)
            return RolloutResult(service, False, release.id, release.error, [])
        failure = (release.error or "").split("\nnot put back: ", 1)[0]
        executor.state.finish_release(
            release.id,
            "rolled_back",
            f"{failure}\n(put back by a later recovery)",
            failure_kind=release.failure_kind,  # type: ignore[arg-type]
        )
        executor.report(f"{service}: hosts of the failed rollout of {release.revision[:12]} "
                        "put back")  # fmt: skip
        return RolloutResult(service, False, release.id, failure, [r.host for r in rows])
    message = "interrupted: its process ended before it finished; every host put back"
    if problems:
        message = "interrupted: its process ended before it finished; not put back: " + (
            "; ".join(problems)
        )
    executor.state.finish_release(release.id, "interrupted", message, failure_kind="interrupted")
    bound.warning("recovery.undone", problems=problems)
    executor.report(f"{service}: interrupted rollout of {release.revision[:12]} put back")
    return RolloutResult(service, False, release.id, message, [r.host for r in rows])


def _inspect_quietly(executor: Rollout, host: str, container: str | None) -> ContainerInfo | None:
    if not container or host not in executor.engines:
        return None
    try:
        return executor.engines[host].containers.inspect(container)
    except PipelineError:
        return None


def recover_interrupted(
    runner: Runner, owner_alive: Callable[[str], bool] = owner_alive_local
) -> list[RolloutResult]:
    """Before a pass: recover, under each service's lease, every release a dead process left
    running; then mark the dead processes' runs interrupted. A service whose lease a live
    process holds is left to it (it recovers before its own rollout)."""
    results: list[RolloutResult] = []
    abandoned = runner.state.rollouts.abandoned_releases(owner_alive)
    unrestored = runner.state.rollouts.unrestored_releases()
    for service in sorted({rel.service for rel in abandoned + unrestored}):
        if service not in runner.cfg.services:
            for rel in abandoned:
                if rel.service == service:
                    runner.state.finish_release(
                        rel.id,
                        "interrupted",
                        "interrupted: its process ended before it finished; the service is no "
                        "longer configured, so no host was put back",
                        failure_kind="interrupted",
                    )
            continue
        try:
            with runner.state.leases.lease(f"service:{service}", runner.owner):
                results += recover_service(runner.rollout_executor(service), owner_alive)
        except LockedError as exc:
            log.warning("recovery.deferred", service=service, reason=str(exc))
    runner.state.interrupt_stale_runs(owner_alive)
    return results


def fresh_attempt_due(releases: Sequence[Release], interrupted_id: int) -> bool:
    """Whether the revision of interrupted release `interrupted_id` should be rolled out again
    on its own (`releases` newest first): only when nothing of its service was rolled out since
    (a requeued push, a CLI run already gave it its fresh attempt) and the rule every pass
    follows (`plan.blocked`: one fresh attempt, not a second) lets it through."""
    rel = next((r for r in releases if r.id == interrupted_id), None)
    if rel is None or rel.status != "interrupted":
        return False
    if any(r.id > rel.id and r.service == rel.service for r in releases):
        return False
    mine = [release_fact(r) for r in releases if r.service == rel.service]
    # An interrupted attempt waits on no clock, so any `now` gives the same answer.
    return blocked_revision(mine, now=float("inf")) is None
