"""Pooled connections to an `ssh://` engine for the docker SDK's ssh-client mode.

The docker SDK (7.x, `use_ssh_client=True`) starts `ssh HOST docker system dial-stdio` for each
HTTP connection, but its adapter makes a new connection pool for every request, so every engine
call paid for a new ssh process and a new remote `dial-stdio` (~0.4 s each). `pooled_ssh` swaps
in an adapter that keeps one pool per client and reuses an idle ssh connection, as the SDK does
for tcp:// and unix:// engines. A connection whose ssh process has exited, or that carried a
hijacked stream (attach, exec start: the request asks for `Upgrade`, or the SDK read the pipe
past HTTP), is never reused. Closing a connection never raises: when sshd or the network went
away first, the ssh process is already gone and there is nothing left to tell it.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from typing import Any

import urllib3
from docker.transport.sshconn import (
    SSHConnection,
    SSHConnectionPool,
    SSHHTTPAdapter,
    SSHSocket,
)

_STOP_WAIT = 2.0  # seconds for an ssh process to exit after SIGTERM before it is killed


class _Reader:
    """The ssh process's stdout as one HTTP response's file: closing it at the end of the
    response leaves the pipe open for the next response on the same connection (the SDK's
    socket hands out the pipe itself, which http.client closes)."""

    def __init__(self, sock: _SSHSocket) -> None:
        self.channel = sock  # where the SDK finds the socket of a response
        self._stream = sock.proc.stdout if sock.proc is not None else None

    def close(self) -> None:
        """End this response's use of the pipe; the pipe stays open."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _SSHSocket(SSHSocket):
    """The SDK's ssh-process socket, reusable across HTTP requests and quiet when closed."""

    proc: Any  # the `ssh ... docker system dial-stdio` subprocess.Popen, None before connect

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.hijacked = False

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> Any:
        if not self.proc:
            self.connect()
        return _Reader(self)

    def recv(self, n: int) -> bytes:
        """Read from the pipe past HTTP (the SDK does for attach and exec streams): from now on
        the connection carries that stream, not HTTP."""
        self.hijacked = True
        data: bytes = super().recv(n)
        return data

    @property
    def usable(self) -> bool:
        """True while the ssh process runs and no caller read it past HTTP."""
        return self.proc is not None and self.proc.poll() is None and not self.hijacked

    def close(self) -> None:
        """Tell dial-stdio to stop, end the ssh process and reap it; never raises."""
        proc, self.proc = self.proc, None
        with contextlib.suppress(OSError):
            super(SSHSocket, self).close()  # the unused AF_INET socket the SDK's class holds
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):  # ssh gone already: a broken pipe
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.write(b"\n\n")
                proc.stdin.flush()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if pipe is not None:
                    pipe.close()
        with contextlib.suppress(OSError):
            proc.terminate()
        try:
            proc.wait(timeout=_STOP_WAIT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
                proc.wait(timeout=_STOP_WAIT)


class _SSHConnection(SSHConnection):
    """The SDK's ssh connection on `_SSHSocket`; a request asking for `Upgrade` (attach, exec
    start: the engine hijacks the connection for the stream) makes it single-use."""

    upgraded = False

    def putheader(self, header: Any, *values: Any) -> None:
        name = header.decode() if isinstance(header, bytes) else str(header)
        if name.lower() == "upgrade":
            self.upgraded = True
        super().putheader(header, *values)

    def connect(self) -> None:
        self.upgraded = False
        sock = _SSHSocket(self.ssh_host)
        sock.settimeout(self.timeout)
        sock.connect()
        self.sock = sock


class _SSHConnectionPool(SSHConnectionPool):
    """The SDK's pool with connections that survive between requests; one that cannot be
    reused is closed when it comes back or is taken out."""

    def _new_conn(self) -> Any:
        return _SSHConnection(None, self.timeout, self.ssh_host)

    @staticmethod
    def _reusable(conn: Any) -> bool:
        sock = getattr(conn, "sock", None)
        if sock is None:
            return True  # closed, or not yet connected: connects on its next request
        return isinstance(sock, _SSHSocket) and sock.usable and not conn.upgraded

    def _get_conn(self, timeout: float | None = None) -> Any:
        while True:
            conn = super()._get_conn(timeout)
            if self._reusable(conn):
                return conn
            conn.close()

    def _put_conn(self, conn: Any) -> None:
        if conn is not None and not self._reusable(conn):
            conn.close()
            # Return an empty slot: the next request makes a new connection.
            super()._put_conn(None)
            return
        super()._put_conn(conn)


class PooledSSHAdapter(SSHHTTPAdapter):
    """`SSHHTTPAdapter` (ssh-client mode) that keeps one connection pool for its engine and
    closes it, with its ssh processes, in `close()`. Up to `max_pool_size` idle connections
    are kept; more are opened while that many calls run at once (urllib3 non-blocking pool)."""

    def __init__(self, base_url: str, timeout: int, max_pool_size: int) -> None:
        super().__init__(base_url, timeout, max_pool_size=max_pool_size, shell_out=True)
        self._pool: _SSHConnectionPool | None = None
        self._pool_lock = threading.Lock()

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        with self._pool_lock:
            if self._pool is None:
                self._pool = _SSHConnectionPool(
                    timeout=self.timeout, maxsize=self.max_pool_size, host=self.ssh_host
                )
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
                pool.close()
        super().close()


def pooled_ssh(api: Any) -> None:
    """Give a docker `APIClient` made for an ssh:// URL with `use_ssh_client=True` the pooling
    adapter (same URL, timeout and pool size). Other clients are left as they are."""
    old: Any = getattr(api, "_custom_adapter", None)
    if type(old) is not SSHHTTPAdapter or old.ssh_client is not None:
        return  # not the SDK's ssh-client adapter (paramiko mode, unix://, tcp://)
    adapter = PooledSSHAdapter("ssh://" + old.ssh_host, old.timeout, old.max_pool_size)
    api._custom_adapter = adapter
    api.mount("http+docker://ssh", adapter)
    old.close()
