"""The Kamal-like commands on the lab, run as a user runs them: `logs -f` across a deploy,
`exec` and `exec --new`, `prune --dry-run` and `lock status` during a deploy, and `pipeline run`
on a real terminal (tmux), piped, and with `--json`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import pytest
from deploy_helpers import Project

from pipeline.lab.manage import LabState
from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# The app prints the page it serves when it starts: a line that tells revisions apart in logs.
_START = (
    "echo started $(/bin/busybox cat /www/index.html); "
    "/bin/busybox httpd -f -p 8080 -h /www & trap 'kill $!; exit 0' TERM; wait"
)
WEB_EXTRA = (
    f"command = {json.dumps(['/bin/busybox', 'sh', '-c', _START])}\n"
    'env = { GREETING = "hello-from-config" }'
)


def cli(project: Project, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`pipeline ARGS… -c CONFIG` in a child process (-c before a `--`: `exec` takes every word
    after it as its command)."""
    words = list(args)
    at = words.index("--") if "--" in words else len(words)
    words[at:at] = ["-c", str(project.config)]
    return subprocess.run([sys.executable, "-m", "pipeline", *words], capture_output=True,
                          text=True, check=False, timeout=timeout)  # fmt: skip


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def following(project: Project) -> Iterator[list[str]]:
    """`pipeline logs WEB -f` running in the background; yields the lines it printed so far."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "logs", project.web, "-f", "-c", str(project.config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    try:
        yield lines
    finally:
        proc.terminate()  # what Ctrl-C does: the command stops following
        proc.wait(timeout=15)
        reader.join(timeout=15)


def test_logs_follow_shows_every_host_and_keeps_following_across_a_deploy(
    project: Project,
) -> None:
    """`pipeline logs web -f` on two hosts prefixes each line with its host, and after a deploy
    replaces the containers it shows the new containers' lines."""
    project.write_config(web=WEB_EXTRA)
    project.initial_commit()
    assert project.run().ok
    hosts = project.host_names
    width = max(map(len, hosts))
    with following(project) as lines:

        def seen(text: str) -> bool:
            return all(
                any(ln.startswith(f"{h.ljust(width)} | ") and text in ln for ln in lines)
                for h in hosts
            )

        wait_for(lambda: seen("started web v1"), 30, f"v1 lines of both hosts: {lines}")
        project.remote.write("web/www/index.html", "web v2")
        project.push("web v2")
        assert project.run().ok
        wait_for(lambda: seen("started web v2"), 30, f"v2 lines of both hosts: {lines}")
    assert not any("Traceback" in ln for ln in lines), lines


def test_exec_runs_in_the_service_container_and_new_leaves_nothing_behind(
    project: Project,
) -> None:
    """`exec web -- env` prints the environment the service was started with; `exec --new`
    runs in a one-off container with the same settings, exits with the command's code and
    removes the container."""
    project.write_config(web=WEB_EXTRA)
    project.initial_commit()
    assert project.run().ok

    env = cli(project, "exec", project.web, "--", "/bin/busybox", "env")
    assert env.returncode == 0, env.stderr
    assert "GREETING=hello-from-config" in env.stdout.splitlines()

    once = cli(project, "exec", project.web, "--new", "--host", project.host_names[1], "--",
               "/bin/busybox", "sh", "-c", "echo one-off $GREETING; exit 7")  # fmt: skip
    assert once.returncode == 7, once.stderr  # the command's own exit code
    assert "one-off hello-from-config" in once.stdout
    for h in project.lab.hosts:
        client = docker.DockerClient(base_url=h.docker_url)
        try:
            left = client.containers.list(all=True, filters={"name": f"{project.web}-run-"})
        finally:
            client.close()
        assert left == [], f"{h.name}: {[c.name for c in left]}"


@pytest.fixture
def one_host_project(tmp_path: Path, git_remote: Any, lab: LabState) -> Iterator[Project]:
    """A `Project` whose services run on the first lab host only (half the rollouts)."""
    proj = Project(tmp_path, git_remote, lab, hosts=1)
    try:
        yield proj
    finally:
        proj.cleanup()


def test_prune_dry_run_keeps_what_rollback_needs_and_lock_status_shows_a_running_deploy(
    one_host_project: Project,
) -> None:
    """After three revisions, `prune --dry-run` with keep_revisions 1 lists the oldest image
    and keeps the deployed one and the one a rollback goes back to, removing nothing; while a
    `pipeline deploy` runs, `lock status` shows its lease, owner host and pid."""
    project = one_host_project
    project.initial_commit()
    assert project.run().ok
    for n in (2, 3):
        project.remote.write("web/www/index.html", f"web v{n}")
        project.push(f"web v{n}")
        assert project.run().ok
    images = {}
    for h in project.lab.hosts[:1]:
        client = docker.DockerClient(base_url=h.docker_url)
        try:
            found = client.images.list(filters={"label": f"dev.pipeline.image={project.web}"})
            images[h.name] = [i.id for i in sorted(found, key=lambda i: i.attrs["Created"])]
        finally:
            client.close()
    assert all(len(ids) == 3 for ids in images.values()), images
    text = project.config.read_text()
    project.config.write_text(
        text.replace('data_dir = "data"', 'data_dir = "data"\nkeep_revisions = 1')
    )

    dry = cli(project, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for host, (oldest, previous, current) in images.items():
        where = f"{project.web} on {host}"
        assert f"{where}: would remove image {oldest[7:19]}" in dry.stdout, dry.stdout
        assert f"{where}: keep {previous[7:19]}: a rollback needs it" in dry.stdout, dry.stdout
        assert f"{where}: keep {current[7:19]}: a kept container runs it" in dry.stdout
    assert "would free" in dry.stdout
    assert project.containers(project.web)  # nothing was touched
    client = docker.DockerClient(base_url=project.lab.hosts[0].docker_url)
    try:
        assert client.images.get(images[project.lab.hosts[0].name][0])
    finally:
        client.close()

    # A deploy that takes a while: its health check must hold for 10 s (the CLI takes seconds
    # to start on a busy machine).
    project.write_config(web_health=f'[services.{project.web}.health]\nhttp = "/health"\n'
                         'interval = "200ms"\ntimeout = "10s"\nmonitor = "10s"')  # fmt: skip
    deploy = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "deploy", project.web, "-c", str(project.config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        state = State.in_dir(project.root / "data")
        wait_for(lambda: state.leases.lock_holder(f"service:{project.web}") is not None, 60,
                 "the deploy to take its lease")  # fmt: skip
        rows = json.loads(cli(project, "lock", "status", "--json").stdout)
        (row,) = [r for r in rows if r["service"] == project.web]
        assert row["pid"] == deploy.pid and row["host"] and row["expires_at"]
        out, err = deploy.communicate(timeout=120)
        assert deploy.returncode == 0, out + err
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    assert "No lease is held" in cli(project, "lock", "status").stdout


def _tmux(socket: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True,
                          check=False, timeout=30).stdout  # fmt: skip


def test_run_on_a_terminal_shows_progress_piped_plain_and_json_one_document(
    project: Project, tmp_path: Path
) -> None:
    """`pipeline run` in a real terminal (tmux) shows build, push, pull and health steps and a
    summary table, and no structlog info lines; piped, `run --json` prints plain step lines
    without control codes on stderr and exactly one JSON document on stdout."""
    project.initial_commit()
    socket = f"pipeline-test-{uuid.uuid4().hex[:8]}"
    done = tmp_path / "exit-code"
    command = (f"{sys.executable} -m pipeline run -c {project.config}; echo $? > {done}; "
               "sleep 120")  # fmt: skip
    try:
        _tmux(socket, "new-session", "-d", "-x", "160", "-y", "60", "-s", "t", command)
        screens: list[str] = []

        def finished() -> bool:
            screens.append(_tmux(socket, "capture-pane", "-p", "-t", "t", "-S", "-500"))
            return done.exists() and done.read_text().strip() != ""

        wait_for(finished, 120, "pipeline run in tmux")
        screen = _tmux(socket, "capture-pane", "-p", "-t", "t", "-S", "-500")
    finally:
        _tmux(socket, "kill-server")
    assert done.read_text().strip() == "0", screen
    for step in ("building", "pushed", "pulling", "checking health", "healthy"):
        assert step in screen, (step, screen)
    assert "outcome" in screen and "succeeded" in screen, screen  # the summary table
    assert "[info" not in screen, screen  # structlog's console lines stay out at info
    # The spinner line, seen while the run worked: a step and its elapsed time.
    assert any("s total)" in s for s in screens), screens[-1]

    project.remote.write("web/www/index.html", "web v2")
    project.push("web v2")
    piped = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--json", "-c", str(project.config)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert "\x1b" not in piped.stdout + piped.stderr  # no colour, no cursor moves
    assert f"{project.web}: " in piped.stderr and "healthy" in piped.stderr  # plain step lines
    doc = json.loads(piped.stdout)  # one document, nothing else on stdout
    assert doc["ok"] is True and doc["exit_code"] == 0
    assert [r["service"] for r in doc["releases"]] == [project.web]
    assert doc["releases"][0]["status"] == "succeeded"


def test_a_followed_branch_the_repo_lacks_is_named_by_plan_and_run(project: Project) -> None:
    """A config following a branch the repository does not have (`mian` for `main`) makes
    `plan` and `run` name the branch and the repository, where both said only "up to date"."""
    project.initial_commit()
    text = project.config.read_text()
    project.config.write_text(text.replace('branch = "main"', 'branch = "mian"'))
    expected = f"repos.shop: branch 'mian' is not on {project.remote.url}: nothing to deploy"

    plan = project.cli("plan")
    assert plan.returncode == 0, plan.stderr
    assert expected in plan.stdout
    planned = json.loads(project.cli("plan", "--json").stdout)
    assert {"subject": "repos.shop", "error": False}.items() <= planned["problems"][0].items()

    run = project.cli("run")
    assert run.returncode == 0, run.stderr
    assert expected in run.stdout + run.stderr
    assert "rolling out" not in run.stdout + run.stderr
