"""Pooled connections to an `ssh://` engine for the docker SDK's ssh-client mode.

The docker SDK (7.x, `use_ssh_client=True`) starts `ssh HOST docker system dial-stdio` for each
HTTP connection, but its adapter makes a new connection pool for every request, so every engine
call paid for a new ssh process and a new remote `dial-stdio` (~0.4 s each). `pooled_ssh` swaps
in an adapter that keeps one pool per client and reuses an idle ssh connection, as the SDK does
for tcp:// and unix:// engines. A connection whose ssh process has exited, or that carried a
hijacked stream (attach, exec start: the request asks for `Upgrade`, or the SDK read the pipe
past HTTP), is never reused. Closing a connection never raises: when sshd or the network went
away first, the ssh process is already gone and there is nothing left to tell it.

A request that finds no idle connection while others are in use (a rollout's standby route
loaded beside its container start, on two threads) waits up to `QUICK_WAIT` for one of those to
come back, the usual case since most engine calls take milliseconds; then it starts a new ssh
process and waits up to `BUSY_WAIT` more for one to come back, and takes the new one only then,
its handshake (~0.45 s in the lab, where `BUSY_WAIT` comes from) mostly done; a new one not
taken stays idle in the pool. So such a request waits little longer than a new connection would
take (`QUICK_WAIT` at most), usually far less, and a second connection needed only for an
instant costs no handshake, nor an ssh process competing for the CPU. A request with no
connection in use (the first) connects at once.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from typing import Any

import urllib3
from docker.transport.sshconn import (
    SSHConnection,
    SSHConnectionPool,
    SSHHTTPAdapter,
    SSHSocket,
)

_STOP_WAIT = 2.0  # seconds for an ssh process to exit after SIGTERM before it is killed
# Seconds a request that finds every connection in use waits for one to come back before it
# starts a new ssh process (most engine calls take less), then before it takes that new one:
# about one ssh handshake (TESTBED.md: bare `ssh true` 0.42-0.49 s here).
QUICK_WAIT = 0.05
BUSY_WAIT = 0.5


class _Reader:
    """The ssh process's stdout as one HTTP response's file: closing it at the end of the
    response leaves the pipe open for the next response on the same connection (the SDK's
    socket hands out the pipe itself, which http.client closes)."""

    def __init__(self, sock: _SSHSocket) -> None:
        self.channel = sock  # where the SDK finds the socket of a response
        self._stream = sock.proc.stdout if sock.proc is not None else None

    def close(self) -> None:
        """End this response's use of the pipe; the pipe stays open."""

    def flush(self) -> None:
        """Nothing to flush on a read: http.client flushes a response it closes, and the pipe
        of an ssh process that exited (refused, host key failure) is closed already; forwarded,
        that would raise ValueError instead of the engine being reported unreachable."""

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
    """The SDK's pool with connections that survive between requests, and a request that finds
    none idle while some are in use waiting briefly for one (module doc); a connection that
    cannot be reused is closed when it comes back or is taken out. Its queue holds only idle
    connections (urllib3's empty slots are taken out): up to `maxsize` are kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with contextlib.suppress(queue.Empty):
            while True:
                self.pool.get(block=False)  # urllib3's empty slots: a `get` must wait for one
        self._in_use = 0  # requests holding or getting a connection (approximate: for waiting)
        self._count_lock = threading.Lock()

    def _new_conn(self) -> Any:
        return _SSHConnection(None, self.timeout, self.ssh_host)

    @staticmethod
    def _reusable(conn: Any) -> bool:
        sock = getattr(conn, "sock", None)
        if sock is None:
            return True  # closed, or not yet connected: connects on its next request
        return isinstance(sock, _SSHSocket) and sock.usable and not conn.upgraded

    def _get_conn(self, timeout: float | None = None) -> Any:
        slots = self.pool
        if slots is None:
            raise urllib3.exceptions.ClosedPoolError(self, "Pool is closed.")
        with self._count_lock:
            self._in_use += 1  # counted before it looks: a request finding the queue empty
        try:  # then knows whether another took the connection it would have had
            conn = self._idle(slots, 0.0)
            if conn is None:
                with self._count_lock:
                    others = self._in_use > 1
                conn = self._idle(slots, QUICK_WAIT) if others else None
                if conn is None:
                    new = self._new_conn()
                    conn = self._started_or_back(slots, new) if others else new
        except BaseException:
            with self._count_lock:
                self._in_use -= 1
            raise
        return conn

    def _started_or_back(self, slots: queue.Queue[Any], new: Any) -> Any:
        """Start `new`'s ssh process, then take a connection that comes back within
        `BUSY_WAIT`, leaving `new` idle in the pool, or else `new`, its handshake under way."""
        new.connect()  # starts `ssh HOST docker system dial-stdio`; returns at once
        back = self._idle(slots, BUSY_WAIT)
        if back is None:
            return new
        super()._put_conn(new)
        return back

    def _idle(self, slots: queue.Queue[Any], wait: float) -> Any:
        """An idle reusable connection, waiting up to `wait` seconds for one; None if none came.
        Dead ones met on the way are closed."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            try:
                conn = slots.get(block=left > 0, timeout=left if left > 0 else None)
            except queue.Empty:
                return None
            if conn is not None and self._reusable(conn):
                return conn
            if conn is not None:
                conn.close()

    def _put_conn(self, conn: Any) -> None:
        with self._count_lock:
            self._in_use = max(0, self._in_use - 1)
        # No empty slot is put back (urllib3 returns None after a failed request): the queue
        # holds only idle connections, so a request can wait on it for one to come back.
        if conn is None or not self._reusable(conn):
            if conn is not None:
                conn.close()
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
