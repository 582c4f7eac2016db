"""ssh:// engines through the docker SDK's ssh-client mode: connections reused across calls and
closed quietly, with a stand-in `ssh` on PATH that answers HTTP on its stdin/stdout as
`docker system dial-stdio` would (fault injection: no sshd or engine needed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.hosts.connection import Connection

# Answers every request with a /version body over HTTP/1.1 keep-alive until stdin closes, or,
# with FAKE_SSH_ONCE set, answers one request and exits (sshd gone).
FAKE_SSH = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    with open({log!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    body = json.dumps({{"ApiVersion": "1.41", "Version": "fake"}}).encode()
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


def test_calls_on_an_ssh_engine_reuse_one_ssh_connection(fake_ssh: Path) -> None:
    """Ten engine calls on an ssh:// host start one ssh process, not one per call, and closing
    the connection ends it."""
    conn = Connection("remote", "ssh://root@198.51.100.7:2222", timeout=10)
    for _ in range(10):
        assert conn.client.api.version()["Version"] == "fake"
    pids = [int(p) for p in fake_ssh.read_text().split()]
    assert len(pids) == 1
    conn.close()
    assert subprocess.run(["ps", "-p", str(pids[0])], capture_output=True).returncode == 1


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
    for _ in range(3):
        assert api.version()["Version"] == "fake"
    assert len(fake_ssh.read_text().split()) == 2
    conn.close()
