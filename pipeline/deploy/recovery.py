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

from pipeline.deploy.rollout import Rollout, RolloutResult
from pipeline.errors import LockedError
from pipeline.state.schema import Release
from pipeline.state.store import owner_alive_local

if TYPE_CHECKING:
    from pipeline.deploy.runner import Runner

log = structlog.get_logger(__name__)

# A revision whose rollout was interrupted this many times is not retried on its own again.
MAX_INTERRUPTIONS = 2


def recover_service(
    executor: Rollout, owner_alive: Callable[[str], bool] = owner_alive_local
) -> list[RolloutResult]:
    """Recover the service's releases left running by a dead owner; the caller holds the
    service's lease."""
    return [
        executor.recover(rel)
        for rel in executor.state.abandoned_releases(owner_alive, executor.service)
    ]


def recover_interrupted(
    runner: Runner, owner_alive: Callable[[str], bool] = owner_alive_local
) -> list[RolloutResult]:
    """Before a pass: recover, under each service's lease, every release a dead process left
    running; then mark the dead processes' runs interrupted. A service whose lease a live
    process holds is left to it (it recovers before its own rollout)."""
    results: list[RolloutResult] = []
    abandoned = runner.state.abandoned_releases(owner_alive)
    for service in sorted({rel.service for rel in abandoned}):
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
            with runner.state.lease(f"service:{service}", runner.owner):
                results += recover_service(runner.rollout_executor(service), owner_alive)
        except LockedError as exc:
            log.warning("recovery.deferred", service=service, reason=str(exc))
    runner.state.interrupt_stale_runs(owner_alive)
    return results


def fresh_attempt_due(releases: Sequence[Release], interrupted_id: int) -> bool:
    """Whether the revision of interrupted release `interrupted_id` should be rolled out again
    on its own: only when nothing of its service was rolled out since (a requeued push, a CLI
    run already gave it its fresh attempt) and its revision was interrupted fewer than
    `MAX_INTERRUPTIONS` times (a rollout that keeps dying is not retried in a loop)."""
    rel = next((r for r in releases if r.id == interrupted_id), None)
    if rel is None or rel.status != "interrupted":
        return False
    if any(r.id > rel.id and r.service == rel.service for r in releases):
        return False
    times = sum(
        1
        for r in releases
        if r.service == rel.service and r.revision == rel.revision and r.status == "interrupted"
    )
    return times < MAX_INTERRUPTIONS
