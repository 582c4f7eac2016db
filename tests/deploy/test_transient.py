"""Case 3 on the lab: a registry that host 2 cannot reach for a while is an infrastructure
problem, retried, and never mistaken for a broken revision."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from deploy_helpers import Project, registry_blocked

from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.runner import Runner
from pipeline.retry import RetryPolicy
from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BLIP = 2.0  # seconds host 2 cannot reach the registry once its pull has started


def _pull_started(state: State, host: str, after_run: int) -> bool:
    runs = state.runs(1)
    if not runs or runs[0].id <= after_run:
        return False
    return any(s.kind == "pull" and s.host == host for s in state.steps(runs[0].id))


def test_registry_blip_while_host_2_pulls_is_retried(project: Project) -> None:
    """A 2 s registry outage while host 2 pulls is covered by the pull's retries: `pipeline
    run` exits 0 with the new revision serving on both hosts."""
    project.initial_commit()
    assert project.run().ok
    project.remote.write("web/www/index.html", "web v2")
    project.push("v2")
    state = State.in_dir(project.root / "data")
    last_run = state.runs(1)[0].id
    host2 = project.host_names[1]
    with registry_blocked(project.lab, 1) as block:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "-c", str(project.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 240
            while not _pull_started(state, host2, last_run) and proc.poll() is None:
                assert time.monotonic() < deadline, "host 2 never started pulling"
                time.sleep(0.05)
            timer = threading.Timer(BLIP, block.remove)
            timer.start()
            output, _ = proc.communicate(timeout=240)
            timer.cancel()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert block.packets > 0, "host 2 never hit the blocked registry"
    assert proc.returncode == 0, output
    for i in range(2):
        assert project.get(i, project.web_port) == "web v2"
    history = json.loads(project.cli("history", project.web, "--json").stdout)
    assert history[0]["status"] == "succeeded" and history[0]["failure_kind"] is None


def test_registry_down_past_the_retries_is_retried_after_backoff(project: Project) -> None:
    """A registry host 2 cannot reach through every retry rolls back as `infrastructure`;
    the revision waits out its backoff, then the next pass deploys it on both hosts."""
    project.initial_commit()
    assert project.run().ok
    project.remote.write("web/www/index.html", "web v2")
    project.push("v2")
    with registry_blocked(project.lab, 1) as block:
        result = project.run()  # retries without sleeping: the outage outlasts them all
    assert block.packets > 0
    assert not result.ok and "pull" in " ".join(result.errors), result.errors
    for i in range(2):
        assert project.get(i, project.web_port) == "web v1"
    history = json.loads(project.cli("history", project.web, "--json").stdout)
    assert history[0]["status"] == "rolled_back"
    assert history[0]["failure_kind"] == "infrastructure"

    # Within the backoff the revision waits, and the plan says until when.
    waiting = project.run()
    assert waiting.ok and not waiting.rollouts
    (problem,) = [p for p in waiting.plan.problems if p.subject == f"services.{project.web}"]
    assert "infrastructure reason" in problem.message and "retrying after" in problem.message

    # Past the backoff (the state's clock moved 31 s on), the next pass deploys it.
    loaded = load(project.config)
    connections = Connections(loaded, retry=RetryPolicy(sleep=lambda _s: None))
    later = Runner(
        loaded,
        State.in_dir(loaded.data_dir, clock=lambda: time.time() + 31),
        connections,
        sleep=lambda _s: None,
    )
    try:
        retried = later.run_pass()
    finally:
        connections.close()
    assert retried.ok, retried.errors
    assert [r.service for r in retried.rollouts] == [project.web]
    for i in range(2):
        assert project.get(i, project.web_port) == "web v2"
