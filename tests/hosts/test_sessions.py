"""`pipeline exec` against the machine's own engine: stdin piped in with -i, and a shell on a
real terminal (tmux) with -it; the command's exit code comes back either way."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from docker_helpers import remove_test_images, write_busybox_context

pytestmark = [pytest.mark.docker]

CONFIG = """
[pipeline]
data_dir = "data"

[hosts.local]
docker = "unix:///var/run/docker.sock"

[repos.app]
url = "/srv/app.git"

[images.app]
repo = "app"

[services.{name}]
image = "app"
hosts = ["local"]
"""


@pytest.fixture
def running(tmp_path: Path, local_engine: docker.DockerClient) -> Iterator[tuple[str, Path]]:
    """A container labelled as service NAME's (as a rollout starts it) and a config naming it."""
    session = uuid.uuid4().hex[:8]
    name = f"sess{session}"
    ctx = write_busybox_context(tmp_path / "ctx", session,
                                cmd='["/bin/busybox", "sleep", "300"]')  # fmt: skip
    # No build cache: another worker removing its images may delete a cached layer mid-build.
    image, _ = local_engine.images.build(path=str(ctx), rm=True, nocache=True)
    container = local_engine.containers.run(
        image.id, detach=True, name=name,
        labels={"dev.pipeline.managed": "true", "dev.pipeline.service": name},
    )  # fmt: skip
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG.format(name=name))
    try:
        yield name, config
    finally:
        container.remove(force=True)
        remove_test_images(local_engine, session)


def test_exec_i_passes_stdin_and_the_exit_code(running: tuple[str, Path]) -> None:
    """`exec -i` feeds piped stdin to the command and exits with the command's code."""
    name, config = running
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "exec", name, "-i", "-c", str(config), "--",
         "/bin/busybox", "sh"],
        input="echo from-stdin\nexit 5\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 5, done.stderr
    assert done.stdout.strip() == "from-stdin"


def test_exec_it_gives_a_shell_on_a_terminal(running: tuple[str, Path], tmp_path: Path) -> None:
    """`exec -it -- sh` in a real terminal gives a prompt that runs what is typed."""
    name, config = running
    socket, done = f"pipeline-test-{uuid.uuid4().hex[:8]}", tmp_path / "exit"
    command = (f"{sys.executable} -m pipeline exec {name} -it -c {config} -- /bin/busybox sh; "
               f"echo $? > {done}; sleep 60")  # fmt: skip

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True,
                              check=False, timeout=30).stdout  # fmt: skip

    try:
        tmux("new-session", "-d", "-x", "100", "-y", "20", "-s", "t", command)
        deadline = time.monotonic() + 60
        while "/ #" not in tmux("capture-pane", "-p", "-t", "t"):  # the prompt
            assert time.monotonic() < deadline, tmux("capture-pane", "-p", "-t", "t")
            time.sleep(0.2)
        tmux("send-keys", "-t", "t", "echo sum-$((40+2)); exit 3", "Enter")
        while not (done.exists() and done.read_text().strip()):
            assert time.monotonic() < deadline, tmux("capture-pane", "-p", "-t", "t")
            time.sleep(0.2)
        screen = tmux("capture-pane", "-p", "-t", "t")
    finally:
        tmux("kill-server")
    assert "sum-42" in screen
    assert done.read_text().strip() == "3"
