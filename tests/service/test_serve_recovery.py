"""Crash recovery of `pipeline serve` on the lab: after `kill -9` mid-rollout, the restart puts
every host back on what was recorded before it was touched."""

from __future__ import annotations

import time
from typing import Any

import pytest
from serve_helpers import ServeProcesses, ServeProject, wait_for

from pipeline.config.load import load
from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(240)]




def test_kill_9_during_the_check_of_a_bad_revision_restores_the_old_one_everywhere(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """After `kill -9` of `pipeline serve` while host 1 checks a revision whose /health is 404,
    the restart puts host 1's old container back (running), both hosts serve the old revision,
    the release is interrupted, and the bad revision is tried at most once more."""
    sp.project.initial_commit()
    res = sp.cli("run")
    assert res.returncode == 0, res.stdout + res.stderr
    before = sp.containers(sp.web.name)
    host1 = sp.lab.hosts[0].name
    sp.web.health = 'interval = "200ms"\ntimeout = "60s"'  # a check long enough to be caught
    sp.write_config()
    srv = serve(sp)  # the local repo's refs are watched: the push below triggers the run
    remote = sp.project.remote
    (remote.work / "web" / "www" / "health").unlink()
    remote.write("web/www/index.html", "web broken")
    sha = remote.commit("break health")
    remote.push()

    def checking_host1() -> bool:
        running = [r for r in srv.runs() if r["status"] == "running"]
        steps = [s for r in running for s in srv.run(r["id"])["steps"]]
        return any(
            s["kind"] == "health" and s["subject"] == sp.web.name and s["host"] == host1
            and s["status"] == "running" for s in steps
        )  # fmt: skip

    wait_for(checking_host1, 60, "host 1 checking the bad revision", every=0.05)
    srv.kill9()
    state = State.in_dir(load(sp.config).data_dir)
    crashed = state.releases(sp.web.name)[0]
    assert (crashed.revision, crashed.status) == (sha, "running")
    sp.web.health = 'interval = "200ms"\ntimeout = "3s"'  # the fresh attempt fails fast
    sp.write_config()
    srv = serve(sp)

    def settled() -> bool:
        return not any(e["status"] in ("queued", "working") for e in srv.events())

    wait_for(settled, 90, "every event handled after the restart")
    time.sleep(2)  # nothing more may start on its own
    assert settled()
    assert sp.serves(sp.web.port, "web v1")
    assert sp.containers(sp.web.name) == before  # the old containers, running again
    releases = [(r.revision, r.status, r.failure_kind) for r in state.releases(sp.web.name)]
    of_bad = [(status, kind) for rev, status, kind in releases if rev == sha]
    assert ("interrupted", "interrupted") in of_bad, releases
    assert len(of_bad) <= 2, releases  # the interrupted one and at most one fresh attempt
    assert all(status != "running" for status, _ in of_bad), releases
    rows: list[dict[str, Any]] = sp.cli_json("status")
    web = {(r["host"], r["state"]) for r in rows if r["service"] == sp.web.name}
    assert web == {(h.name, "running") for h in sp.lab.hosts}, rows
