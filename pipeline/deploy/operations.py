"""Operations on deployed services that are not a pass over the repos: rollback, status."""

from __future__ import annotations

from typing import Any

from pipeline.deploy.connections import Connections
from pipeline.deploy.rollout import RolloutResult, Target
from pipeline.deploy.runner import Runner, read_env_files
from pipeline.errors import PipelineError, StallingError
from pipeline.plan.planner import service_spec_hash
from pipeline.state.store import State
from pipeline.timeutil import iso


def rollback_service(runner: Runner, service: str, to: str | None = None) -> RolloutResult:
    """Roll `service` back to the previous successful revision (or the one starting with `to`)."""
    cfg = runner.cfg
    svc = cfg.services.get(service)
    if svc is None:
        raise StallingError(f"unknown service {service!r} (known: {', '.join(cfg.services)})")
    current = {d.digest for d in runner.state.deployments() if d.service == service}
    candidates = runner.state.successful_releases(service)
    if to:
        chosen = next((r for r in candidates if r.revision.startswith(to.lower())), None)
        if chosen is None:
            raise StallingError(f"service {service}: no successful release at revision {to!r}")
    else:
        chosen = next((r for r in candidates if r.digest not in current), None)
        if chosen is None:
            raise StallingError(f"service {service}: no earlier successful revision to go back to")
    runner.report(f"{service}: rolling back to {chosen.revision[:12]}")
    env_text = read_env_files(runner.loaded).get(service)
    target = Target(
        revision=chosen.revision,
        digest=chosen.digest,
        refs={h: chosen.ref for h in svc.hosts},
        spec_hash=service_spec_hash(svc, env_text),
        pull=cfg.registry is not None,
        auth=runner.connections.registry_auth(),
        env_file=env_text,
    )
    run_id = runner.state.start_run("rollback", cfg.images[svc.image].repo, owner=runner.owner)
    outcome = runner.roll(
        service,
        target,
        run_id=run_id,
        reason=f"rollback to {chosen.revision[:12]}",
        kind="rollback",
    )
    runner.state.finish_run(
        run_id,
        "succeeded" if outcome.ok else "failed",
        error=outcome.error,
        revision=chosen.revision,
    )
    return outcome


def status_rows(state: State, connections: Connections) -> list[dict[str, Any]]:
    """One row per service and host of `connections`' config: what pipeline deployed (from
    `state`) and what the engine reports now (an unreachable engine is said in `state`)."""
    rows: list[dict[str, Any]] = []
    deployed = {(d.service, d.host): d for d in state.deployments()}
    for name, svc in connections.loaded.model.services.items():
        for host in svc.hosts:
            d = deployed.get((name, host))
            row: dict[str, Any] = {
                "service": name,
                "host": host,
                "revision": d.revision if d else None,
                "digest": d.digest if d else None,
                "image": d.ref if d else None,
                "container": None,
                "state": "not deployed",
                "health": None,
                "updated_at": iso(d.updated_at) if d else None,
            }
            if d and d.container_id:
                try:
                    info = connections.engine(host).containers.inspect(d.container_id)
                except PipelineError as exc:
                    row["state"] = f"unreachable: {exc}"
                else:
                    row["state"] = info.status if info else "missing"
                    row["health"] = info.health if info else None
                    row["container"] = info.name if info else None
            rows.append(row)
    return rows
