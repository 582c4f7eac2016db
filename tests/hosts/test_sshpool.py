"""ssh:// engines through the docker SDK's ssh-client mode: connections reused across calls and
closed quietly, with a stand-in `ssh` on PATH that answers HTTP on its stdin/stdout as
`docker system dial-stdio` would (fault injection: no sshd or engine needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.hosts import sshpool
from pipeline.hosts.connection import Connection

# Answers every request with a /version body (its own pid as "Pid": which ssh process served a
# call) over HTTP/1.1 keep-alive until stdin closes, or, with FAKE_SSH_ONCE set, answers one
# request and exits (sshd gone).
FAKE_SSH = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    with open({log!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    body = json.dumps({{"ApiVersion": "1.41", "Version": "fake", "Pid": os.getpid()}}).encode()
    while True:
        line = sys.stdin.buffer.readline()
        if not line.strip():
            sys.exit(0)
        while sys.stdin.buffer.readline() not in (b"\\r\\n", b"\\n", b""):
            pass
        sys.stdout.buffer.write(
            b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
            + f"Content-Length: {{len(body)}}\\r\\n\\r\\n".encode() + body
        )
        sys.stdout.buffer.flush()
        if os.environ.get("FAKE_SSH_ONCE"):
            sys.exit(0)
    """
)


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in `ssh` first on PATH; returns the file listing the pid of each one started."""
    log = tmp_path / "starts.log"
    script = tmp_path / "bin" / "ssh"
    script.parent.mkdir()
    script.write_text(FAKE_SSH.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{Path(sys.executable).parent}:/usr/bin:/bin")
    return log


def ssh_children() -> set[int]:
    """The pids of this process's children that run the stand-in `ssh` now (started by the
    pool, whether or not they have logged their start yet)."""
    ps = ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(os.getpid())]
    lines = subprocess.run(ps, capture_output=True, text=True, check=False).stdout.splitlines()
    return {int(line.split()[0]) for line in lines if "ssh" in line and "dial-stdio" in line}


def test_calls_on_an_ssh_engine_reuse_one_ssh_connection(fake_ssh: Path) -> None:
    """Ten engine calls on an ssh:// host start one ssh process, not one per call, and closing
    the connection ends it."""
    conn = Connection("remote", "ssh://root@198.51.100.7:2222", timeout=10)
    served = {conn.client.api.version()["Pid"] for _ in range(10)}
    assert ssh_children() == served and len(served) == 1
    conn.close()
    assert not ssh_children()


def test_a_call_while_the_only_connection_is_busy_takes_it_when_it_comes_back(
    fake_ssh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call made while another holds the engine's only connection (a rollout's standby route
    beside its container start) starts a new ssh process but is served by the busy connection
    once it comes back, not after a handshake of its own; the new one is kept for later."""
    monkeypatch.setattr(sshpool, "BUSY_WAIT", 60.0)  # the connection comes back well before
    conn = Connection("remote", "ssh://root@198.51.100.7:2222", timeout=10)
    api = conn.client.api
    try:
        first = api.version()["Pid"]
        pool = api.get_adapter(api.base_url).get_connection(api.base_url)
        busy = pool._get_conn()  # as a call in flight on another thread holds it
        with ThreadPoolExecutor(1) as other:
            second = other.submit(lambda: api.version()["Pid"])
            deadline = time.monotonic() + 30
            while len(ssh_children()) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the call started its new ssh process and waits
            assert not second.done()
            pool._put_conn(busy)
            assert second.result(timeout=30) == first
        assert len(ssh_children()) == 2  # the new one, idle for a later call
    finally:
        conn.close()
    assert not ssh_children()


def test_an_ssh_connection_whose_ssh_died_is_replaced_and_closes_quietly(fake_ssh: Path) -> None:
    """When the ssh process of a pooled connection has died (sshd stopped), the next call opens
    a new one, and neither closing the connection then nor the interpreter's exit prints or
    raises a BrokenPipeError."""
    program = textwrap.dedent(
        f"""\
        import os, signal, time
        from pipeline.hosts.connection import Connection
        def kill_ssh():
            for pid in open({str(fake_ssh)!r}).read().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        conn = Connection("remote", "ssh://root@198.51.100.7:2222", timeout=10)
        assert conn.client.api.version()["Version"] == "fake"
        kill_ssh()
        assert conn.client.api.version()["Version"] == "fake"
        kill_ssh()
        conn.client.api.version()
        kill_ssh()
        conn.close()
        conn.client.api.version()
        kill_ssh()  # the pool's finalizer closes it at exit (the SDK's socket: BrokenPipeError)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert len(fake_ssh.read_text().split()) == 4


def test_a_connection_asked_to_upgrade_is_not_reused(fake_ssh: Path) -> None:
    """A request asking for `Upgrade` (attach, exec start: the engine hijacks the connection for
    the stream) uses its ssh connection once; later calls use another, reused among them."""
    conn = Connection("remote", "ssh://root@198.51.100.7:2222", timeout=10)
    api = conn.client.api
    upgrade = {"Connection": "Upgrade", "Upgrade": "tcp"}
    api._post(api._url("/exec/{0}/start", "x"), headers=upgrade).close()
    assert not ssh_children()  # its ssh process ended with it
    served = {api.version()["Pid"] for _ in range(3)}
    assert ssh_children() == served and len(served) == 1
    conn.close()


def test_an_ssh_that_fails_to_connect_is_an_unreachable_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ssh that exits before the engine answers (refused, host key check failed) makes the
    call fail as an unreachable engine (EngineError naming the host), which `status` and a
    rollout report, not a ValueError from the closed pipe."""
    from pipeline.hosts.connection import EngineError

    script = tmp_path / "bin" / "ssh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho 'Host key verification failed.' >&2\nexit 255\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    conn = Connection("remote", "ssh://root@198.51.100.7:2222", timeout=10)
    try:
        with pytest.raises(EngineError, match="host remote"), conn.calling("ping"):
            conn.client.ping()
    finally:
        conn.close()
