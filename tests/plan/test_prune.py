"""`plan.prune.choose_prune`: which containers and images `pipeline prune` removes on a host."""

from __future__ import annotations

from pipeline.plan.prune import ContainerFact, ImageFact, choose_prune


def _image(n: int, size: int = 1000) -> ImageFact:
    return ImageFact(
        id=f"sha256:{n:064x}", created=n, size=size, repo_digests=(f"reg/web@sha256:d{n}",)
    )


def _container(n: int, running: bool) -> ContainerFact:
    return ContainerFact(
        id=f"c{n}", name=f"web-r{n}", running=running, image=f"reg/web@sha256:d{n}", release=n
    )


def test_keeps_the_running_and_the_rollback_images_and_removes_the_rest() -> None:
    """With keep_revisions 1, the running image and the previous release's (rollback) stay;
    the older images and stopped containers go, their sizes summed."""
    images = [_image(n) for n in (1, 2, 3, 4)]
    containers = [_container(4, True), _container(3, False), _container(2, False)]
    choice = choose_prune(
        containers,
        images,
        deployed="c4",
        rollback_releases=[4, 3],
        rollback_digests=["sha256:d4", "sha256:d3"],
        keep=1,
    )
    assert [c.name for c in choice.containers] == ["web-r2"]
    assert [i.created for i in choice.images] == [1, 2]
    assert choice.freed == 2000
    kept = dict(choice.kept)
    assert kept["web-r4"] == "running" and "rollback" in kept["web-r3"]


def test_keep_revisions_keeps_the_newest_images_beyond_what_is_needed() -> None:
    """keep_revisions 3 keeps the three newest images even when nothing runs them."""
    images = [_image(n) for n in (1, 2, 3, 4, 5)]
    choice = choose_prune(
        [_container(5, True)],
        images,
        deployed="c5",
        rollback_releases=[5],
        rollback_digests=["sha256:d5"],
        keep=3,
    )
    assert [i.created for i in choice.images] == [1, 2]


def test_a_deployed_container_is_never_removed_even_when_stopped() -> None:
    """The container pipeline recorded as deployed stays, stopped or not, with its image."""
    images = [_image(1), _image(2)]
    containers = [_container(1, False)]
    choice = choose_prune(
        containers, images, deployed="c1", rollback_releases=[], rollback_digests=[], keep=1
    )
    assert choice.containers == ()
    assert [i.created for i in choice.images] == [2]
