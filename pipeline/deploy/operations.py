"""Operations on deployed services that are not a pass over the repos: rollback, status."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from pipeline.config.model import ServiceSection
from pipeline.deploy.connections import Connections
from pipeline.deploy.rollout import RolloutResult, Target, service_container_spec
from pipeline.deploy.runner import Runner
from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.containers import ContainerSpec
from pipeline.plan.planner import service_spec_hash
from pipeline.plan.rollback import PinRecord, choose_rollback
from pipeline.state.rollbacks import ServiceSettings
from pipeline.state.store import State
from pipeline.timeutil import iso

# How a service is rolled out rather than what it runs: a rollback takes these from the current
# config (today's hosts, today's pace), everything else from the release it restores.
_HOW = {"hosts", "strategy", "max_parallel", "stop_timeout"}


def rollback_service(runner: Runner, service: str, to: str | None = None) -> RolloutResult:
    """Roll `service` back to the release before the one deployed now (or the one `to` names:
    `r42`/`42` a release id, else a revision prefix; see `choose_rollback`), restoring its image
    and its settings, and pin it there until a newer commit or `pipeline deploy`."""
    cfg = runner.cfg
    svc = cfg.services.get(service)
    if svc is None:
        raise StallingError(f"unknown service {service!r} (known: {', '.join(cfg.services)})")
    deployed = [
        d for d in runner.state.deployments() if d.service == service and d.host in svc.hosts
    ]
    current = max((d.release_id for d in deployed if d.release_id), default=None)
    chosen = choose_rollback(service, runner.state.rollbacks.past_releases(service), current, to)
    stored = runner.state.rollbacks.release_settings(chosen.id)
    if stored is None:
        runner.report(
            f"{service}: release r{chosen.id} has no stored settings (made before pipeline "
            "recorded them): rolling back its image with the current settings"
        )
        env_file = runner.loaded.read_env_file(service)  # EnvFileError: a StallingError
        settings, spec = ServiceSettings(svc, env_file.text if env_file else None), svc
    else:
        settings, spec = stored, restored_spec(stored, svc)
    runner.report(f"{service}: rolling back to r{chosen.id} ({chosen.revision[:12]})")
    target = Target(
        revision=chosen.revision,
        digest=chosen.digest,
        refs={h: chosen.ref for h in svc.hosts},
        spec_hash=service_spec_hash(settings.service, settings.env_file_text),
        pull=cfg.registry is not None,
        auth=runner.connections.registry_auth(),
        env_file=settings.env_file_text,
        settings=settings,
        restores=chosen.id,
    )
    repo = cfg.images[svc.image].repo
    # The head now, before anything moves: a different head later is a newer commit.
    head = _repo_head(runner, repo) or (deployed[0].revision if deployed else None)
    run_id = runner.state.start_run("rollback", repo, owner=runner.owner)
    outcome = runner.roll(
        service,
        target,
        run_id=run_id,
        reason=f"rollback to r{chosen.id} ({chosen.revision[:12]})",
        kind="rollback",
        spec=spec,
    )
    if outcome.ok:
        runner.state.rollbacks.pin_service(
            service,
            release_id=outcome.release_id,
            revision=chosen.revision,
            head=head,
            reason=f"rollback to r{chosen.id}",
        )
        runner.report(
            f"{service}: pinned at {chosen.revision[:12]}; a newer commit or "
            f"`pipeline deploy {service}` releases it"
        )
    runner.state.finish_run(
        run_id,
        "succeeded" if outcome.ok else "failed",
        error=outcome.error,
        revision=chosen.revision,
    )
    return outcome


def restored_spec(stored: ServiceSettings, current: ServiceSection) -> ServiceSection:
    """The section a rollback rolls out: what the stored release ran (image, ports, env,
    command, volumes, resources, network, restart, labels, health) with the current config's
    hosts, strategy, max_parallel and stop_timeout. The env file's stored text travels beside
    it in `Target.env_file` (the file on disk may have changed since)."""
    ran = stored.service.model_dump(mode="json")
    how = current.model_dump(mode="json", include=_HOW)
    try:
        return ServiceSection.model_validate({**ran, **how})
    except ValidationError:
        # Today's strategy does not fit the stored ports (start-first with a fixed host port):
        # roll out as that release was.
        return ServiceSection.model_validate({**ran, **how, "strategy": ran["strategy"]})


def _repo_head(runner: Runner, repo: str) -> str | None:
    """The head commit of `repo` as its mirror last fetched it (no network); None if unknown."""
    section = runner.cfg.repos[repo]
    branch = None if section.tags else (section.branch or "main")
    try:
        with runner.connections.mirror_lock(repo):
            rev = runner.connections.mirror(repo).local_head(branch=branch, tags=section.tags)
    except PipelineError:
        return None
    return rev.sha if rev else None


def pin_json(pin: PinRecord | None) -> dict[str, Any] | None:
    """A pin as `status --json` shows it: null, or its revision, release, reason and since."""
    if pin is None:
        return None
    return {
        "revision": pin.revision,
        "release_id": pin.release_id,
        "reason": pin.reason,
        "since": iso(pin.since),
    }


def status_rows(state: State, connections: Connections) -> list[dict[str, Any]]:
    """One row per service and host of `connections`' config: what pipeline deployed (from
    `state`) and what the engine reports now (an unreachable engine is said in `state`), and
    the service's pin (`pinned`, see `pin_json`)."""
    rows: list[dict[str, Any]] = []
    deployed = {(d.service, d.host): d for d in state.deployments()}
    pins = state.rollbacks.pins()
    for name, svc in connections.loaded.model.services.items():
        pinned = pin_json(pins.get(name))
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
                "pinned": pinned,
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


def oneoff_spec(
    state: State, connections: Connections, service: str, host: str, command: list[str]
) -> ContainerSpec:
    """The spec of a one-off container running `command` (`pipeline exec --new`): the image the
    service runs on `host` now, with the settings its rollout would give it (env and env_file,
    volumes, network, resources, labels), named SERVICE-run-XXXXXX. StallingError when nothing
    of the service was deployed there."""
    import uuid

    loaded = connections.loaded
    svc = loaded.model.services[service]
    d = state.deployment(service, host)
    if d is None:
        raise StallingError(f"{service} is not deployed on host {host}: nothing to run it from")
    env_file = loaded.read_env_file(service)  # EnvFileError: a StallingError
    target = Target(
        revision=d.revision,
        digest=d.digest,
        refs={host: d.ref},
        spec_hash=d.spec_hash,
        pull=False,
        env_file=env_file.text if env_file else None,
    )
    spec = service_container_spec(service, svc, target, d.ref, d.release_id or 0)
    return replace(spec, name=f"{service}-run-{uuid.uuid4().hex[:6]}", command=command)
