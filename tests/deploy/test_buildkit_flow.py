"""BuildKit builds in the deploy flow on the lab: cache and secret mounts, a build target, and
a build secret that reaches the build and nothing else."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from deploy_helpers import TEST_MONITOR, Project

from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# Two stages and a third after them: without `target = "prod"` the last stage (debug) would be
# built and would serve "debug". The secret's RUN prints it on purpose, so the test also proves
# that pipeline masks it in the build output it logs.
DOCKERFILE = """\
FROM scratch AS base
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]

FROM base AS prod
RUN --mount=type=cache,target=/cache sh -c 'date >> /cache/runs; wc -l < /cache/runs > /deps'
COPY www/ /www/
RUN --mount=type=secret,id=npm_token sh -c \
    'echo "token is $(cat /run/secrets/npm_token)"; wc -c < /run/secrets/npm_token > /www/len'
CMD ["/bin/busybox", "sh", "-c", \
     "/bin/busybox httpd -f -p 8080 -h /www & trap 'kill $!; exit 0' TERM; wait"]

FROM prod AS debug
RUN echo debug > /www/index.html
"""


def _config(proj: Project, host: Any) -> str:
    return f"""
[pipeline]
data_dir = "data"

[registry]
address = "{proj.registry}"

[hosts.{host.name}]
docker = "{host.docker_url}"
address = "{host.address}"

[repos.shop]
url = "{proj.remote.url}"

[images.{proj.web}]
repo = "shop"
context = "web"
target = "prod"
secrets = {{ npm_token_env = "PL_TEST_NPM_TOKEN" }}

[images.{proj.api}]
repo = "shop"
context = "api"
builder = "legacy"

{_service(proj.web, proj.web_port, host.name)}
{_service(proj.api, proj.api_port, host.name)}
"""


def _service(name: str, port: int, host: str) -> str:
    return f"""
[services.{name}]
image = "{name}"
hosts = ["{host}"]
ports = ["{port}:8080"]
stop_timeout = "1s"
health = {{ http = "/health", interval = "200ms", timeout = "15s", monitor = "{TEST_MONITOR}" }}
"""


def test_buildkit_secret_cache_and_target_deploy_without_leaking_the_secret(
    project: Project, lab: LabState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Dockerfile with a cache mount, a secret mount and stages deploys its `target` stage;
    the secret's value is in no image history, layer, label, log line or `history --json`,
    and an image set to `builder = "legacy"` still builds, saying so in one line."""
    secret = f"npm-{uuid.uuid4().hex}"
    monkeypatch.setenv("PL_TEST_NPM_TOKEN", secret)
    project.config.write_text(_config(project, lab.hosts[0]))
    # Content of its own: the secret's RUN comes after it, so it runs (not cached) every time.
    marker = f"web {uuid.uuid4().hex[:8]}"
    write_sample_app(project.remote.work, "web", marker)
    write_sample_app(project.remote.work, "api", "api v1")
    project.remote.write("web/Dockerfile", DOCKERFILE)
    project.push("buildkit app")

    run = project.cli("--log-level", "debug", "run")
    assert run.returncode == 0, run.stdout + run.stderr
    assert project.get(0, project.web_port) == marker  # prod, not the later debug stage
    assert project.get(0, project.api_port) == "api v1"
    assert f'{project.api}: legacy builder: builder = "legacy"' in run.stdout + run.stderr
    web = httpx_get(project, "/len")
    assert web.strip() == str(len(secret))  # the secret reached the build

    history = project.cli("history", "--json")
    logs = run.stdout + run.stderr + history.stdout + history.stderr
    assert "token is ***" in logs  # the build output is logged, the value masked
    assert secret not in logs
    data = _database_text(project.root / "data")
    assert secret not in data

    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        ref = _pushed_ref(project)
        image = client.images.get(ref)
        assert secret not in json.dumps(image.attrs)  # labels, config, build args
        hist = subprocess.run(
            ["docker", "history", "--no-trunc", ref], capture_output=True, text=True, check=True
        ).stdout
        assert "/run/secrets/npm_token" in hist and secret not in hist
        saved = b"".join(image.save())
        assert secret.encode() not in saved
    finally:
        client.close()


def httpx_get(project: Project, path: str) -> str:
    address = project.lab.hosts[0].address
    return httpx.get(f"http://{address}:{project.web_port}{path}", timeout=5).text


def _pushed_ref(project: Project) -> str:
    con = sqlite3.connect(project.root / "data" / "state.db")
    try:
        row = con.execute(
            "SELECT ref FROM builds WHERE image = ? ORDER BY id DESC LIMIT 1", (project.web,)
        ).fetchone()
    finally:
        con.close()
    return str(row[0])


def _database_text(data_dir: Path) -> str:
    """Every text value of the state database, for a grep."""
    out = []
    con = sqlite3.connect(data_dir / "state.db")
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):  # noqa: S608
                out.extend(str(v) for v in row)
    finally:
        con.close()
    return "\n".join(out)
