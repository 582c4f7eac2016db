"""`pipeline prune`: per host, remove a service's containers and images beyond `keep_revisions`,
never what the deployed container runs or what a rollback needs (`plan.prune` decides)."""

from __future__ import annotations

from typing import Any

from pipeline.deploy.connections import Connections
from pipeline.errors import PipelineError
from pipeline.hosts.containers import LABEL_PREFIX
from pipeline.plan.prune import ContainerFact, ImageFact, PruneChoice, choose_prune
from pipeline.state.store import State


def prune(state: State, connections: Connections, *, dry_run: bool) -> list[dict[str, Any]]:
    """One row per service and host: what was (with `dry_run`: would be) removed, what was
    kept and why, bytes freed, and the errors met (an unreachable host is an error row; the
    others go on)."""
    cfg = connections.loaded.model
    keep = cfg.pipeline.keep_revisions
    deployed = {(d.service, d.host): d.container_id for d in state.deployments()}
    rows: list[dict[str, Any]] = []
    for name, svc in cfg.services.items():
        # The deployed release and the one before it (what `pipeline rollback` goes back to)
        # are needed whatever keep_revisions says.
        succeeded = state.successful_releases(name)[: max(keep, 2)]
        releases = [r.id for r in succeeded]
        digests = [r.digest for r in succeeded if r.digest]
        for host in svc.hosts:
            row: dict[str, Any] = {"service": name, "host": host, "dry_run": dry_run,
                                   "containers": [], "images": [], "kept": [], "freed": 0,
                                   "errors": []}  # fmt: skip
            rows.append(row)
            try:
                choice = _choose(connections, name, svc.image, host, deployed, releases, digests,
                                 keep)  # fmt: skip
            except PipelineError as exc:
                row["errors"].append(str(exc))
                continue
            row["kept"] = [f"{what}: {why}" for what, why in choice.kept]
            engine = connections.engine(host)
            for c in choice.containers:
                try:
                    if not dry_run:
                        engine.containers.remove(c.id)
                    row["containers"].append(c.name)
                except PipelineError as exc:
                    row["errors"].append(str(exc))
            for image in choice.images:
                try:
                    if not dry_run:
                        engine.remove_image(image.id)
                    row["images"].append(image.id[7:19])
                    row["freed"] += image.size
                except PipelineError as exc:
                    row["errors"].append(str(exc))
    return rows


def _choose(
    connections: Connections,
    service: str,
    image: str,
    host: str,
    deployed: dict[tuple[str, str], str | None],
    releases: list[int],
    digests: list[str],
    keep: int,
) -> PruneChoice:
    engine = connections.engine(host)
    containers = [
        ContainerFact(
            id=c.id,
            name=c.name,
            running=c.status in ("running", "restarting"),
            image=c.image,
            release=int(r) if (r := c.labels.get(LABEL_PREFIX + "release", "")).isdigit() else None,
        )
        for c in engine.containers.managed_containers(service)
    ]
    images = [
        ImageFact(
            id=i["Id"],
            created=int(i.get("Created") or 0),
            size=int(i.get("Size") or 0),
            repo_digests=tuple(i.get("RepoDigests") or ()),
        )
        for i in engine.image_details(LABEL_PREFIX + "image", image)
    ]
    return choose_prune(
        containers,
        images,
        deployed=deployed.get((service, host)),
        rollback_releases=releases,
        rollback_digests=digests,
        keep=keep,
    )
