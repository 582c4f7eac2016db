"""What a build produced, as the deploy stage takes it: its own module so that a rollout (a
rollback above all) need not import the builder and what it needs (GitPython, BuildKit)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Artifact:
    """A built image: `ref` is what hosts run (registry@digest, or a tag local to each host)."""

    image: str
    revision: str
    digest: str
    ref: str
    unchanged: bool = False  # rebuilt to the digest it already had
