"""A target host reached over ssh://: real sshd in a lab host's netns, real dial-stdio."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_helpers import one_service_config
from serve_helpers import free_port, start_serve

from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.operations import rollback_service, status_rows
from pipeline.deploy.runner import Runner
from pipeline.lab import ssh as lab_ssh
from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SSH_PORT = lab_ssh.SSH_PORT


@pytest.fixture
def ssh_host(lab: LabState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """sshd on lab host 1 (its own keys and config) whose sessions reach that host's engine;
    an `ssh` first on PATH that uses this test's client config, never ~/.ssh, and logs the pid
    of each ssh process it starts (`ssh_starts`); while `gated` (a file) exists, an ssh process
    started then waits for `gate-open` (up to 10 s, then logs its pid to `gate-waited.log`)."""
    if not lab_ssh.SSHD.exists():
        pytest.skip("openssh-server is not installed")
    d = tmp_path / "ssh"
    gate = (f"if [ -e {d}/gated ]; then i=0\n"
            f"  while [ ! -e {d}/gate-open ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
            f"  [ -e {d}/gate-open ] || echo $$ >> {d}/gate-waited.log\nfi\n")  # fmt: skip
    with lab_ssh.ssh_host(lab, d, before_exec=gate) as host:
        monkeypatch.setenv("PATH", f"{host.bin_dir}:{os.environ['PATH']}")
        yield host.address


def ssh_starts(tmp_path: Path) -> list[int]:
    """The pids of the ssh processes started so far through the `ssh_host` fixture's `ssh`."""
    return lab_ssh.SshHost("", SSH_PORT, tmp_path / "ssh").starts()


def running(pid: int) -> bool:
    """True while process `pid` exists (a zombie not yet reaped counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_deploy_to_an_ssh_host(
    ssh_host: str, lab: LabState, tmp_path: Path, git_remote: Any
) -> None:
    """A service on a `docker = "ssh://root@HOST:PORT"` host is pulled, started, health-checked and
    reported through the ssh connection."""
    write_sample_app(git_remote.work, "web", "served over ssh")
    git_remote.commit_push("app")
    config = tmp_path / "pipeline.toml"
    host_table = (
        f'[hosts.remote]\ndocker = "ssh://root@{ssh_host}:{SSH_PORT}"\naddress = "{ssh_host}"'
    )
    config.write_text(one_service_config(lab.registry, host_table, git_remote.url, "sshweb", 18555))
    loaded = load(config)
    runner = Runner(loaded, State.in_dir(loaded.data_dir), Connections(loaded))
    try:
        result = runner.run_pass()
        assert result.ok, result.errors
        assert httpx.get(f"http://{ssh_host}:18555/", timeout=5).text == "served over ssh"
        (row,) = status_rows(runner.state, runner.connections)
        assert row["state"] == "running" and row["host"] == "remote"
    finally:
        engine = runner.connections.engine("remote")
        for c in engine.containers.managed_containers("sshweb"):
            engine.containers.remove(c.id)
        runner.connections.close()


def _proxied_on_ssh(
    ssh_host: str,
    lab: LabState,
    tmp_path: Path,
    git_remote: Any,
    service: str,
    name: str,
    more: str = "",
) -> Path:
    """The config of `service`, proxied by Host `name` on the ssh:// host alone (`more`: more
    tables), its first revision ("ssh v1") pushed; skips without a proxy image."""
    if lab.proxy_image is None:
        pytest.skip("the lab has no proxy image (apt-get install caddy)")
    write_sample_app(git_remote.work, "web", "ssh v1")
    git_remote.commit_push("v1")
    config = tmp_path / "pipeline.toml"
    host_table = (
        f'[hosts.remote]\ndocker = "ssh://root@{ssh_host}:{SSH_PORT}"\naddress = "{ssh_host}"'
    )
    text = one_service_config(lab.registry, host_table, git_remote.url, service, 1)
    text = text.replace('ports = ["1:8080"]\n', "")
    text += (f'\n[proxy]\nimage = "{lab.proxy_image}"\n\n[services.{service}.proxy]\n'
             f'hosts = ["{name}"]\nport = 8080\ndrain = "1s"\n{more}')  # fmt: skip
    config.write_text(text)
    return config


def test_proxied_deploy_and_rollback_on_an_ssh_host(
    ssh_host: str, lab: LabState, tmp_path: Path, git_remote: Any
) -> None:
    """Over ssh:// only, the host's proxy is made, the service served through it by its Host
    header, a new revision switched to, and `rollback` switches back to the kept container
    over the one ssh connection it opened first (no engine call waits for a second handshake,
    not even where two run at once), not one ssh per engine call; closing ends every ssh."""
    config = _proxied_on_ssh(ssh_host, lab, tmp_path, git_remote, "sshproxied", "ssh.test")
    loaded = load(config)
    runner = Runner(loaded, State.in_dir(loaded.data_dir), Connections(loaded))

    def served() -> str:
        return httpx.get(f"http://{ssh_host}/", headers={"Host": "ssh.test"}, timeout=5).text

    try:
        assert runner.run_pass().ok
        assert served() == "ssh v1"
        write_sample_app(git_remote.work, "web", "ssh v2")
        git_remote.commit_push("v2")
        assert runner.run_pass().ok
        assert served() == "ssh v2"
        # The rollback starts with one ssh connection open, as `pipeline rollback` does after
        # its first engine call; every ssh process started from now on is held at the gate.
        runner.connections.close()
        runner.connections.engine("remote").containers.managed_containers("sshproxied")
        before = len(ssh_starts(tmp_path))
        gate = tmp_path / "ssh"
        (gate / "gated").touch()
        try:
            assert rollback_service(runner, "sshproxied").ok
        finally:
            (gate / "gate-open").touch()
        assert served() == "ssh v1"
        # ~22 engine calls, two of them at once (the standby route beside the unpause): the
        # second ssh process started then was not waited for.
        assert not (gate / "gate-waited.log").exists()
        assert len(ssh_starts(tmp_path)) - before <= 1
    finally:
        engine = runner.connections.engine("remote")
        for c in engine.containers.managed_containers("sshproxied"):
            engine.containers.remove(c.id)
        runner.connections.close()
    assert not [pid for pid in ssh_starts(tmp_path) if running(pid)]


def test_a_rollback_handed_to_serve_reuses_its_ssh_connection(
    ssh_host: str, lab: LabState, tmp_path: Path, git_remote: Any
) -> None:
    """`pipeline serve` connects to an ssh:// host as it starts, so `pipeline rollback` handed
    to it switches the proxied service back without waiting for any ssh handshake: neither
    the command nor the service starts an ssh connection the rollback needs."""
    port = free_port()
    config = _proxied_on_ssh(ssh_host, lab, tmp_path, git_remote, "sshhanded", "handed.test",
                             f'\n[server]\nlisten = "127.0.0.1:{port}"\n')  # fmt: skip
    loaded = load(config)
    runner = Runner(loaded, State.in_dir(loaded.data_dir), Connections(loaded))

    def served() -> str:
        return httpx.get(f"http://{ssh_host}/", headers={"Host": "handed.test"}, timeout=5).text

    serve = None
    try:
        assert runner.run_pass().ok
        write_sample_app(git_remote.work, "web", "ssh v2")
        git_remote.commit_push("v2")
        assert runner.run_pass().ok
        assert served() == "ssh v2"
        runner.connections.close()
        before = len(ssh_starts(tmp_path))
        serve = start_serve(config, f"http://127.0.0.1:{port}", tmp_path / "serve.log",
                            watch_repos=False)  # fmt: skip
        deadline = time.monotonic() + 10
        while len(ssh_starts(tmp_path)) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ssh_starts(tmp_path)) > before, "serve did not connect as it started"
        serve.get("/api/status")  # its connection is up (the status goes through it)
        gate = tmp_path / "ssh"
        (gate / "gated").touch()  # every ssh process started from now on waits at the gate
        try:
            began = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "pipeline", "rollback", "sshhanded", "-c", str(config)],
                capture_output=True, text=True, check=False, timeout=120,
            )  # fmt: skip
            took = time.monotonic() - began
        finally:
            (gate / "gate-open").touch()
        assert done.returncode == 0, done.stderr + serve.log()
        assert "rolling back in pipeline serve" in done.stderr
        assert served() == "ssh v1"
        assert not (gate / "gate-waited.log").exists()  # nothing waited for a new ssh
        print(f"handed rollback on one ssh:// host: {took:.2f}s, command start to exit")
    finally:
        if serve is not None:
            serve.stop()
        engine = runner.connections.engine("remote")
        for c in engine.containers.managed_containers("sshhanded"):
            engine.containers.remove(c.id)
        runner.connections.close()
    assert not [pid for pid in ssh_starts(tmp_path) if running(pid)]
