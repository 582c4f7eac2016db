"""Rollout safety on the lab: a failed rollout leaves every host where it started, and says why."""

from __future__ import annotations

import json

import pytest
from deploy_helpers import Project

from pipeline.config.load import load
from pipeline.lab.sample_app import DOCKERFILE
from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow]

EXITS_AT_ONCE = (
    DOCKERFILE.split("CMD ", 1)[0] + 'CMD ["/bin/busybox", "sh", "-c", "echo bye; exit 3"]\n'
)


def test_revision_that_exits_at_once_is_rolled_back_on_every_host(project: Project) -> None:
    """A revision whose container exits at once (restart "no") fails its check: the previous
    revision serves on both hosts in its old containers, the release is rolled back as crashed
    with the reason, and the next run does not try it again."""
    project.write_config(web='restart = "no"')
    project.initial_commit()
    assert project.run().ok
    before = project.containers(project.web)
    project.remote.write("web/Dockerfile", EXITS_AT_ONCE)
    project.remote.write("web/www/index.html", "web broken")
    project.push("exits at once")
    res = project.cli("run")
    assert res.returncode == 1, res.stdout + res.stderr
    for i in range(2):
        assert project.get(i, project.web_port) == "web v1"
    assert project.containers(project.web) == before  # the old containers, running again
    history = json.loads(project.cli("history", project.web, "--json").stdout)
    assert history[0]["status"] == "rolled_back", history[0]
    assert "exited (exit code 3)" in history[0]["error"], history[0]
    state = State.in_dir(load(project.config).data_dir)
    assert state.releases(project.web)[0].failure_kind == "crashed"
    assert all(r.status != "running" for r in state.runs())
    again = project.run()
    assert again.ok and not again.rollouts, again
    assert project.containers(project.web) == before
