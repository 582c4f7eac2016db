"""The long-running service on real git repos and a real SQLite state, without Docker: configs
have repos only, so every run is a fetch and an empty plan."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from pipeline.lab.workrepo import WorkRepo as GitRemote
from pipeline.service.daemon import Service
from pipeline.sources.git import Mirror
from pipeline.sources.schedule import backoff_interval, poll_jitter
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

pytestmark = pytest.mark.timeout(60)


def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_config(path: Path, repos: dict[str, dict[str, str]], extra: str = "") -> None:
    """A config of repos only (no hosts, images or services), data in path's directory."""
    lines = ['[pipeline]\ndata_dir = "data"\n', '[server]\nlisten = "127.0.0.1:0"\n']
    for name, keys in repos.items():
        lines.append(f"[repos.{name}]")
        lines += [f'{k} = "{v}"' for k, v in keys.items()]
        lines.append("")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + extra)
    tmp.replace(path)  # atomic, as editors save


def events(service: Service) -> list[dict[str, Any]]:
    return list(reversed(service.queue.recent(200)))


def finished_event(service: Service, **match: Any) -> dict[str, Any] | None:
    for ev in events(service):
        if all(ev[k] == v for k, v in match.items()) and ev["status"] in ("done", "superseded"):
            return ev
    return None


@pytest.fixture
def make_remote(tmp_path: Path) -> Callable[[str], GitRemote]:
    """`make_remote("a")`: a bare repo with one commit pushed to main, under tmp_path/a."""

    def make(name: str) -> GitRemote:
        root = tmp_path / name
        root.mkdir()
        remote = GitRemote(root)
        remote.write("README", f"{name} v1\n")
        remote.commit("first")
        remote.push()
        return remote

    return make


@pytest.fixture
def services() -> Iterator[Callable[..., Service]]:
    """`services(config_path, **kwargs)` starts a Service; every one is stopped at teardown."""
    started: list[Service] = []

    def start(config: Path, **kwargs: Any) -> Service:
        service = Service(config, **kwargs)
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(timeout=10)


def test_backoff_doubles_per_failure_and_caps_at_ten_minutes() -> None:
    """A failing repo is polled at double its interval per consecutive failure, at most 600s."""
    table = [(30, 0, 30), (30, 1, 60), (30, 2, 120), (30, 5, 600), (30, 9, 600), (900, 3, 900)]
    for interval, failures, expected in table:
        assert backoff_interval(interval, failures) == expected
    assert poll_jitter(10) == 1.0 and poll_jitter(600) == 5.0


def test_poll_detects_a_new_commit_within_seconds(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """A commit pushed to a polled file:// repo becomes a "poll" event and a finished run."""
    remote = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": remote.url, "poll": "1s"}})
    service = services(config, watch_repos=False)
    assert service.url and httpx.get(f"{service.url}/healthz").status_code == 200
    # The first poll finds no mirror yet and queues a catch-up run, which creates it.
    wait_for(lambda: finished_event(service, repo="app", source="poll"), what="first poll run")
    remote.write("README", "app v2\n")
    sha = remote.commit("second")
    remote.push()
    pushed = time.monotonic()
    ev = wait_for(lambda: finished_event(service, sha=sha), timeout=8, what="poll of new commit")
    assert ev["source"] == "poll" and ev["kind"] == "push" and ev["run_id"]
    assert time.monotonic() - pushed < 5
    run = service.state.run(ev["run_id"])
    assert run is not None and run.status == "noop" and run.trigger == "poll"


def test_watched_local_repo_triggers_at_once_without_polling(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """A push to a repo configured by absolute path is seen through its refs, with no poll set."""
    remote = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": str(remote.bare)}})
    service = services(config)
    wait_for(lambda: finished_event(service, repo="app", source="watch"), what="catch-up run")
    remote.write("README", "app v2\n")
    sha = remote.commit("second")
    remote.push()
    pushed = time.monotonic()
    ev = wait_for(lambda: finished_event(service, sha=sha), timeout=5, what="watch event")
    assert ev["source"] == "watch"
    assert time.monotonic() - pushed < 3
    assert not [e for e in events(service) if e["source"] == "poll"]


def test_repo_added_to_config_is_polled_without_restart(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """Adding a repo to the config file while serving gets it polled, and queues a config run."""
    one, two = make_remote("one"), make_remote("two")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"one": {"url": one.url, "poll": "1s"}})
    service = services(config, watch_repos=False)
    wait_for(lambda: finished_event(service, repo="one"), what="first repo polled")
    write_config(
        config, {"one": {"url": one.url, "poll": "1s"}, "two": {"url": two.url, "poll": "1s"}}
    )
    wait_for(lambda: "two" in service.loaded.model.repos, what="config reloaded")
    wait_for(lambda: finished_event(service, repo="two", source="poll"), what="second repo polled")
    assert wait_for(lambda: finished_event(service, kind="config"), what="config run")


def test_invalid_config_edit_keeps_the_running_config(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """An invalid edit is logged problem by problem (file:line: key) and the old config stays."""
    remote = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": remote.url, "poll": "1s"}})
    service = services(config, watch_repos=False)
    before = service.loaded
    with structlog.testing.capture_logs() as logged:
        write_config(config, {"app": {"url": remote.url, "poll": "soon"}})
        wait_for(
            lambda: any(e["event"] == "config.invalid_kept_running" for e in logged),
            what="invalid config logged",
        )
    problems = [e["problem"] for e in logged if e["event"] == "config.problem"]
    assert any("pipeline.toml:" in p and "repos.app.poll" in p for p in problems), problems
    assert service.loaded is before
    # Still serving and working on the old config.
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    remote.write("README", "app v2\n")
    sha = remote.commit("second")
    remote.push()
    wait_for(lambda: finished_event(service, sha=sha), what="poll after invalid edit")


def _dead_owner() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


def test_events_left_working_by_a_dead_owner_are_processed_on_start(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """An event claimed by a process that died (kill -9) is requeued and run at the next start."""
    remote = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": remote.url}})
    state = State.in_dir(tmp_path / "data")
    queue = EventQueue(state)
    event_id, _ = queue.put(source="webhook", kind="push", repo="app", sha=None)
    claimed = queue.claim(_dead_owner())
    assert [e.id for e in claimed] == [event_id]
    stale_run = state.start_run("webhook", "app", owner=_dead_owner())
    service = services(config, watch_repos=False)
    ev = wait_for(lambda: finished_event(service, id=event_id), what="requeued event done")
    assert ev["status"] == "done" and ev["run_id"]
    stale = state.run(stale_run)
    assert stale is not None and stale.status == "interrupted"


def test_older_pushes_of_a_repo_are_superseded_by_the_newest(
    tmp_path: Path, make_remote: Callable[[str], GitRemote]
) -> None:
    """Pushes queued together run once: the newest is done, the older ones superseded by it."""
    remote = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": remote.url}})
    queue = EventQueue(State.in_dir(tmp_path / "data"))
    older = remote.commit_push("second")
    newest = remote.commit_push("third")
    first, _ = queue.put(source="webhook", kind="push", repo="app", sha=older)
    second, _ = queue.put(source="webhook", kind="push", repo="app", sha=newest)
    service = Service(config, watch_repos=False)
    finished = service.work_until(lambda: queue.depth() == 0)
    assert finished
    by_id = {e["id"]: e for e in service.queue.recent()}
    assert by_id[second]["status"] == "done"
    assert by_id[first]["status"] == "superseded"
    assert by_id[first]["note"] == f"superseded by {newest[:12]}"
    assert by_id[first]["run_id"] == by_id[second]["run_id"]


def test_failing_repo_backs_off_while_others_carry_on(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """A repo whose remote is gone doubles its poll interval; a healthy one keeps its own."""
    good, bad = make_remote("good"), make_remote("bad")
    config = tmp_path / "pipeline.toml"
    write_config(
        config, {"good": {"url": good.url, "poll": "1s"}, "bad": {"url": bad.url, "poll": "1s"}}
    )

    def failures(repo: str) -> list[dict[str, Any]]:
        return [e for e in list(logged) if e["event"] == "poll.failed" and e["repo"] == repo]

    with structlog.testing.capture_logs() as logged:
        service = services(config, watch_repos=False)
        wait_for(lambda: finished_event(service, repo="bad"), what="bad repo mirrored")
        subprocess.run(["rm", "-rf", str(bad.bare)], check=True)
        wait_for(
            lambda: any(e["retry_in"] >= 2 for e in failures("bad")), what="backoff of the bad repo"
        )
        good.write("README", "good v2\n")
        sha = good.commit("second")
        good.push()
        # generous: on a loaded machine a pass of the good repo can take seconds
        wait_for(
            lambda: finished_event(service, sha=sha), what="good repo still polled", timeout=30
        )
    assert failures("good") == []


def test_stop_returns_promptly_and_requeues_nothing_lost(
    tmp_path: Path, make_remote: Callable[[str], GitRemote]
) -> None:
    """stop() (what SIGTERM calls) ends the server, timers, watchers and worker within seconds."""
    remote = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": str(remote.bare), "poll": "1s"}})
    service = Service(config)
    service.start()
    url = service.url
    wait_for(lambda: finished_event(service, repo="app"), what="first run")
    started = time.monotonic()
    service.stop(timeout=10)
    assert time.monotonic() - started < 3
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=1)
    assert not [e for e in service.queue.recent() if e["status"] == "working"]


def test_a_service_whose_rollout_was_interrupted_is_queued_for_redeploy(
    tmp_path: Path, make_remote: Callable[[str], GitRemote]
) -> None:
    """At start, a service whose latest release was interrupted by a crash gets one "recover"
    deploy event pinned to that release's revision (queued once, however often it restarts)."""
    remote = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(
        config,
        {"app": {"url": remote.url}},
        extra='[hosts.h1]\ndocker = "tcp://127.0.0.1:1"\n\n[images.web]\nrepo = "app"\n\n'
        '[services.web]\nimage = "web"\nhosts = ["h1"]\n',
    )
    state = State.in_dir(tmp_path / "data")
    run_id = state.start_run("webhook", "app", owner=_dead_owner())
    state.start_release(
        "web", "c" * 40, "sha256:" + "d" * 64, "web@sha256:x", "spec", kind="deploy",
        reason="new commit", run_id=run_id,
    )  # fmt: skip
    for _ in range(2):  # the hook fallback opens the service without processing anything
        assert Service(config).work_until(lambda: True)
    recover = [e for e in EventQueue(state).recent() if e["source"] == "recover"]
    assert len(recover) == 1
    assert recover[0]["kind"] == "deploy" and recover[0]["subject"] == "web"
    assert recover[0]["sha"] == "c" * 40 and recover[0]["status"] == "queued"
    assert state.releases("web")[0].status == "interrupted"


def test_a_revision_failed_for_infrastructure_is_retried_without_a_push(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """With no poll and no push, the service queues exactly one "retry" push of the repo of a
    revision that failed for an infrastructure reason, when its backoff ends, and none for a
    revision that failed its health check."""
    app, other = make_remote("app"), make_remote("other")
    config = tmp_path / "pipeline.toml"
    write_config(
        config,
        {"app": {"url": app.url}, "other": {"url": other.url}},
        extra='[hosts.h1]\ndocker = "tcp://127.0.0.1:1"\n\n'
        '[images.web]\nrepo = "app"\n\n[images.api]\nrepo = "other"\n\n'
        '[services.web]\nimage = "web"\nhosts = ["h1"]\n\n'
        '[services.api]\nimage = "api"\nhosts = ["h1"]\n',
    )
    # Both failed 28 s ago, by the state's clock: web's 30 s backoff ends in 2 s.
    state = State.in_dir(tmp_path / "data", clock=lambda: time.time() - 28)
    failures = (("web", "b" * 40, "infrastructure"), ("api", "c" * 40, "unhealthy"))
    for name, revision, kind in failures:
        rel = state.start_release(
            name, revision, "sha256:" + "d" * 64, "r@sha256:x", "spec", kind="deploy",
            reason="new commit", run_id=None,
        )  # fmt: skip
        state.finish_release(rel, "rolled_back", "it failed", failure_kind=kind)  # type: ignore[arg-type]
    until = state.infrastructure_retries(["web"])["web"].until
    assert until is not None

    service = services(config, watch_repos=False)
    ev = wait_for(lambda: finished_event(service, source="retry"), what="retry event run")
    assert ev["repo"] == "app" and ev["kind"] == "push" and ev["sha"] == "b" * 40
    assert datetime.fromisoformat(ev["received_at"]).timestamp() >= until
    run = service.state.run(ev["run_id"])
    assert run is not None and run.trigger == "retry"
    # Later passes (here: pushes of both repos) queue no second retry.
    queue = service.queue
    later = [queue.put(source="webhook", kind="push", repo=r)[0] for r in ("app", "other")]
    service.wake()
    for event_id in later:
        wait_for(lambda i=event_id: finished_event(service, id=i), what=f"event {event_id}")
    assert [e["repo"] for e in events(service) if e["source"] == "retry"] == ["app"]


# -- announced commits not on the remote yet -------------------------------------------------

WEB_ON_APP = (
    '[hosts.h1]\ndocker = "tcp://127.0.0.1:1"\n\n[images.web]\nrepo = "app"\n\n'
    '[services.web]\nimage = "web"\nhosts = ["h1"]\n'
)


def deferred(service: Service, event_id: int) -> dict[str, Any] | None:
    """The event when it is back in the queue waiting for its commit, else None."""
    ev = next(e for e in events(service) if e["id"] == event_id)
    return ev if ev["status"] == "queued" and ev["not_before"] else None


def test_a_push_announced_before_its_commit_waits_for_it_without_holding_up_others(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """A push event whose commit is not on the remote yet waits in the queue, saying so, while
    another repo's push is handled; once the commit is pushed, it is deployed by that event."""
    app, other = make_remote("app"), make_remote("other")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": app.url}, "other": {"url": other.url}})
    service = services(config, watch_repos=False)
    sha = app.commit("announced early")  # committed, not pushed: the remote lags
    event_id, _ = service.queue.put(source="webhook", kind="push", repo="app", sha=sha)
    service.wake()
    ev = wait_for(lambda: deferred(service, event_id), what="the event waiting for its commit")
    assert ev["note"].startswith(f"waiting for announced commit {sha[:12]} to appear"), ev
    other_sha = other.commit_push("meanwhile")
    other_id, _ = service.queue.put(source="webhook", kind="push", repo="other", sha=other_sha)
    service.wake()
    wait_for(lambda: finished_event(service, id=other_id), what="the other repo's push")
    assert deferred(service, event_id), "the wait ended before the commit was pushed"
    app.push()
    ev = wait_for(lambda: finished_event(service, id=event_id), what="the announced commit")
    run = service.state.run(ev["run_id"])
    assert ev["status"] == "done" and run is not None and run.revision == sha


def test_a_restart_during_the_wait_keeps_the_event_and_resumes_it(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """A service stopped while an event waits for its commit leaves it queued; the next start
    fetches again on the same schedule and deploys the commit once it is there."""
    app = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": app.url}})
    first = services(config, watch_repos=False)
    sha = app.commit("announced early")
    event_id, _ = first.queue.put(source="webhook", kind="push", repo="app", sha=sha)
    first.wake()
    wait_for(lambda: deferred(first, event_id), what="the event waiting for its commit")
    first.stop(timeout=10)
    assert deferred(first, event_id), "the stop lost the waiting event"
    app.push()
    second = services(config, watch_repos=False)
    ev = wait_for(lambda: finished_event(second, id=event_id), what="the resumed event")
    run = second.state.run(ev["run_id"])
    assert ev["status"] == "done" and run is not None and run.revision == sha


def test_a_commit_that_never_appears_fails_with_its_message_in_history_and_api(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """With `announced_commit_timeout = "2s"`, a push of a commit that never reaches the remote
    ends failed within seconds, "announced commit C never appeared on the remote", in the
    events and runs API and in `pipeline history` (the full sha in --json)."""
    app = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": app.url}}, extra=WEB_ON_APP)
    text = config.read_text().replace("[server]\n", '[server]\nannounced_commit_timeout = "2s"\n')
    config.write_text(text)
    # The mirror is up to date already, so no pass (and no build) runs for the head.
    Mirror(app.url, tmp_path / "data" / "git" / "app.git").fetch(branch="main")
    sha = app.commit("never pushed")
    service = services(config, watch_repos=False)
    started = time.monotonic()
    event_id, _ = service.queue.put(source="webhook", kind="push", repo="app", sha=sha)
    service.wake()
    message = f"announced commit {sha[:12]} never appeared on the remote"

    def failed() -> dict[str, Any] | None:
        ev = next(e for e in events(service) if e["id"] == event_id)
        return ev if ev["status"] == "failed" else None

    ev = wait_for(failed, what="the event failed")
    assert time.monotonic() - started < 6
    api = httpx.get(f"{service.url}/api/events", timeout=5).json()
    assert [(e["status"], e["note"], e["sha"]) for e in api if e["id"] == event_id] == [
        ("failed", message, sha)
    ]
    run = httpx.get(f"{service.url}/api/runs/{ev['run_id']}", timeout=5).json()
    assert (run["status"], run["error"]) == ("failed", message), run
    assert [(r["revision"], r["status"], r["error"]) for r in run["releases"]] == [
        (sha, "failed", message)
    ]
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "history", "--json", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [
        (h["service"], h["revision"], h["status"], h["failure_kind"], h["error"])
        for h in (json.loads(res.stdout))
    ]
    assert rows == [("web", sha, "failed", "never_appeared", message)], rows
    table = subprocess.run(
        [sys.executable, "-m", "pipeline", "history", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert message[:60] in table.stdout and sha[:12] in table.stdout, table.stdout


def test_a_commit_force_pushed_away_fails_and_the_new_head_is_fetched(
    tmp_path: Path, make_remote: Callable[[str], GitRemote], services: Callable[..., Service]
) -> None:
    """A commit that was on the remote and was force-pushed away (the mirror still has it)
    ends failed rather than waiting forever; the head that replaced it is passed meanwhile."""
    app = make_remote("app")
    config = tmp_path / "pipeline.toml"
    write_config(config, {"app": {"url": app.url}})
    config.write_text(
        config.read_text().replace("[server]\n", '[server]\nannounced_commit_timeout = "2s"\n')
    )
    service = services(config, watch_repos=False)
    gone = app.commit_push("pushed, then force-pushed away")
    first, _ = service.queue.put(source="webhook", kind="push", repo="app", sha=gone)
    service.wake()
    wait_for(lambda: finished_event(service, id=first), what="the first delivery")
    subprocess.run(["git", "reset", "-q", "--hard", "HEAD~1"], cwd=app.work, check=True)
    head = app.commit("the rewrite")
    app.push(force=True)
    again, _ = service.queue.put(source="webhook", kind="push", repo="app", sha=gone)
    service.wake()
    ev = wait_for(
        lambda: next((e for e in events(service) if e["id"] == again and e["status"] == "failed"),
                     None),
        what="the redelivery failed",
    )  # fmt: skip
    assert ev["note"] == f"announced commit {gone[:12]} never appeared on the remote"
    assert head in {r.revision for r in service.state.runs()}
