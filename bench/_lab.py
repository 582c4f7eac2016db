"""Shared helpers of the lab benchmarks: a lab of their own that is always taken down, a real
git remote, timing of polls and of a run's recorded steps, and cleanup of the local engine."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx

from pipeline.cli.app import interrupt_on_sigterm
from pipeline.lab.manage import LabState, lab_down, lab_up
from pipeline.lab.sample_app import write_sample_app
from pipeline.lab.workrepo import WorkRepo
from pipeline.state.store import State
from pipeline.timeutil import epoch

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_BIN = ROOT / ".venv" / "bin" / "pipeline"
LOCAL_DOCKER = "unix:///var/run/docker.sock"





_MAIN_PID = os.getpid()  # a forked child must never tear the lab down


@contextlib.contextmanager
def own_lab(prefix: str, hosts: int, subnet: str) -> Iterator[tuple[LabState, Path]]:
    """A lab in a fresh temp dir; taken down, and the local images pushed to its registry
    removed, whatever happens (Ctrl-C and SIGTERM included). Yields (lab, workdir)."""
    if os.geteuid() != 0:
        raise SystemExit("the lab benchmarks need root (namespaces, a bridge, extra dockerds)")
    interrupt_on_sigterm()
    # Short path: the engines' unix sockets live below it (sun_path is 108 bytes).
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    lab_dir = workdir / "lab"
    registry: str | None = None
    try:
        lab = lab_up(lab_dir, hosts=hosts, subnet=subnet)
        registry = lab.registry
        yield lab, workdir
    finally:
        if os.getpid() != _MAIN_PID:
            os._exit(1)  # never tear the lab down from a forked child
        # A second Ctrl-C must not leave namespaces and engines behind.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            lab_down(lab_dir)
            if registry:
                removed = remove_local_images(f"{registry}/")
                print(f"cleanup: lab down, {removed} local image(s) of {registry} removed")
            subprocess.run(["rm", "-rf", "--", str(workdir)], check=False)
        finally:
            signal.signal(signal.SIGINT, old)


def remove_local_images(prefix: str) -> int:
    """Remove every image of the local engine tagged under `prefix` (the lab registry's)."""
    client = docker.DockerClient(base_url=LOCAL_DOCKER, timeout=60)
    count = 0
    try:
        for image in client.images.list():
            if any(t.startswith(prefix) for t in image.tags):
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(image.id, force=True)
                    count += 1
    finally:
        client.close()
    return count


GitRemote = WorkRepo  # a bare repo and a clone, as in the tests


def wait_for_content(url: str, expect: str, timeout: float = 30.0, every: float = 0.01) -> None:
    """Poll `url` every `every` s until its body is `expect`; raise RuntimeError after `timeout`.
    Each request gets a fresh connection and a 0.2 s timeout: while a container is replaced a
    SYN can be dropped, and a longer timeout would count the poller's wait as the deploy's."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    limits = httpx.Limits(max_keepalive_connections=0)
    # trust_env off: a proxy from the environment must never see lab traffic.
    with httpx.Client(timeout=0.2, trust_env=False, limits=limits) as client:
        while True:
            try:
                r = client.get(url)
                if r.status_code == 200 and r.text == expect:
                    return
                last = f"{r.status_code} {r.text[:60]!r}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not serve {expect!r} in {timeout}s (last: {last})")
            time.sleep(every)


@dataclass(frozen=True)
class StepTime:
    """One recorded step of a run, as offsets in seconds from the run's start."""

    kind: str
    subject: str
    host: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class RunTimes:
    """A run's recorded span (epoch seconds) and its steps."""

    started: float
    finished: float
    steps: tuple[StepTime, ...]

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def span(self, kinds: Sequence[str]) -> float:
        """From the first start to the last end of the steps of these kinds (0 if none)."""
        sel = [s for s in self.steps if s.kind in kinds]
        return max(s.end for s in sel) - min(s.start for s in sel) if sel else 0.0

    def last_end(self, kinds: Sequence[str]) -> float:
        """Offset of the last end of the steps of these kinds (0 if none)."""
        return max((s.end for s in self.steps if s.kind in kinds), default=0.0)


def run_times(data_dir: Path, run_id: int) -> RunTimes:
    """Read a run and its steps from the state database in `data_dir`."""
    state = State.in_dir(data_dir)
    try:
        run = state.run(run_id)
        if run is None or run.finished_at is None:
            raise RuntimeError(f"run {run_id} not found or not finished in {data_dir}")
        t0 = epoch(run.started_at)
        steps = tuple(
            StepTime(s.kind, s.subject or "", s.host or "", epoch(s.started_at) - t0,
                     epoch(s.finished_at or s.started_at) - t0)
            for s in state.steps(run_id)
        )
        return RunTimes(t0, epoch(run.finished_at), steps)
    finally:
        state.engine.dispose()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


PLAIN_PORT = 18081  # where the plain baseline publishes its container


class PlainDocker:
    """The floor the deploy benchmarks compare with: the same one-file change deployed with the
    plain docker CLI (build, push, pull by digest, replace the old container, run, first 200).

    `graceful`: replace as a stop-first rollout does (`docker stop -t STOP_TIMEOUT`, `docker rm`)
    instead of `rm -f`; `build` is the build command (default `docker build` on PATH) and
    `build_env` its extra environment (e.g. DOCKER_BUILDKIT=1); `files` are written into the
    context after the sample app (e.g. a Dockerfile of the benchmark's own)."""

    def __init__(self, lab: LabState, workdir: Path, *, graceful: bool = False,
                 stop_timeout: int = 1, build: Sequence[str] = ("docker", "build"),
                 build_env: dict[str, str] | None = None,
                 files: dict[str, str] | None = None) -> None:
        self.host = lab.hosts[0]
        self.ctx = write_sample_app(workdir / "plain", "ctx", "plain v0")
        for name, text in (files or {}).items():
            (self.ctx / name).write_text(text)
        self.repo = f"{lab.registry}/plain"
        self.container: str | None = None
        self.docker_h = ["docker", "-H", self.host.docker_url]
        self.graceful, self.stop_timeout = graceful, stop_timeout
        self.build, self.build_env = list(build), build_env
        self.steps: dict[str, list[float]] = defaultdict(list)

    def _timed(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> str:
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120,
                             env={**os.environ, **env} if env else None)
        self.steps[name].append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
        return res.stdout

    def deploy(self, rnd: int, record: bool = True) -> float:
        marker = f"plain round {rnd} {uuid.uuid4().hex[:8]}\n"
        (self.ctx / "www" / "index.html").write_text(marker)
        tag = f"{self.repo}:r{rnd}"
        name = f"plain-r{rnd}"
        t0 = time.perf_counter()
        self._timed("build", [*self.build, "-q", "-t", tag, str(self.ctx)], self.build_env)
        out = self._timed("push", ["docker", "push", tag])
        digest = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
        if digest is None:
            raise RuntimeError(f"no digest in the output of docker push:\n{out}")
        ref = f"{self.repo}@{digest.group(1)}"
        self._timed("pull", [*self.docker_h, "pull", "-q", ref])
        if self.container and self.graceful:
            self._timed("stop", [*self.docker_h, "stop", "-t", str(self.stop_timeout),
                                 self.container])
            self._timed("rm", [*self.docker_h, "rm", self.container])
        elif self.container:
            self._timed("rm -f", [*self.docker_h, "rm", "-f", self.container])
        self._timed("run", [*self.docker_h, "run", "-d", "--name", name,
                            "-p", f"{PLAIN_PORT}:8080", ref])
        self.container = name
        t1 = time.perf_counter()
        wait_for_content(f"http://{self.host.address}:{PLAIN_PORT}/", marker)
        self.steps["first 200"].append(time.perf_counter() - t1)
        wall = time.perf_counter() - t0
        if not record:
            self.steps.clear()
        return wall
