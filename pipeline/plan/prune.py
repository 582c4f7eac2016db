"""Which of a service's containers and images on one host `pipeline prune` removes: pure.

Kept, always: running containers, the container pipeline deployed, and the images those run;
the images of the releases a rollback may go back to (the caller names them: the deployed one
and the one before it at least; a rollback starts one again without a registry, STYLE.md 5) and
the newest container of such a release that does not run (a proxied service keeps its
previous one paused or stopped for an instant switch). Then the newest `keep_revisions`
images are kept too; the rest goes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ContainerFact:
    """One container of the service on the host: `image` the ref it was created from
    (repo@sha256:…), `release` the release id of its label (None when it has none)."""

    id: str
    name: str
    running: bool
    image: str
    release: int | None


@dataclass(frozen=True)
class ImageFact:
    """One image of the service on the host: its id, creation (epoch s), size (bytes) and the
    repo@digest refs it is known by."""

    id: str
    created: int
    size: int
    repo_digests: tuple[str, ...] = ()


@dataclass(frozen=True)
class PruneChoice:
    """What to remove on one host and what is kept, each with why."""

    containers: tuple[ContainerFact, ...] = ()
    images: tuple[ImageFact, ...] = ()
    kept: tuple[tuple[str, str], ...] = field(default=())  # (name or id, why)

    @property
    def freed(self) -> int:
        """Bytes the removed images take (shared layers counted in each: an upper bound)."""
        return sum(i.size for i in self.images)


def _digest(ref: str) -> str | None:
    _, at, digest = ref.partition("@")
    return digest if at else None


def choose_prune(
    containers: Sequence[ContainerFact],
    images: Sequence[ImageFact],
    *,
    deployed: str | None,
    rollback_releases: Sequence[int],
    rollback_digests: Sequence[str],
    keep: int,
) -> PruneChoice:
    """Select what to remove on one host (see the module docstring for the rules).

    `deployed` is the container id pipeline recorded for the host; `rollback_releases` and
    `rollback_digests` are the release ids and image digests of the succeeded releases a
    rollback may need, newest first; `keep` is `keep_revisions`."""
    kept: list[tuple[str, str]] = []
    keep_containers: set[str] = set()
    for c in containers:
        if c.running or c.id == deployed:
            keep_containers.add(c.id)
            kept.append((c.name, "running" if c.running else "deployed"))
    stopped = [c for c in containers if c.id not in keep_containers]
    stopped.sort(key=lambda c: c.release or 0, reverse=True)
    for c in stopped:
        if c.release in rollback_releases:
            keep_containers.add(c.id)
            kept.append((c.name, f"rollback to r{c.release} switches back to it"))
            break
    remove_containers = tuple(c for c in containers if c.id not in keep_containers)

    in_use = {_digest(c.image) for c in containers if c.id in keep_containers} - {None}
    in_use |= {c.image for c in containers if c.id in keep_containers}
    needed = set(rollback_digests)
    keep_images: set[str] = set()
    for image in images:
        digests = {_digest(r) for r in image.repo_digests} - {None}
        if image.id in in_use or digests & in_use:
            keep_images.add(image.id)
            kept.append((image.id[7:19], "a kept container runs it"))
        elif digests & needed:
            keep_images.add(image.id)
            kept.append((image.id[7:19], "a rollback needs it"))
    for image in sorted(images, key=lambda i: -i.created):
        if len(keep_images) >= keep:
            break
        if image.id not in keep_images:
            keep_images.add(image.id)
            kept.append((image.id[7:19], f"among the newest {keep} (keep_revisions)"))
    remove_images = tuple(i for i in images if i.id not in keep_images)
    return PruneChoice(remove_containers, remove_images, tuple(kept))
