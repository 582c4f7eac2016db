"""Operations on deployed services that are not a pass over the repos: rollback, status."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import msgspec

from pipeline.config.model import ServiceSection, decode, to_data
from pipeline.deploy.connections import Connections
from pipeline.deploy.rollout import RolloutResult, Target, service_container_spec
from pipeline.deploy.runner import Runner
from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.containers import ContainerSpec
from pipeline.hosts.engine import LABEL_PREFIX
from pipeline.plan.planner import service_spec_hash
from pipeline.plan.rollback import PinRecord, choose_rollback
from pipeline.state.rollbacks import ServiceSettings
from pipeline.state.store import State
from pipeline.timeutil import iso

# How a service is rolled out rather than what it runs: a rollback takes these from the current
# config (today's hosts, today's pace), everything else from the release it restores.
_HOW = {"hosts", "cluster", "strategy", "max_parallel", "stop_timeout"}
# ... and of a proxied service's table, how long the container left drains and how it is kept.
_PROXY_HOW = {"drain", "retain"}


def rollback_service(runner: Runner, service: str, to: str | None = None) -> RolloutResult:
    """Roll `service` back to the release before the one deployed now (or the one `to` names:
    `r42`/`42` a release id, else a revision prefix; see `choose_rollback`), restoring its image
    and its settings, and pin it there until a newer commit or `pipeline deploy`."""
    cfg = runner.cfg
    svc = cfg.services.get(service)
    if svc is None:
        raise StallingError(f"unknown service {service!r} (known: {', '.join(cfg.services)})")
    deployed = [
        d for d in runner.state.deployments() if d.service == service and d.host in svc.targets
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
        refs={h: chosen.ref for h in svc.targets},
        spec_hash=service_spec_hash(settings.service, settings.env_file_text),
        pull=cfg.registry is not None,
        auth=runner.connections.registry_auth(),
        env_file=settings.env_file_text,
        settings=settings,
        restores=chosen.id,
    )
    repo = cfg.images[svc.image].repo
    # The head now, before anything moves: a different head later is a newer commit. (A
    # followed branch's head is a file read: no git process, no GitPython import.)
    head = _repo_head(runner, repo) or (deployed[0].revision if deployed else None)
    run_id = runner.state.start_run("rollback", repo, owner=runner.owner)

    def pin(release_id: int) -> None:
        runner.state.rollbacks.pin_service(
            service,
            release_id=release_id,
            revision=chosen.revision,
            head=head,
            reason=f"rollback to r{chosen.id}",
        )

    try:
        outcome = runner.roll(
            service,
            target,
            run_id=run_id,
            reason=f"rollback to r{chosen.id} ({chosen.revision[:12]})",
            kind="rollback",
            spec=spec,
        )
    except KeyboardInterrupt:
        # Interrupted once every host had switched (the release succeeded): it stays pinned,
        # or the next pass would roll the revision just left out again.
        made = runner.state.releases(service, 1, run_id=run_id)
        if made and made[0].status == "succeeded":
            pin(made[0].id)
        runner.state.finish_run(run_id, "interrupted", error="interrupted (Ctrl-C or SIGTERM)",
                                revision=chosen.revision)  # fmt: skip
        raise
    if outcome.ok:
        pin(outcome.release_id)
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
    hosts, strategy, max_parallel and stop_timeout, and, proxied, its `drain` and `retain`.
    The env file's stored text travels beside it in `Target.env_file` (the file on disk may
    have changed since)."""
    ran, now = to_data(stored.service), to_data(current)
    how = {key: value for key, value in now.items() if key in _HOW}
    if ran.get("proxy") and now.get("proxy"):
        today = {key: value for key, value in now["proxy"].items() if key in _PROXY_HOW}
        how["proxy"] = {**ran["proxy"], **today}
    try:
        return decode(ServiceSection, {**ran, **how})
    except msgspec.ValidationError:
        # Today's strategy does not fit the stored ports (start-first with a fixed host port):
        # roll out as that release was.
        return decode(ServiceSection, {**ran, **how, "strategy": ran["strategy"]})


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
        if svc.cluster:
            rows.extend(_cluster_rows(name, svc.cluster, deployed.get((name, svc.cluster)),
                                      connections, pinned))  # fmt: skip
            continue
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


def _cluster_rows(
    service: str,
    cluster: str,
    d: Any,  # the service's `Deployment` row on the cluster, or None
    connections: Connections,
    pinned: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """A cluster service's rows: one per Swarm node running its tasks, with each task's id,
    slot, revision (from its labels) and state, as the manager reports them now."""
    base: dict[str, Any] = {
        "service": service,
        "cluster": cluster,
        "revision": d.revision if d else None,
        "digest": d.digest if d else None,
        "image": d.ref if d else None,
        "container": None,
        "health": None,
        "updated_at": iso(d.updated_at) if d else None,
        "pinned": pinned,
    }
    try:
        swarm = connections.cluster(cluster).swarm
        tasks = [t for t in swarm.tasks(service) if t.desired_state == "running"]
        nodes = swarm.nodes() if tasks else {}
    except PipelineError as exc:
        return [{**base, "host": cluster, "node": None, "tasks": [],
                 "state": f"unreachable: {exc}"}]  # fmt: skip
    if not tasks:
        return [{**base, "host": cluster, "node": None, "tasks": [], "state": "not deployed"}]
    by_node: dict[str, list[dict[str, Any]]] = {}
    for t in sorted(tasks, key=lambda t: t.slot or 0):
        by_node.setdefault(t.node_id, []).append(
            {
                "task": t.id,
                "slot": t.slot,
                "revision": t.labels.get(f"{LABEL_PREFIX}revision"),
                "digest": t.labels.get(f"{LABEL_PREFIX}digest"),
                "state": t.state,
            }
        )
    rows = []
    for node_id, node_tasks in sorted(by_node.items()):
        node = nodes.get(node_id)
        address = node.address if node else node_id[:12]
        revisions = {t["revision"] for t in node_tasks}
        rows.append(
            {
                **base,
                "host": f"{cluster}/{address}",
                "node": {
                    "id": node_id,
                    "hostname": node.hostname if node else None,
                    "address": address,
                },  # fmt: skip
                "revision": revisions.pop() if len(revisions) == 1 else base["revision"],
                "tasks": node_tasks,
                "state": ", ".join(sorted({t["state"] for t in node_tasks})),
            }
        )
    return rows


def repo_heads(connections: Connections) -> list[dict[str, Any]]:
    """Per repo of the config, what the dashboard shows: its name, what it follows (a branch
    or a tag glob) and the head its mirror last fetched (`head`, `subject`; None before the
    first fetch). Reads the mirrors only: no network."""
    rows: list[dict[str, Any]] = []
    for name, section in connections.loaded.model.repos.items():
        sha = None
        with contextlib.suppress(PipelineError):
            branch = None if section.tags else (section.branch or "main")
            rev = connections.mirror(name).local_head(branch=branch, tags=section.tags)
            sha = rev.sha if rev else None
        rows.append(
            {
                "name": name,
                "follows": section.follows,
                "head": sha,
                "subject": commit_subject(connections, name, sha) if sha else None,
            }
        )
    return rows


def commit_subject(connections: Connections, repo: str, sha: str) -> str | None:
    """The subject line of commit `sha` in `repo`'s mirror; None when it is not there."""
    if repo not in connections.loaded.model.repos:
        return None
    try:
        return connections.mirror(repo).commit_info(sha)["subject"]
    except PipelineError:
        return None


def is_ancestor(connections: Connections, repo: str, old: str, new: str) -> bool | None:
    """Whether commit `old` is reachable from commit `new` in `repo`'s mirror (`git merge-base
    --is-ancestor`, `Mirror.is_ancestor`); None when `new` is not there or git fails."""
    if repo not in connections.loaded.model.repos:
        return None
    try:
        return connections.mirror(repo).is_ancestor(old, new)
    except PipelineError:
        return None


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
