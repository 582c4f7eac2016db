"""Which queued events cut short a rollout in progress: the worker's "newer revision waiting"
rule, on a real git repository with tags, its real mirror and a real queue (no engine)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config.load import LoadedConfig, parse
from pipeline.deploy.connections import Connections
from pipeline.lab.workrepo import WorkRepo, git
from pipeline.service.worker import Worker
from pipeline.state.queue import EventQueue
from pipeline.state.store import State


@dataclass
class Setup:
    worker: Worker
    queue: EventQueue
    tags: dict[str, str]
    running: int  # the event whose pass is rolling out v2


@dataclass
class Repo:
    config: LoadedConfig
    connections: Connections
    tags: dict[str, str]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repo]:
    """Repo `rel` following tags v*: v1 and v2 (the newest, being rolled out) are fetched into
    the mirror; v3 is pushed to the remote only after the fetch (the mirror lacks it)."""
    tmp_path = tmp_path_factory.mktemp("newer")
    remote = WorkRepo(tmp_path / "git")
    tags = {}
    for name in ("v1", "v2"):
        remote.commit(name)
        tags[name] = remote.tag(name)
    remote.push()
    git("push", "origin", "--tags", cwd=remote.work)
    config = parse(
        f'[pipeline]\ndata_dir = "data"\n\n[repos.rel]\nurl = "{remote.url}"\ntags = "v*"\n',
        tmp_path / "pipeline.toml",
    )
    connections = Connections(config)
    assert connections.mirror("rel").fetch(tags="v*") is not None
    remote.commit("v3")
    tags["v3"] = remote.tag("v3")
    git("push", "origin", "main", "--tags", cwd=remote.work)
    try:
        yield Repo(config, connections, tags)
    finally:
        connections.close()


@pytest.fixture
def setup(tmp_path: Path, repo: Repo) -> Setup:
    """A fresh queue whose event `running` is the pass rolling out v2."""
    state = State.in_dir(tmp_path / "state")
    queue = EventQueue(state)
    running, _ = queue.put(source="webhook", kind="tag", repo="rel", ref="refs/tags/v2")
    worker = Worker(
        loaded=lambda: repo.config,
        state=state,
        queue=queue,
        owner="test",
        stopping=threading.Event(),
        wake=threading.Event(),
        reload=lambda: None,
        observer=lambda: repo.connections,
        clock=lambda: 0.0,
        sleep=lambda _: None,
        idle_wait=1.0,
    )
    return Setup(worker, queue, repo.tags, running)


@pytest.mark.parametrize(
    ("ref", "sha_of", "interrupts"),
    [
        # a release naming no commit (GitHub, Gitea, Forgejo)
        ("refs/tags/v2", None, False),  # of the tag being rolled out
        ("refs/tags/v1", None, False),  # of an older tag
        ("refs/tags/v3", None, True),  # of a tag the mirror has not fetched yet: may be new
        # a release or tag push naming its commit (GitLab)
        ("refs/tags/v2", "v2", False),
        ("refs/tags/v1", "v1", False),
        ("refs/tags/v3", "v3", True),
        # a push naming no commit may bring anything
        ("refs/heads/main", None, True),
    ],
)
def test_only_a_newer_revision_interrupts_a_rollout(
    setup: Setup, ref: str, sha_of: str | None, interrupts: bool
) -> None:
    """An event queued during a rollout of tag v2 cuts it short only when it brings a newer
    revision: a release of v2 itself (a GitHub or Gitea release names no commit) or of an older
    tag does not; a tag not yet fetched, a newer tag's commit, or an unknown push does."""
    sha = setup.tags[sha_of] if sha_of else None
    setup.queue.put(source="webhook", kind="tag", repo="rel", ref=ref, sha=sha, delivery_id="d")
    worker = setup.worker
    assert worker._newer_commit_waiting("rel", setup.running, None, set()) is interrupts
