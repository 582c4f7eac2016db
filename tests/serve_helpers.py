"""`pipeline serve` as a user runs it: a real child process on a free loopback port, its log in
a file, driven through its HTTP API and the `pipeline` CLI; and a lab project whose config it
serves (composed over `deploy_helpers.Project`)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import docker
import httpx
from deploy_helpers import Project

from pipeline.lab.manage import LabState

SERVE_READY_TIMEOUT = 30.0
SERVE_STOP_TIMEOUT = 45.0  # a build in progress is not interruptible; a health wait is


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    check: Callable[[], Any], timeout: float = 30.0, what: str = "condition", every: float = 0.2
) -> Any:
    """Poll `check` until it returns something truthy (exceptions count as not yet); fail the
    test after `timeout` seconds, naming `what` and the last exception seen."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = check()
        except Exception as exc:  # a host restarting its container refuses for a moment
            last, value = exc, None
        if value:
            return value
        if time.monotonic() > deadline:
            why = f" (last error: {type(last).__name__}: {last})" if last else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{why}")
        time.sleep(every)


# -- the serve process ----------------------------------------------------------------------


@dataclass
class Serve:
    """One running `pipeline serve` child process; `url` is its HTTP API."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    _log: IO[bytes]

    def log(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str) -> Any:
        """GET an API path and return its JSON (asserting 200)."""
        res = httpx.get(self.url + path, timeout=10, trust_env=False)
        assert res.status_code == 200, f"GET {path}: {res.status_code} {res.text}"
        return res.json()

    def events(self) -> list[dict[str, Any]]:
        """/api/events, oldest first."""
        return list(reversed(self.get("/api/events?limit=1000")))

    def runs(self) -> list[dict[str, Any]]:
        """/api/runs, oldest first."""
        return list(reversed(self.get("/api/runs?limit=1000")))

    def run(self, run_id: int) -> dict[str, Any]:
        """/api/runs/{id}: the run and its steps."""
        data: dict[str, Any] = self.get(f"/api/runs/{run_id}")
        return data

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        """SIGKILL, as a crash or the OOM killer would; wait for it to be gone."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL as a fallback; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SERVE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def start_serve(
    config: Path,
    url: str,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    watch_repos: bool = True,
    options: tuple[str, ...] = (),
) -> Serve:
    """Start `python -m pipeline [OPTIONS] serve -c CONFIG` and return once /healthz answers
    200; `options` are the global ones (`--log-format json`)."""
    argv = [sys.executable, "-m", "pipeline", *options, "serve", "-c", str(config)]
    if not watch_repos:
        argv.append("--no-watch-repos")
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=config.parent,
    )
    serve = Serve(proc, url, log_path, log_file)
    deadline = time.monotonic() + SERVE_READY_TIMEOUT
    while not serve.healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            serve.stop()
            raise AssertionError(
                f"pipeline serve did not answer /healthz at {url} (exit {proc.returncode}):\n"
                + serve.log()
            )
        time.sleep(0.1)
    return serve


class ServeProcesses:
    """Starts `pipeline serve` processes for one test; `stop_all` stops every one and prints
    their logs (pytest shows them when the test failed)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Serve] = []

    def __call__(
        self,
        sp: ServeProject,
        *,
        watch_repos: bool = True,
        options: tuple[str, ...] = (),
        instance: Instance | None = None,
    ) -> Serve:
        """Start `pipeline serve` of `sp`'s config, or of `instance`'s (one of several sharing
        a database)."""
        log_path = self.tmp_path / f"serve-{len(self.started) + 1}.log"
        config, url = (instance.config, instance.url) if instance else (sp.config, sp.url)
        serve = start_serve(
            config, url, log_path, env=sp.env, watch_repos=watch_repos, options=options
        )
        self.started.append(serve)
        return serve

    def stop_all(self) -> None:
        for serve in self.started:
            with contextlib.suppress(Exception):
                serve.stop()
        for serve in self.started:
            with contextlib.suppress(OSError):
                print(f"\n----- {serve.log_path} -----\n{serve.log()}")


@dataclass(frozen=True)
class Instance:
    """One of several `pipeline serve` instances of a project: its own config file (own
    `data_dir` and port, the shared `[pipeline] database`) and the URL it serves."""

    config: Path
    url: str


def instances_of(sp: ServeProject, database: str, password_env: str, count: int) -> list[Instance]:
    """Write `count` configs of `sp` (as rendered now) that share `database` (a URL without
    password; the password in `password_env`), each with a data_dir and a port of its own."""
    found = []
    for n in range(1, count + 1):
        port = free_port()
        text = sp.render().replace(
            '[pipeline]\ndata_dir = "data"\n',
            f'[pipeline]\ndata_dir = "data-{n}"\ndatabase = "{database}"\n'
            f'database_password_env = "{password_env}"\n',
        )
        text = text.replace(f'listen = "127.0.0.1:{sp.port}"', f'listen = "127.0.0.1:{port}"')
        config = sp.config.with_name(f"pipeline-{n}.toml")
        config.write_text(text)
        found.append(Instance(config, f"http://127.0.0.1:{port}"))
    return found


# -- webhooks -------------------------------------------------------------------------------


def github_push(
    serve: Serve,
    repo: str,
    secret: str,
    *,
    before: str,
    after: str,
    delivery: str | None = None,
    signature: str | None = None,
    body: bytes | None = None,
) -> httpx.Response:
    """POST a GitHub push delivery of refs/heads/main to /hooks/REPO, signed with `secret`
    unless `signature` is given."""
    if body is None:
        body = json.dumps(
            {
                "ref": "refs/heads/main",
                "before": before,
                "after": after,
                "created": False,
                "deleted": False,
                "forced": False,
                "repository": {"name": repo, "full_name": f"acme/{repo}"},
                "pusher": {"name": "dev"},
                "head_commit": {"id": after, "message": "change"},
            }
        ).encode()
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/e2e",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": signature or f"sha256={mac}",
    }
    return httpx.post(
        f"{serve.url}/hooks/{repo}", content=body, headers=headers, timeout=30, trust_env=False
    )


# -- the project ----------------------------------------------------------------------------


@dataclass
class App:
    """An image built from `context` of a repo, and its service of the same name on the hosts."""

    name: str
    context: str
    port: int
    repo: str = "shop"
    health: str = 'interval = "200ms"\ntimeout = "10s"\nmonitor = "300ms"'
    rebuild: str | None = None
    service_extra: str = ""


@dataclass
class Repo:
    url: str
    poll: str | None = None
    secret_env: str | None = None


@dataclass
class ServeProject:
    """A `Project` (repo `shop` with images web/ and api/) whose config `pipeline serve` runs:
    `[server] listen` on a free port, repos, apps and extra tables editable between writes."""

    project: Project
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    repos: dict[str, Repo] = field(default_factory=dict)
    apps: list[App] = field(default_factory=list)

    @classmethod
    def make(cls, root: Path, remote: Any, lab: LabState) -> ServeProject:
        project = Project(root, remote, lab)
        sp = cls(project)
        sp.repos["shop"] = Repo(remote.url)
        sp.apps += [
            App(project.web, "web", project.web_port),
            App(project.api, "api", project.api_port),
        ]
        sp.write_config()
        return sp

    # -- shortcuts ------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.project.config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def web(self) -> App:
        return self.apps[0]

    @property
    def lab(self) -> LabState:
        return self.project.lab

    def app(self, name: str) -> App:
        return next(a for a in self.apps if a.name == name)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `pipeline ARGS -c CONFIG` with the serve process's environment."""
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args, "-c", str(self.config)],
            capture_output=True, text=True, check=False, timeout=300,
            env={**os.environ, **self.env},
        )  # fmt: skip

    def cli_json(self, *args: str) -> Any:
        res = self.cli(*args, "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout)

    def serves(self, port: int, text: str, path: str = "/") -> bool:
        """True when every lab host answers `text` at http://HOST:PORT/PATH."""
        return all(
            httpx.get(f"http://{h.address}:{port}{path}", timeout=3, trust_env=False).text == text
            for h in self.lab.hosts
        )

    # -- config ---------------------------------------------------------------------------
    def render(self, extra: str = "") -> str:
        hosts = "".join(
            f'[hosts.{h.name}]\ndocker = "{h.docker_url}"\naddress = "{h.address}"\n\n'
            for h in self.lab.hosts
        )
        text = (
            f'[pipeline]\ndata_dir = "data"\n\n[server]\nlisten = "127.0.0.1:{self.port}"\n\n'
            f'[registry]\naddress = "{self.lab.registry}"\n\n{hosts}'
        )
        for name, repo in self.repos.items():
            text += f'[repos.{name}]\nurl = "{repo.url}"\nbranch = "main"\n'
            text += f'poll = "{repo.poll}"\n' if repo.poll else ""
            text += f'webhook_secret_env = "{repo.secret_env}"\n' if repo.secret_env else ""
            text += "\n"
        host_list = json.dumps([h.name for h in self.lab.hosts])
        for a in self.apps:
            text += f'[images.{a.name}]\nrepo = "{a.repo}"\ncontext = "{a.context}"\n'
            text += f'rebuild = "{a.rebuild}"\n' if a.rebuild else ""
            text += (
                f'\n[services.{a.name}]\nimage = "{a.name}"\nhosts = {host_list}\n'
                f'ports = ["{a.port}:8080"]\nstop_timeout = "1s"\n{a.service_extra}\n'
                f'\n[services.{a.name}.health]\nhttp = "/health"\n{a.health}\n\n'
            )
        return text + extra

    def write_config(self, text: str | None = None) -> None:
        """Write the config (rendered, or `text`) atomically, as an editor saves a file."""
        tmp = self.config.with_name(f".{self.config.name}.tmp")
        tmp.write_text(self.render() if text is None else text)
        tmp.replace(self.config)

    # -- hosts ----------------------------------------------------------------------------
    def containers(self, service: str) -> dict[str, list[str]]:
        """Host name -> ids of the service's running containers."""
        return self.project.containers(service)

    def cleanup(self) -> None:
        """Remove every container of this project's services from the lab hosts."""
        for h in self.lab.hosts:
            client = docker.DockerClient(base_url=h.docker_url)
            try:
                for a in self.apps:
                    for c in client.containers.list(
                        all=True,
                        filters={"label": f"dev.pipeline.service={a.name}"},
                        ignore_removed=True,
                    ):
                        c.remove(force=True)
            finally:
                client.close()


@contextlib.contextmanager
def stand_in_serve(
    config: Path,
    answer: dict[str, Any],
    *,
    lines: tuple[str, ...] = (),
    delay: float = 0.0,
    healthz: tuple[int, bytes] | None = (200, b'{"ok": true, "queue_depth": 0}'),
) -> Iterator[list[tuple[str, str | None, dict[str, Any]]]]:
    """A stand-in for a running `pipeline serve` of `config`: this process (alive) published in
    `DATA_DIR/serve.json` (data_dir "data" beside the config). `GET /healthz` gets `healthz`
    (status, body; None: no answer within 3 s, as a stopped process); every POST gets `lines`
    and then `answer` as the NDJSON stream of a rollback (`{"line": …}`, `{"done": answer}`),
    `delay` seconds after the lines. Yields the POSTs it got: (path, Authorization, body)."""
    import http.server
    import threading

    from pipeline.config.load import load
    from pipeline.service import handoff

    got: list[tuple[str, str | None, dict[str, Any]]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: /healthz, then the POST on one connection

        def _send(self, status: int, raw: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            self.wfile.flush()

        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            if healthz is None:
                time.sleep(3)
                return
            self._send(*healthz)

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, self.headers["Authorization"], json.loads(body)))
            # A stream: its lines at once, the end of its body when the connection closes.
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Connection", "close")
            self.end_headers()
            for line in lines:
                self.wfile.write(json.dumps({"line": line}).encode() + b"\n")
            self.wfile.flush()
            time.sleep(delay)
            self.wfile.write(json.dumps({"done": answer}).encode() + b"\n")
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    data_dir = load(config).data_dir
    published = handoff.describe("127.0.0.1", server.server_address[1], config)
    handoff.publish(data_dir, published)
    try:
        yield got
    finally:
        handoff.withdraw(data_dir, published)
        server.shutdown()
        server.server_close()
