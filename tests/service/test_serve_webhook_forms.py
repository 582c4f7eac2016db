"""Webhooks as git hosts really send them, to `pipeline serve` on the lab: GitHub's default
form content type, organisation and system hooks that deliver other repositories' pushes, and
the release events of GitLab and Gitea (real deliveries from tests/fixtures/webhooks)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import Serve, ServeProcesses, ServeProject, github_push, wait_for

from pipeline.lab.workrepo import git

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(240)]

DEPLOY_DEADLINE = 30.0
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FORM = "application/x-www-form-urlencoded"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def secret_for(sp: ServeProject, extra: str = "") -> str:
    """Give repo shop a webhook secret (and the `extra` lines); write the config; return it."""
    env = f"PIPELINE_HOOKS_SECRET_{uuid.uuid4().hex[:8].upper()}"
    secret = secrets.token_hex(16)
    sp.env[env] = secret
    sp.repos["shop"].secret_env = env
    line = f'webhook_secret_env = "{env}"\n'
    sp.write_config(sp.render().replace(line, line + extra, 1))
    return secret


def post(serve: Serve, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{serve.url}/hooks/shop", content=body, headers=headers, timeout=30, trust_env=False
    )


def github_headers(event: str, body: bytes, secret: str, content_type: str) -> dict[str, str]:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": content_type,
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": f"sha256={mac}",
    }


def gitlab_headers(event: str, secret: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Gitlab-Event": event,
        "X-Gitlab-Token": secret,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
    }


def change_web(sp: ServeProject, text: str) -> str:
    sp.project.remote.write("web/www/index.html", text)
    return sp.project.remote.commit(text)


def settled(serve: Serve) -> list[dict[str, Any]] | None:
    events = serve.events()
    return None if any(e["status"] in ("queued", "working") for e in events) else events


def test_form_encoded_github_push_deploys_and_form_ping_is_answered(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """A GitHub push sent as GitHub's default form (`payload=<JSON>`, signed as sent) deploys
    its commit on every host; a form-encoded ping is answered 200."""
    secret = secret_for(sp)
    first = sp.project.initial_commit()
    res = sp.cli("run")
    assert res.returncode == 0, res.stdout + res.stderr
    srv = serve(sp, watch_repos=False)  # only the webhook can trigger
    sha = change_web(sp, "web v2")
    sp.project.remote.push()
    payload = {"ref": "refs/heads/main", "before": first, "after": sha, "deleted": False,
               "repository": {"full_name": "acme/shop"}, "head_commit": {"id": sha}}  # fmt: skip
    body = (
        b"payload=" + urllib.parse.quote_plus(json.dumps(payload, separators=(",", ":"))).encode()
    )
    answer = post(srv, body, github_headers("push", body, secret, FORM))
    assert answer.status_code == 202, answer.text
    wait_for(lambda: sp.serves(sp.web.port, "web v2"), DEPLOY_DEADLINE, "web v2 on every host")
    ping = fixture("webhooks-extra/github/ping-form.txt")
    answer = post(srv, ping, github_headers("ping", ping, secret, FORM))
    assert (answer.status_code, answer.json()) == (200, {"status": "pong"})
    [event] = wait_for(lambda: settled(srv), DEPLOY_DEADLINE, "the push handled")
    assert (event["sha"], event["status"]) == (sha, "done"), event


SLOW_HEALTH = 'interval = "1s"\nhealthy_threshold = 3\ntimeout = "20s"\nmonitor = "300ms"'


def test_other_repositories_pushes_leave_a_running_rollout_untouched(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """During a rollout, a GitLab system-hook push of another project and a GitHub
    organisation-hook push of another repository are answered 200 "ignored: push of …", queue
    nothing, and the rollout ends succeeded on every host with no other commit in history."""
    sp.web.health = SLOW_HEALTH  # ~2 s of checks per host: a rollout to deliver into
    secret = secret_for(sp, 'webhook_repository = "acme/shop"\n')  # its url is a local path
    first = sp.project.initial_commit()
    res = sp.cli("run")
    assert res.returncode == 0, res.stdout + res.stderr
    srv = serve(sp, watch_repos=False)
    sha = change_web(sp, "web v2")
    sp.project.remote.push()
    answer = github_push(srv, "shop", secret, before=first, after=sha)  # names acme/shop
    assert answer.status_code == 202, answer.text

    def mid_rollout() -> bool:
        running = [r for r in srv.runs() if r["status"] == "running"]
        steps = [s for r in running for s in srv.run(r["id"])["steps"]]
        return any(s["kind"] == "health" and s["status"] == "running" for s in steps)

    wait_for(mid_rollout, DEPLOY_DEADLINE, "the rollout of web in progress", every=0.05)
    system = fixture("webhooks/gitlab/system-hook-push.json")
    answer = post(srv, system, gitlab_headers("System Hook", secret))
    assert (answer.status_code, answer.json()) == (
        200,
        {"status": "ignored", "reason": "push of mike/diaspora"},
    )
    org = fixture("webhooks/github/push-organization.json")
    answer = post(srv, org, github_headers("push", org, secret, "application/json"))
    assert (answer.status_code, answer.json()) == (
        200,
        {"status": "ignored", "reason": "push of agoda-com/samsahai-example"},
    )
    events = wait_for(lambda: settled(srv), DEPLOY_DEADLINE, "the push handled")
    assert [(e["sha"], e["status"]) for e in events] == [(sha, "done")], events
    history = sp.cli_json("history", sp.web.name)
    assert {(h["revision"], h["status"]) for h in history} == {
        (first, "succeeded"),
        (sha, "succeeded"),
    }, history
    assert sp.serves(sp.web.port, "web v2")


def tag_push(sp: ServeProject, text: str, tag: str) -> str:
    """Commit web saying `text`, tag it `tag`, push main and the tags; return the commit."""
    sha = change_web(sp, text)
    sp.project.remote.tag(tag)
    git("push", "origin", "main", "--tags", cwd=sp.project.remote.work)
    return sha


def test_gitlab_and_gitea_release_events_deploy_their_new_tag(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """For a repo following tags "v*", a GitLab Release Hook (action create) of a new tag and
    then a Gitea release event (action published) of a newer one each deploy their tag."""
    secret = secret_for(sp)
    sp.write_config(sp.render().replace('branch = "main"\n', 'tags = "v*"\n', 1))
    sp.project.initial_commit()
    sp.project.remote.tag("v1")
    git("push", "origin", "--tags", cwd=sp.project.remote.work)
    res = sp.cli("run")
    assert res.returncode == 0, res.stdout + res.stderr
    srv = serve(sp, watch_repos=False)

    v2 = tag_push(sp, "web v2", "v2")
    release = json.loads(fixture("webhooks/gitlab/release-hook.json"))
    release["tag"], release["commit"]["id"] = "v2", v2
    body = json.dumps(release).encode()
    answer = post(srv, body, gitlab_headers("Release Hook", secret))
    assert answer.status_code == 202, answer.text
    wait_for(lambda: sp.serves(sp.web.port, "web v2"), DEPLOY_DEADLINE, "tag v2 on every host")

    tag_push(sp, "web v3", "v3")
    release = json.loads(fixture("webhooks/gitea/release-published.json"))
    release["release"]["tag_name"] = "v3"
    body = json.dumps(release).encode()
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Gitea-Event": "release",
               "X-Gitea-Event-Type": "release", "X-Gitea-Delivery": str(uuid.uuid4()),
               "X-Gitea-Signature": mac}  # fmt: skip
    answer = post(srv, body, headers)
    assert answer.status_code == 202, answer.text
    wait_for(lambda: sp.serves(sp.web.port, "web v3"), DEPLOY_DEADLINE, "tag v3 on every host")
    events = wait_for(lambda: settled(srv), DEPLOY_DEADLINE, "both releases handled")
    assert [(e["ref"], e["status"]) for e in events] == [
        ("refs/tags/v2", "done"),
        ("refs/tags/v3", "done"),
    ], events
