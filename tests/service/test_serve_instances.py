"""Several `pipeline serve` instances on one PostgreSQL database (a throwaway server, the `pg`
fixture): they share the webhooks' work without building a commit twice or rolling a service
out twice at once, take over from an instance killed mid-rollout, and poll once per interval."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from pg_helpers import PASSWORD, PgServer
from serve_helpers import (
    Serve,
    ServeProcesses,
    ServeProject,
    free_port,
    github_push,
    instances_of,
    start_serve,
    wait_for,
)
from test_serve_e2e import SLOW_HEALTH, build_steps, change_web, with_secret

from pipeline.lab.workrepo import WorkRepo
from pipeline.state.store import State

PASSWORD_ENV = "PIPELINE_TEST_DB_PASSWORD"


def _database(pg: PgServer) -> tuple[str, str]:
    """A new database: (its URL for the config, without password; its URL with it)."""
    name = pg.create_database()
    return pg.url(name, password=False), pg.url(name)


def _polls(serve: Serve) -> float:
    """The poll ticks of repo shop that `serve` ran (its /metrics counter)."""
    text = httpx.get(serve.url + "/metrics", timeout=10, trust_env=False).text
    found = re.search(r'^pipeline_polls_total\{repo="shop"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_repo_polled_every_5s_is_polled_once_per_interval_across_two_instances(
    tmp_path: Path, git_remote: WorkRepo, pg: PgServer
) -> None:
    """Two instances with `poll = "5s"` on one database poll the repo once per 5 s between
    them (each tick claims its interval's slot), not once per instance; both are listed with a
    fresh heartbeat by GET /api/instances."""
    git_remote.write("README", "hello")
    git_remote.commit_push("first")
    database, _ = _database(pg)
    started: list[Serve] = []
    try:
        for n in (1, 2):
            port = free_port()
            config = tmp_path / f"pipeline-{n}.toml"
            config.write_text(
                f'[pipeline]\ndata_dir = "data-{n}"\ndatabase = "{database}"\n'
                f'database_password_env = "{PASSWORD_ENV}"\n\n'
                f'[server]\nlisten = "127.0.0.1:{port}"\n\n'
                f'[repos.shop]\nurl = "{git_remote.url}"\nbranch = "main"\npoll = "5s"\n'
            )
            started.append(
                start_serve(
                    config, f"http://127.0.0.1:{port}", tmp_path / f"serve-{n}.log",
                    env={PASSWORD_ENV: PASSWORD}, watch_repos=False,
                )
            )  # fmt: skip
        time.sleep(2)  # the first ticks (at start) settle
        before, t0 = sum(_polls(s) for s in started), time.monotonic()
        time.sleep(16)
        polls = sum(_polls(s) for s in started) - before
        intervals = (time.monotonic() - t0) / 5
        # One poll per 5 s slot: 3 or 4 slots begin in ~16 s; once per instance would be 6+.
        assert intervals - 1.5 <= polls <= intervals + 1, (polls, intervals)
        listed = started[0].get("/api/instances")
        assert len(listed) == 2 and all(i["alive"] for i in listed), listed
        assert {i["url"] for i in listed} == {s.url for s in started}
        assert all(i["heartbeat_age"] < 5 for i in listed), listed
    finally:
        for serve in started:
            serve.stop()
            print(f"\n----- {serve.log_path} -----\n{serve.log()}")


def _start_instances(
    sp: ServeProject, serve: ServeProcesses, pg: PgServer, count: int, **kwargs: Any
) -> tuple[list[Serve], State]:
    """Deploy the project's first commit through a database of its own, then start `count`
    instances on it; return them and the database's State."""
    database, url = _database(pg)
    sp.env[PASSWORD_ENV] = PASSWORD
    instances = instances_of(sp, database, PASSWORD_ENV, count)
    res = sp.cli("run", "-c", str(instances[0].config))
    assert res.returncode == 0, res.stdout + res.stderr
    return [serve(sp, instance=i, **kwargs) for i in instances], State(url)


def _web_starts(sp: ServeProject, since: float, until: float) -> dict[str, list[tuple[float, int]]]:
    """Host -> (time, release id) of each start of a web container there, from the host's own
    container events."""
    starts: dict[str, list[tuple[float, int]]] = {}
    for host in sp.lab.hosts:
        client = docker.DockerClient(base_url=host.docker_url)
        try:
            events = client.events(
                since=int(since), until=int(until) + 1, decode=True,
                filters={"type": "container", "event": "start",
                         "label": f"dev.pipeline.service={sp.web.name}"},
            )  # fmt: skip
            for ev in events:
                name = ev["Actor"]["Attributes"]["name"]
                found = re.search(r"-r(\d+)$", name)
                if found:
                    starts.setdefault(host.name, []).append((ev["timeNano"] / 1e9, int(found[1])))
        finally:
            client.close()
    return starts


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_twenty_webhooks_to_two_instances_build_each_commit_once_one_rollout_at_a_time(
    sp: ServeProject, serve: ServeProcesses, pg: PgServer
) -> None:
    """20 signed webhooks sent alternately to two instances on one PostgreSQL: every commit is
    built at most once, and web never has two rollouts at once, by its release records and by
    the container starts the hosts report."""
    secret = with_secret(sp)
    base = sp.project.initial_commit()
    (first, second), state = _start_instances(sp, serve, pg, 2, watch_repos=False)
    t0 = time.time()
    before = base
    for i in range(2, 22):
        sha = change_web(sp, f"web v{i}")
        sp.project.remote.push()
        answer = github_push((first, second)[i % 2], "shop", secret, before=before, after=sha)
        assert answer.status_code == 202, answer.text
        before = sha
        time.sleep(0.3)
    wait_for(lambda: sp.serves(sp.web.port, "web v21"), 90, "web v21 everywhere")
    wait_for(
        lambda: not any(e["status"] in ("queued", "working") for e in first.events()),
        60,
        "every event handled",
    )
    events = [e for e in first.events() if e["source"] == "webhook"]
    assert len(events) == 20 and {e["status"] for e in events} <= {"done", "superseded"}, events
    owners = {e["owner"] for e in first.events()}  # cleared when finished: None everywhere
    assert owners == {None}, owners
    runs = {r.owner.rpartition(":")[2] for r in state.runs(1000) if r.trigger == "webhook"}
    assert runs <= {str(first.proc.pid), str(second.proc.pid)}, runs
    built = [
        (b["subject"], b["revision"]) for b in build_steps(first) if b["status"] == "succeeded"
    ]
    assert len(built) == len(set(built)), built  # no image built twice at one commit
    releases = sorted(
        (r for r in state.releases(sp.web.name, limit=100) if r.status != "superseded"),
        key=lambda r: r.started_at,
    )
    for earlier, later in zip(releases, releases[1:], strict=False):
        assert earlier.finished_at is not None and earlier.finished_at <= later.started_at, (
            earlier.id, later.id,
        )  # fmt: skip
    spans = {r.id: (r.started_at.timestamp(), r.finished_at.timestamp()) for r in releases
             if r.finished_at is not None}  # fmt: skip
    starts = _web_starts(sp, t0, time.time())
    assert starts, "no container start seen on the hosts"
    for host, seen in starts.items():
        ids = [release for _, release in sorted(seen)]
        assert ids == sorted(ids), (host, ids)  # one rollout after the other on every host
        for at, release in seen:
            begin, end = spans[release]
            assert begin - 1 <= at <= end + 1, (host, release, at, spans[release])


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_of_the_instance_rolling_out_is_taken_over_within_10s(
    sp: ServeProject, serve: ServeProcesses, pg: PgServer
) -> None:
    """`kill -9` of the instance rolling web out: the other instance puts the interrupted
    rollout back within 10 s, rolls the commit out again, and every service ends healthy on
    one revision on every host."""
    secret = with_secret(sp)
    base = sp.project.initial_commit()
    sp.web.health = SLOW_HEALTH  # ~2s of checks per host: a rollout to catch in the middle
    sp.write_config()
    instances, state = _start_instances(sp, serve, pg, 2, watch_repos=False)
    sha = change_web(sp, "web v2")
    sp.project.remote.push()
    answer = github_push(instances[0], "shop", secret, before=base, after=sha)
    assert answer.status_code == 202, answer.text

    def rolling() -> Serve | None:
        for rel in state.releases(sp.web.name, limit=5):
            run = state.run(rel.run_id) if rel.status == "running" and rel.run_id else None
            hosts = state.rollouts.release_hosts(rel.id) if run else []
            if run and any(h.phase != "planned" for h in hosts):
                pid = run.owner.rpartition(":")[2]
                return next(s for s in instances if str(s.proc.pid) == pid)
        return None

    holder = wait_for(rolling, 60, "a rollout of web in progress", every=0.05)
    crashed = state.releases(sp.web.name)[0]
    assert (crashed.revision, crashed.status) == (sha, "running")
    holder.kill9()
    killed_at = time.monotonic()
    survivor = next(s for s in instances if s is not holder)

    def taken_over() -> bool:
        return any(
            r.id == crashed.id and r.status != "running"
            for r in state.releases(sp.web.name, limit=20)
        )

    wait_for(taken_over, 10, "the interrupted rollout taken over", every=0.1)
    assert time.monotonic() - killed_at < 10
    wait_for(lambda: sp.serves(sp.web.port, "web v2"), 90, "web v2 everywhere")

    def settled() -> list[dict[str, Any]] | None:
        if any(e["status"] in ("queued", "working") for e in survivor.events()):
            return None
        rows: list[dict[str, Any]] = survivor.get("/api/status")
        return rows

    status = wait_for(settled, 60, "every event handled by the survivor")
    by_service: dict[str, set[tuple[str, str]]] = {}
    for row in status:
        by_service.setdefault(row["service"], set()).add((row["revision"], row["state"]))
    assert by_service[sp.web.name] == {(sha, "running")}, status
    assert len(by_service[sp.project.api]) == 1, status
    assert all(state == "running" for _, state in by_service[sp.project.api]), status
    history = [(r.revision, r.status) for r in state.releases(sp.web.name, limit=5)]
    assert history[:2] == [(sha, "succeeded"), (sha, "interrupted")], history
    assert all(len(ids) == 1 for ids in sp.containers(sp.web.name).values())
    listed = {i["owner"]: i["alive"] for i in survivor.get("/api/instances")}
    assert sum(listed.values()) == 1, listed
