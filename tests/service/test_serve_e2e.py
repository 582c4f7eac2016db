"""`pipeline serve` end to end, as a new user meets it: the real CLI in a child process, its
config file, its HTTP API, real `git push`es, real lab hosts, engines and registry."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from deploy_helpers import registry_blocked
from serve_helpers import (
    App,
    Repo,
    Serve,
    ServeProcesses,
    ServeProject,
    github_push,
    wait_for,
)

from pipeline.lab.sample_app import BUSYBOX, DOCKERFILE, write_sample_app
from pipeline.lab.workrepo import GIT_ENV, GIT_ID, git
from pipeline.lab.workrepo import WorkRepo as GitRemote

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(240)]

DEPLOY_DEADLINE = 30.0




def with_secret(sp: ServeProject) -> str:
    """Give repo shop a webhook secret, in the env var the config names; return the secret."""
    env = f"PIPELINE_E2E_SECRET_{uuid.uuid4().hex[:8].upper()}"
    secret = secrets.token_hex(16)
    sp.env[env] = secret
    sp.repos["shop"].secret_env = env
    sp.write_config()
    return secret


def change_web(sp: ServeProject, text: str) -> str:
    """Commit (not push) web's page saying `text`; return the commit's sha."""
    sp.project.remote.write("web/www/index.html", text)
    return sp.project.remote.commit(text)


def git_push(remote: GitRemote) -> tuple[int, str]:
    """`git push origin main` as a user types it; return its exit code and all it printed."""
    res = subprocess.run(
        ["git", *GIT_ID, "push", "origin", "main:refs/heads/main"],
        cwd=remote.work, env=GIT_ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    return res.returncode, res.stdout + res.stderr


def build_steps(serve: Serve) -> list[dict[str, Any]]:
    """Every build step of every run the service shows, oldest first."""
    return [s for r in serve.runs() for s in serve.run(r["id"])["steps"] if s["kind"] == "build"]


# -- 1. webhooks ----------------------------------------------------------------------------


def test_signed_github_webhook_deploys_once_and_refuses_bad_deliveries(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """A signed GitHub push delivery deploys the new commit on every host; its redelivery is a
    duplicate queued once, a bad signature is 401 and a 10 MB body 413, neither queued."""
    secret = with_secret(sp)
    first = sp.project.initial_commit()
    res = sp.cli("run")  # v1 everywhere before the service starts
    assert res.returncode == 0, res.stdout + res.stderr
    # No poll and no watch of the local repo: only the webhook can trigger.
    srv = serve(sp, watch_repos=False)
    sha = change_web(sp, "web v2")
    sp.project.remote.push()
    delivery = str(uuid.uuid4())
    answer = github_push(srv, "shop", secret, before=first, after=sha, delivery=delivery)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "queued"
    event_id = answer.json()["event_id"]
    wait_for(lambda: sp.serves(sp.web.port, "web v2"), DEPLOY_DEADLINE, "web v2 on every host")

    again = github_push(srv, "shop", secret, before=first, after=sha, delivery=delivery)
    assert again.status_code == 200, again.text
    assert again.json() == {"status": "duplicate", "event_id": event_id}
    forged = github_push(
        srv, "shop", secret, before=first, after=sha, signature="sha256=" + "0" * 64
    )
    assert forged.status_code == 401, forged.text
    assert "X-Hub-Signature-256" in forged.json()["error"]
    huge = github_push(srv, "shop", secret, before=first, after=sha, body=b"x" * 10_000_000)
    assert huge.status_code == 413, huge.text

    events = wait_for(
        lambda: [e for e in srv.events() if e["status"] in ("done", "failed")] and srv.events(),
        what="the event finished",
    )
    assert [(e["id"], e["source"], e["sha"], e["delivery_id"]) for e in events] == [
        (event_id, "webhook", sha, delivery)
    ]
    assert events[0]["status"] == "done", events[0]
    runs = srv.runs()
    assert [(r["trigger"], r["status"]) for r in runs] == [
        ("cli", "succeeded"),
        ("webhook", "succeeded"),
    ], runs
    web = [
        (r["revision"], r["state"]) for r in sp.cli_json("status") if r["service"] == sp.web.name
    ]
    assert web == [(sha, "running"), (sha, "running")], web


def test_a_webhook_sent_before_its_commit_is_pushed_deploys_that_commit(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """A push webhook that arrives 3 s before its commit reaches the remote (a hosting service
    replicating with a lag), with no polling, waits for it and ends with that commit serving on
    every host."""
    secret = with_secret(sp)
    first = sp.project.initial_commit()
    res = sp.cli("run")
    assert res.returncode == 0, res.stdout + res.stderr
    srv = serve(sp, watch_repos=False)  # no poll, no watch: only the webhook can trigger
    sha = change_web(sp, "web v2")  # committed, not on the remote yet
    answer = github_push(srv, "shop", secret, before=first, after=sha)
    assert answer.status_code == 202, answer.text
    event_id = answer.json()["event_id"]
    time.sleep(3)

    def event() -> dict[str, Any]:
        return next(e for e in srv.events() if e["id"] == event_id)

    # Between its fetches the event is back in the queue; a look may fall on a fetch
    # ("working"), so look again until it is seen waiting.
    waiting = wait_for(
        lambda: (e := event())["status"] == "queued" and e, 10, "the event waiting in the queue"
    )
    assert waiting["status"] == "queued", waiting
    assert f"waiting for announced commit {sha[:12]}" in (waiting["note"] or ""), waiting
    assert sp.serves(sp.web.port, "web v1")
    sp.project.remote.push()
    wait_for(lambda: sp.serves(sp.web.port, "web v2"), DEPLOY_DEADLINE, "web v2 on every host")
    done = wait_for(
        lambda: [e for e in srv.events() if e["id"] == event_id and e["status"] == "done"],
        DEPLOY_DEADLINE,
        "the event done",
    )
    assert srv.run(done[0]["run_id"])["revision"] == sha
    web = [
        (r["revision"], r["state"]) for r in sp.cli_json("status") if r["service"] == sp.web.name
    ]
    assert web == [(sha, "running"), (sha, "running")], web


# -- 2. git push to a bare repo with the hooks ---------------------------------------------

INVALID_PIPELINE_TOML = """\
[repos.shop]
url = "/srv/shop.git"

[services.web]
image = "web"
hosts = ["h1"]

[services.web.health]
timeout = "soon"
"""


def test_git_push_shows_build_rollout_and_url_and_refuses_invalid_pipeline_toml(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """`git push` through the installed hooks prints the build, the rollout and the URL now
    serving; a commit whose pipeline.toml is invalid is refused with file:line, key and why."""
    remote = sp.project.remote
    res = sp.cli("hooks", "install", str(remote.bare), "--repo", "shop")
    assert res.returncode == 0, res.stdout + res.stderr
    srv = serve(sp)  # as a user runs it: local repos' refs watched too
    write_sample_app(remote.work, "web", "web v1")
    write_sample_app(remote.work, "api", "api v1")
    sha = remote.commit("first")
    code, output = git_push(remote)
    assert code == 0, output
    remote_lines = [line for line in output.splitlines() if line.startswith("remote: ")]
    text = "\n".join(remote_lines)
    web, host1 = sp.web.name, sp.lab.hosts[0]
    for expected in (
        f"build {web}",
        f"push {web}",
        f"pull {web} on {host1.name}: succeeded",
        f"health {web} on {host1.name}: succeeded",
        f"{web} {sha[:12]} serving at http://{host1.address}:{sp.web.port}/",
    ):
        assert expected in text, f"{expected!r} not in the push's output:\n{output}"
    assert "succeeded" in text and "FAILED" not in text, output
    assert sp.serves(sp.web.port, "web v1") and sp.serves(sp.app(sp.project.api).port, "api v1")

    remote.write("pipeline.toml", INVALID_PIPELINE_TOML)
    change_web(sp, "web v2")
    code, output = git_push(remote)
    assert code != 0, output
    assert "remote: pipeline: push of refs/heads/main refused: pipeline.toml is invalid" in output
    assert "remote:   pipeline.toml:9: services.web.health.timeout: invalid duration 'soon'" in (
        output
    ), output
    assert "remote:   pipeline.toml:5: services.web.image: unknown image 'web'" in output, output
    assert git("rev-parse", "refs/heads/main", cwd=remote.bare) == sha
    assert sp.serves(sp.web.port, "web v1")
    assert not [e for e in srv.events() if e["status"] in ("queued", "working")]


# -- 3. a burst of pushes --------------------------------------------------------------------


def test_ten_pushes_in_a_second_build_only_the_newest(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """Ten pushes in a second, each announced by a webhook, give exactly one build, of the
    newest commit, which serves everywhere; history shows the nine others as superseded."""
    secret = with_secret(sp)
    base = sp.project.initial_commit()
    res = sp.cli("run")
    assert res.returncode == 0, res.stdout + res.stderr
    # The ten commits land in the repo before the service runs (a webhook is only ever sent
    # after its push), so every delivery finds all of them there.
    shas = []
    started = time.monotonic()
    for i in range(2, 12):
        shas.append(change_web(sp, f"web v{i}"))
        sp.project.remote.push()
    assert time.monotonic() - started < 5
    srv = serve(sp, watch_repos=False)
    before = base
    for sha in shas:
        answer = github_push(srv, "shop", secret, before=before, after=sha)
        assert answer.status_code == 202, answer.text
        before = sha
    wait_for(lambda: sp.serves(sp.web.port, "web v11"), DEPLOY_DEADLINE, "web v11 everywhere")
    events = wait_for(
        lambda: (
            all(e["status"] not in ("queued", "working") for e in srv.events()) and srv.events()
        ),
        DEPLOY_DEADLINE,
        "every event handled",
    )
    assert len(events) == 10 and {e["status"] for e in events} <= {"done", "superseded"}, events
    builds = [(b["revision"], b["status"]) for b in build_steps(srv) if b["subject"] == sp.web.name]
    # The CLI's first run built web at the base commit; the ten pushes built it once more.
    assert builds == [(base, "succeeded"), (shas[-1], "succeeded")], builds
    history = sp.cli_json("history", sp.web.name)
    assert history[0]["revision"] == shas[-1] and history[0]["status"] == "succeeded", history
    newest = [h["status"] for h in history if h["revision"] == shas[-1]]
    assert newest == ["succeeded"], history  # rolled out once, not undone by late deliveries
    superseded = [h["revision"] for h in history if h["status"] == "superseded"]
    assert sorted(superseded) == sorted(shas[:-1]), history
    status = sp.cli_json("status")
    assert {(r["revision"], r["state"]) for r in status if r["service"] == sp.web.name} == {
        (shas[-1], "running")
    }


# -- 4. kill -9 mid-rollout ------------------------------------------------------------------

SLOW_HEALTH = 'interval = "1s"\nhealthy_threshold = 3\ntimeout = "20s"\nmonitor = "300ms"'


def test_kill_9_mid_rollout_then_restart_ends_on_one_revision_everywhere(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """After `kill -9` of the service in the middle of a rollout and a restart, every service
    ends running and healthy on one revision on every host, and the push event is handled."""
    sp.project.initial_commit()
    res = sp.cli("run")
    assert res.returncode == 0, res.stdout + res.stderr
    sp.web.health = SLOW_HEALTH  # ~2s of checks per host: a rollout to catch in the middle
    sp.write_config()
    srv = serve(sp)
    sha = change_web(sp, "web v2")
    sp.project.remote.push()

    def mid_rollout() -> bool:
        running = [r for r in srv.runs() if r["status"] == "running"]
        steps = [s for r in running for s in srv.run(r["id"])["steps"]]
        return any(
            s["kind"] in ("start", "health") and s["subject"] == sp.web.name
            and s["status"] == "running" for s in steps
        )  # fmt: skip

    wait_for(mid_rollout, DEPLOY_DEADLINE, "a rollout of web in progress", every=0.05)
    srv.kill9()
    crashed = sp.cli_json("history", sp.web.name)[0]
    assert (crashed["revision"], crashed["status"]) == (sha, "running"), crashed
    srv = serve(sp)

    def settled() -> list[dict[str, Any]] | None:
        if any(e["status"] in ("queued", "working") for e in srv.events()):
            return None
        rows: list[dict[str, Any]] = sp.cli_json("status")
        return rows

    status = wait_for(settled, 60, "every event handled after the restart")
    by_service: dict[str, set[tuple[str, str]]] = {}
    for row in status:
        by_service.setdefault(row["service"], set()).add((row["revision"], row["state"]))
    assert by_service[sp.web.name] == {(sha, "running")}, status
    assert len(by_service[sp.project.api]) == 1 and all(
        state == "running" for _, state in by_service[sp.project.api]
    ), status
    assert sp.serves(sp.web.port, "web v2")
    assert all(len(ids) == 1 for ids in sp.containers(sp.web.name).values())
    pushed = [e for e in srv.events() if e["sha"] == sha and e["kind"] == "push"]
    assert pushed and {e["status"] for e in pushed} <= {"done", "superseded"}, pushed
    history = sp.cli_json("history", sp.web.name)
    assert [(h["revision"], h["status"]) for h in history[:2]] == [
        (sha, "succeeded"),
        (sha, "interrupted"),
    ]  # redeployed once after the restart


# -- 5. live config --------------------------------------------------------------------------


def test_config_edits_apply_live_and_an_invalid_edit_keeps_the_old_config(
    tmp_path: Path, sp: ServeProject, serve: ServeProcesses
) -> None:
    """A repo added to the config file while serving is polled and deployed without a restart;
    an invalid edit is logged with file:line and key while the old config keeps serving, and
    the next valid edit applies."""
    sp.repos["shop"].poll = "1s"
    sp.write_config()
    sp.project.initial_commit()
    srv = serve(sp, watch_repos=False)  # polling only
    wait_for(lambda: sp.serves(sp.web.port, "web v1"), DEPLOY_DEADLINE, "shop deployed by poll")

    extra = GitRemote(tmp_path / "extra")
    write_sample_app(extra.work, "site", "site v1")
    extra.commit_push("site v1")
    site = App(f"site{sp.project.suffix}", "site", sp.web.port + 2000, repo="extra")
    sp.repos["extra"] = Repo(extra.url, poll="1s")
    sp.apps.append(site)
    sp.write_config()
    wait_for(lambda: sp.serves(site.port, "site v1"), DEPLOY_DEADLINE, "the new repo deployed")
    assert [e for e in srv.events() if e["repo"] == "extra" and e["source"] == "poll"]

    valid = sp.render()
    invalid = valid.replace('poll = "1s"\n\n[images', 'poll = "soon"\n\n[images', 1)
    invalid += '\n[services.ghost]\nimage = "nope"\nhosts = ["lab-1"]\n'
    lines = invalid.splitlines()
    poll_line = lines.index('poll = "soon"') + 1
    image_line = lines.index('image = "nope"') + 1
    sp.write_config(invalid)
    wait_for(lambda: "config.invalid_kept_running" in srv.log(), 10, "the invalid edit logged")
    log = srv.log()
    assert f"pipeline.toml:{poll_line}: repos.extra.poll: invalid duration 'soon'" in log, log
    assert f"pipeline.toml:{image_line}: services.ghost.image: unknown image 'nope'" in log, log
    assert srv.healthy()
    assert sp.serves(sp.web.port, "web v1") and sp.serves(site.port, "site v1")
    extra.write("site/www/index.html", "site v2")
    extra.commit_push("site v2")  # the old config still polls the new repo
    wait_for(lambda: sp.serves(site.port, "site v2"), DEPLOY_DEADLINE, "site v2 by poll")

    old_port, site.port = site.port, site.port + 100
    sp.write_config()  # valid again: the site moves to another port
    wait_for(lambda: sp.serves(site.port, "site v2"), DEPLOY_DEADLINE, "the site on its new port")
    assert all(len(ids) == 1 for ids in sp.containers(site.name).values())
    assert old_port != site.port and srv.healthy()


# -- 6. rebuilds of a base image -------------------------------------------------------------


def build_base(client: docker.DockerClient, root: Path, ref: str, text: str) -> str:
    """Build `ref` FROM scratch (busybox, /www/base.txt holding `text`); return its id."""
    ctx = root / f"base-{uuid.uuid4().hex[:6]}"
    (ctx / "www").mkdir(parents=True)
    shutil.copy2(BUSYBOX, ctx / "busybox")
    (ctx / "www" / "base.txt").write_text(text)
    # A label first: its layer chain is this build's own, so another xdist worker removing
    # its images (and their untagged parents) cannot take a cached parent from under it.
    (ctx / "Dockerfile").write_text(
        f"FROM scratch\nLABEL build={ctx.name}\nCOPY busybox /bin/busybox\nCOPY www/ /www/\n"
    )
    image, _ = client.images.build(path=str(ctx), tag=ref, rm=True)
    return str(image.id)


def push_image(client: docker.DockerClient, ref: str) -> None:
    repository, tag = ref.rsplit(":", 1)
    for line in client.images.push(repository, tag=tag, stream=True, decode=True):
        assert "error" not in line, line


def remove_images(client: docker.DockerClient, *repositories: str) -> None:
    """Remove the local engine's images of `repositories`, children (the app) first."""
    for repository in repositories:
        for image in client.images.list(name=repository):
            tags = [t for t in image.tags if t.startswith(repository + ":")]
            # An untagged one goes by id, unforced: the id may be another repository's too.
            for ref in tags or [image.id]:
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(ref)


def digests(sp: ServeProject, service: str) -> set[str]:
    return {r["digest"] for r in sp.cli_json("status") if r["service"] == service}


def test_rebuild_restarts_nothing_until_the_base_image_changes(
    tmp_path: Path, sp: ServeProject, serve: ServeProcesses, local_engine: docker.DockerClient
) -> None:
    """`pipeline rebuild` with an unchanged base restarts nothing; after a new base is pushed it
    rolls out the new digest; and the image's `rebuild` cron, added to the running service's
    config, fires a scheduled rebuild that restarts nothing."""
    base = f"{sp.lab.registry}/base{sp.project.suffix}:latest"
    app = App(f"app{sp.project.suffix}", "app", sp.web.port + 3000)
    sp.apps = [app]
    sp.write_config()
    try:
        v1 = build_base(local_engine, tmp_path, base, "base v1")
        push_image(local_engine, base)
        remote = sp.project.remote
        remote.write("app/Dockerfile", DOCKERFILE.replace(
            "FROM scratch\nCOPY busybox /bin/busybox\n", f"FROM {base}\n"))  # fmt: skip
        remote.write("app/www/index.html", "app v1")
        remote.write("app/www/health", "ok\n")
        remote.commit_push("app on the base image")
        res = sp.cli("run")
        assert res.returncode == 0, res.stdout + res.stderr
        assert sp.serves(app.port, "base v1", "/base.txt") and sp.serves(app.port, "app v1")
        srv = serve(sp, watch_repos=False)
        before, digest = sp.containers(app.name), digests(sp, app.name)

        res = sp.cli("rebuild", app.name)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "rebuilt to the same digest" in res.stderr, res.stderr
        assert sp.containers(app.name) == before and digests(sp, app.name) == digest

        build_base(local_engine, tmp_path, base, "base v2")
        push_image(local_engine, base)
        # The engine's own `latest` is v1 again: only a fresh pull sees v2.
        local_engine.images.get(v1).tag(base)
        res = sp.cli("rebuild", app.name)
        assert res.returncode == 0, res.stdout + res.stderr
        assert sp.serves(app.port, "base v2", "/base.txt") and sp.serves(app.port, "app v1")
        after, new_digest = sp.containers(app.name), digests(sp, app.name)
        assert len(new_digest) == 1 and new_digest != digest
        assert all(after[h] != before[h] for h in after), (before, after)

        app.rebuild = "* * * * *"
        sp.write_config()
        cron = wait_for(
            lambda: [e for e in srv.events() if e["source"] == "cron" and e["status"] == "done"],
            75, "the cron's rebuild event", every=1,
        )  # fmt: skip
        assert cron[0]["kind"] == "rebuild" and cron[0]["subject"] == app.name, cron
        steps = srv.run(cron[0]["run_id"])["steps"]
        assert [s["status"] for s in steps if s["kind"] == "build"] == ["succeeded"], steps
        assert not [s for s in steps if s["kind"] == "start"], steps
        assert sp.containers(app.name) == after and digests(sp, app.name) == new_digest
    finally:
        remove_images(local_engine, f"{sp.lab.registry}/{app.name}", base.rsplit(":", 1)[0])


# -- 7. an infrastructure failure, retried by the service ------------------------------------


@pytest.mark.timeout(420)
def test_registry_down_past_the_retries_deploys_after_the_backoff_without_a_push(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """With webhooks only, a revision whose rollout failed because host 2 could not reach the
    registry through every pull retry is deployed on both hosts once its 30 s backoff ends,
    through the service's own "retry" event, with no further push."""
    secret = with_secret(sp)
    first = sp.project.initial_commit()
    res = sp.cli("run")  # v1 everywhere before the service starts
    assert res.returncode == 0, res.stdout + res.stderr
    srv = serve(sp, watch_repos=False)  # no poll, no watch: only webhooks trigger
    sha = change_web(sp, "web v2")
    sp.project.remote.push()

    def failed() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = sp.cli_json("history", sp.web.name)
        return [h for h in rows if h["revision"] == sha and h["status"] != "running"]

    with registry_blocked(sp.lab, 1) as block:
        answer = github_push(srv, "shop", secret, before=first, after=sha)
        assert answer.status_code == 202, answer.text
        (release,) = wait_for(failed, 180, "the rollout of web v2 to fail", every=1)
    assert block.packets > 0, "host 2 never hit the blocked registry"
    assert release["failure_kind"] == "infrastructure", release
    assert sp.serves(sp.web.port, "web v1")

    def retried() -> list[dict[str, Any]]:
        return [e for e in srv.events() if e["source"] == "retry" and e["status"] == "done"]

    # Serving starts before the rollout ends (health and monitor window): wait for both.
    wait_for(retried, 90, "the retry event done", every=0.5)
    assert sp.serves(sp.web.port, "web v2")
    events = srv.events()
    assert [(e["source"], e["sha"]) for e in events] == [("webhook", sha), ("retry", sha)]
    retry = events[1]
    assert datetime.fromisoformat(retry["received_at"]) >= datetime.fromisoformat(
        release["finished_at"]
    ) + timedelta(seconds=30)
    assert srv.run(retry["run_id"])["trigger"] == "retry"
    history = sp.cli_json("history", sp.web.name)
    assert (history[0]["revision"], history[0]["status"]) == (sha, "succeeded"), history
