"""Git push-to-deploy: `pipeline hooks install` into a real bare repo, then real `git push`es
through the installed pre-receive and post-receive hooks (no Docker: repos-only configs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lab.workrepo import GIT_ENV as _GIT_ENV
from pipeline.lab.workrepo import GIT_ID as _GIT_ID
from pipeline.lab.workrepo import WorkRepo as GitRemote
from pipeline.lab.workrepo import git
from pipeline.service.daemon import Service
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

pytestmark = pytest.mark.timeout(120)

VALID = '[pipeline]\ndata_dir = "data"\n\n[repos.app]\nurl = "/srv/app.git"\n'
INVALID = '[repos.app]\nurl = "/srv/app.git"\n\n[services.web]\nimage = "nope"\nhosts = ["h1"]\n'


def pipeline_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `pipeline` command line in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=60
    )


def push(remote: GitRemote, ref: str = "main") -> tuple[int, str]:
    """`git push` from the working clone; return git's exit code and everything it printed."""
    res = subprocess.run(
        ["git", *_GIT_ID, "push", "origin", f"{ref}:refs/heads/{ref}"],
        cwd=remote.work,
        env=_GIT_ENV,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return res.returncode, res.stdout + res.stderr


def rev_parse(repo: Path, rev: str) -> str:
    return git("rev-parse", "--verify", rev, cwd=repo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def setup(tmp_path: Path, git_remote: GitRemote) -> tuple[GitRemote, Path]:
    """A bare repo with one commit on main, and a server config following it by path."""
    git_remote.write("README", "v1\n")
    git_remote.commit("first")
    git_remote.push()
    config = tmp_path / "server" / "pipeline.toml"
    config.parent.mkdir()
    config.write_text(
        f'[pipeline]\ndata_dir = "data"\n\n[server]\nlisten = "127.0.0.1:{free_port()}"\n\n'
        f'[repos.app]\nurl = "{git_remote.bare}"\nbranch = "main"\n'
    )
    return git_remote, config


def install(remote: GitRemote, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    res = pipeline_cli("hooks", "install", str(remote.bare), "-c", str(config), *extra)
    assert res.returncode == 0, res.stderr
    return res


def queued(config: Path) -> list[dict[str, object]]:
    return EventQueue(State.in_dir(config.parent / "data")).recent()


def test_install_puts_executable_hooks_for_the_repo_whose_url_it_is(
    setup: tuple[GitRemote, Path],
) -> None:
    """Install finds the config repo by its url, bakes in python, repo and config, chmods +x."""
    remote, config = setup
    res = install(remote, config)
    assert "for repo app" in res.stdout
    for hook in ("pre-receive", "post-receive"):
        assert os.access(remote.bare / "hooks" / hook, os.X_OK)
    env = (remote.bare / "hooks" / "pipeline-hook.env").read_text()
    assert f"PIPELINE_CONFIG={config.resolve()}" in env
    assert "PIPELINE_REPO=app" in env and sys.executable in env


def test_install_refuses_a_work_tree_and_a_foreign_hook(setup: tuple[GitRemote, Path]) -> None:
    """Install refuses a non-bare path, and a hook it did not write unless --force is given."""
    remote, config = setup
    res = pipeline_cli("hooks", "install", str(remote.work), "-c", str(config), "--repo", "app")
    assert res.returncode != 0 and "not a bare git repository" in res.stderr
    foreign = remote.bare / "hooks" / "post-receive"
    foreign.write_text("#!/bin/sh\necho mine\n")
    res = pipeline_cli("hooks", "install", str(remote.bare), "-c", str(config))
    assert res.returncode != 0 and "--force" in res.stderr
    assert foreign.read_text() == "#!/bin/sh\necho mine\n"
    install(remote, config, "--force")
    assert "pipeline hooks install" in foreign.read_text()


def test_push_of_an_invalid_pipeline_toml_is_refused_with_its_errors(
    setup: tuple[GitRemote, Path],
) -> None:
    """pre-receive refuses a followed push whose pipeline.toml is invalid, naming file:line key."""
    remote, config = setup
    install(remote, config, "--queue-only")
    remote.write("pipeline.toml", INVALID)
    remote.commit("broken config")
    code, output = push(remote)
    assert code != 0, output
    assert "pipeline.toml is invalid" in output
    assert "pipeline.toml:5: services.web.image: unknown image 'nope'" in output
    assert "pipeline.toml:6: services.web.hosts.0: unknown host 'h1'" in output
    assert rev_parse(remote.bare, "refs/heads/main") == rev_parse(remote.work, "HEAD~1")
    assert not queued(config)


def test_valid_push_with_server_down_is_queued_durably(setup: tuple[GitRemote, Path]) -> None:
    """With --queue-only and no server, a valid push is accepted, queued, and the pusher told so."""
    remote, config = setup
    install(remote, config, "--queue-only")
    remote.write("pipeline.toml", VALID)
    sha = remote.commit("valid config")
    code, output = push(remote)
    assert code == 0, output
    assert "pipeline.toml is valid" in output
    assert "pipeline server is not running: event" in output
    assert "it will deploy when `pipeline serve` starts" in output
    events = queued(config)
    assert len(events) == 1
    assert events[0]["status"] == "queued" and events[0]["source"] == "hook"
    assert events[0]["sha"] == sha and events[0]["ref"] == "refs/heads/main"


def test_push_to_a_branch_not_followed_queues_nothing(setup: tuple[GitRemote, Path]) -> None:
    """A push of another branch is accepted, said to be not followed, and queues no event."""
    remote, config = setup
    install(remote, config, "--queue-only")
    subprocess.run(
        ["git", *_GIT_ID, "checkout", "-q", "-b", "feature"], cwd=remote.work, check=True
    )
    remote.write("pipeline.toml", INVALID)  # not validated either: the branch is not followed
    remote.commit("feature work")
    code, output = push(remote, "feature")
    assert code == 0, output
    assert "refs/heads/feature is not followed by repo app" in output
    assert not queued(config)


def test_push_with_server_down_deploys_inline(setup: tuple[GitRemote, Path]) -> None:
    """Without --queue-only and no server, the hook runs the pass itself and reports the run."""
    remote, config = setup
    install(remote, config)
    sha = remote.commit("second")
    code, output = push(remote)
    assert code == 0, output
    assert "deploying it here" in output
    assert "up to date: nothing to build or roll out" in output  # the runner's own report
    assert "nothing to deploy (up to date)" in output
    (event,) = queued(config)
    assert event["status"] == "done" and event["sha"] == sha and event["run_id"]


@pytest.mark.parametrize("watch_repos", [False, True], ids=["hook-only", "also-watched"])
def test_push_with_server_up_follows_the_services_run(
    setup: tuple[GitRemote, Path], watch_repos: bool
) -> None:
    """With the server up, the pusher follows the service's run of the push (the hook's own
    event, or the one the service's watch of the repo queued first) to its outcome."""
    remote, config = setup
    install(remote, config)
    service = Service(config, watch_repos=watch_repos)
    service.start()
    try:
        sha = remote.commit("second")
        code, output = push(remote)
    finally:
        service.stop(timeout=10)
    assert code == 0, output
    assert "following it" in output
    assert "fetch app: succeeded" in output and "nothing to deploy (up to date)" in output
    for_sha = sorted((e for e in queued(config) if e["sha"] == sha), key=lambda e: e["id"])
    first = for_sha[0]
    assert f"event {first['id']} (push main {sha[:12]})" in output
    # With both, whichever saw the push first carries it (usually the watch: python starts slower).
    assert first["source"] in (("watch", "hook") if watch_repos else ("hook",))
    assert first["status"] == "done" and f"run {first['run_id']} " in output
    run = service.state.run(int(str(first["run_id"])))
    assert run is not None and run.owner == service.owner


def test_a_serve_of_another_project_on_the_listen_port_is_not_followed(
    setup: tuple[GitRemote, Path], tmp_path: Path
) -> None:
    """A `pipeline serve` of another project (its own state database) answering on this
    config's `[server] listen` port is not taken for this project's: the hook deploys the push
    itself instead of following an event that service would never take."""
    remote, config = setup
    install(remote, config)
    other = tmp_path / "other" / "pipeline.toml"
    other.parent.mkdir()
    listen = next(ln for ln in config.read_text().splitlines() if ln.startswith("listen"))
    other.write_text(f'[pipeline]\ndata_dir = "data"\n\n[server]\n{listen}\n')
    service = Service(other, watch_repos=False)
    service.start()
    try:
        remote.commit("second")
        code, output = push(remote)
    finally:
        service.stop(timeout=10)
    assert code == 0, output
    assert "deploying it here" in output and "following it" not in output
    (event,) = queued(config)
    assert event["status"] == "done"
