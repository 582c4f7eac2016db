"""Benchmark: zero-downtime deploys through each lab host's `pipeline-proxy`, under load.

Run (root): .venv/bin/python bench/bench_zero_downtime.py [--deploys 20] [--failing 10]
            [--rollbacks 10] [--threads 4] [--idle 10]
Targets: 0 failed requests (non-2xx or connection errors); p99 latency while changes happen
at most 2x p99 while idle; rollback under 1 s per host (until its route is switched back).

A lab of its own (2 hosts, 10.88.225.0/24 unless --subnet, taken down at the end, also on
Ctrl-C) with the lab's Caddy image. One repo holds the sample app, deployed as a proxied
service on both hosts (health check through the proxy, `drain = "2s"`). A closed-loop load
generator (`--threads` threads, a new connection per request, round robin over both hosts'
proxies by the service's Host header; a process of its own, so the pipeline's threads do not
hold the GIL its clients need) runs the whole time and records every answer with the
phase it fell in: `idle` (before the first change, `--idle` s) or `changing` (from the start
of each pass to its end). Then, in order: `--deploys` deploys of a changed page
(`Runner.run_pass()` in process, build + push + rollout); `--failing` deploys of a revision
whose /health answers 404 and whose / answers 500 (each rolled back automatically);
`--rollbacks` manual rollbacks (`rollback_service`, alternating between the last two good
releases, so each is a switch back to the retained container), with the registry unreachable
from both hosts (an iptables REJECT in each host's namespace). The rollback time per host is
taken from the recorded steps: from its first step to the end of its `route` step; and, as the
hosts switch back at once, from the first step on any host to the last host switched, divided
by the number of hosts.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import multiprocessing
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from _lab import GitRemote, own_lab

from pipeline import logs
from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.operations import rollback_service
from pipeline.deploy.runner import Runner
from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.state.store import State

SUBNET = "10.88.225.0/24"
T = TypeVar("T")
SERVICE = "web"
HOST_HEADER = "web.bench.test"
BROKEN_CGI = (
    '#!/bin/busybox sh\necho "Status: 500 Internal Server Error"\n'
    'echo "Content-Type: text/plain"\necho\necho broken\n'
)


PHASES = ("idle", "changing", "between")


def get_page(address: str, timeout: float) -> tuple[int, str]:
    """GET / of the service from the proxy at `address` on a new connection (Host header of
    `web`): (status, body stripped). Raises OSError or http.client.HTTPException."""
    conn = http.client.HTTPConnection(address, 80, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": HOST_HEADER, "Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace").strip()
    finally:
        conn.close()

def _load_process(
    addresses: list[str], threads: int, phase: Any, stop: Any, out: Connection
) -> None:
    """The load generator's own process: `threads` closed-loop clients, each answer recorded
    with the phase (`PHASES[phase.value]`) it started in; sent through `out` once `stop` is
    set. A process of its own, so that the pipeline under test (Python threads in the bench's
    process) never holds the GIL a client needs to read its answer and its clock."""
    answers: list[tuple[str, float, str]] = []
    lock = threading.Lock()

    def loop(offset: int) -> None:
        i = offset
        while not stop.is_set():
            address = addresses[i % len(addresses)]
            i += 1
            current = PHASES[phase.value]
            t0 = time.perf_counter()
            try:
                status, body = get_page(address, timeout=10)
                outcome = f"{status} {body[:40]}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"error {type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - t0
            with lock:
                answers.append((current, elapsed, outcome))

    workers = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(threads)]
    for w in workers:
        w.start()
    stop.wait()
    for w in workers:
        w.join()
    out.send(answers)
    out.close()


@dataclass
class Load:
    """A closed-loop load generator (in a process of its own) against both hosts' proxies;
    `phase` labels each answer; `answers` (phase, seconds, outcome) once it has stopped."""

    addresses: list[str]
    threads: int
    answers: list[tuple[str, float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._phase = ctx.Value("i", 0)
        self._stop = ctx.Event()
        self._received, sent = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_load_process,
            args=(self.addresses, self.threads, self._phase, self._stop, sent),
            daemon=True,
        )

    @property
    def phase(self) -> str:
        return PHASES[self._phase.value]

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase.value = PHASES.index(value)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self._process.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self.answers = self._received.recv()  # before join: a large answer fills the pipe
        self._process.join()
        self.seconds = time.monotonic() - self.started


def _config(lab: LabState, repo_url: str) -> str:
    hosts = ", ".join(f'"{h.name}"' for h in lab.hosts)
    return (
        lab.toml
        + f"""
[pipeline]
data_dir = "data"

[repos.app]
url = "{repo_url}"
branch = "main"

[images.{SERVICE}]
repo = "app"
context = "web"

[services.{SERVICE}]
image = "{SERVICE}"
hosts = [{hosts}]
stop_timeout = "2s"

[services.{SERVICE}.proxy]
hosts = ["{HOST_HEADER}"]
port = 8080
drain = "2s"

[services.{SERVICE}.health]
http = "/health"
interval = "200ms"
timeout = "3s"
monitor = "500ms"
"""
    )


class Project:
    def __init__(self, lab: LabState, workdir: Path) -> None:
        self.lab = lab
        self.remote = GitRemote(workdir / "git")
        self.config = workdir / "pipeline.toml"
        self.config.write_text(_config(lab, self.remote.url))
        self.release_revisions: list[str] = []

    def commit(self, content: str, broken: bool = False) -> str:
        ctx = write_sample_app(self.remote.work, "web", content)
        cgi = ctx / "www" / "cgi-bin"
        if broken:
            (ctx / "www" / "health").unlink()
            (ctx / "www" / "index.html").unlink()
            cgi.mkdir(exist_ok=True)
            (ctx / "www" / "broken.txt").write_text(content)  # each broken commit differs
            (cgi / "index.cgi").write_text(BROKEN_CGI)
            (cgi / "index.cgi").chmod(0o755)
        elif (cgi / "index.cgi").exists():
            (cgi / "index.cgi").unlink()
        sha: str = self.remote.commit(content)
        self.remote.push()
        return sha

    def runner(self) -> Runner:
        loaded = load(self.config)
        return Runner(loaded, State.in_dir(loaded.data_dir), Connections(loaded))


def _block_registry(lab: LabState, on: bool) -> None:
    hosts = json.loads((lab.dir / "lab.json").read_text())["hosts"]
    address, port = lab.registry.rsplit(":", 1)
    rule = ["OUTPUT", "-d", address, "-p", "tcp", "--dport", port, "-j", "REJECT"]
    for h in hosts:
        ns = ["nsenter", f"--net=/var/run/netns/{h['namespace']}", "--", "iptables"]
        subprocess.run([*ns, "-I" if on else "-D", *rule], check=on)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deploys", type=int, default=20)
    parser.add_argument("--failing", type=int, default=10)
    parser.add_argument("--rollbacks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--subnet", default=SUBNET)
    args = parser.parse_args()
    logs.configure("console", "warning")
    with own_lab("pipeline-zdt-", 2, args.subnet) as (lab, workdir):
        if lab.proxy_image is None:
            raise SystemExit("the lab has no proxy image: apt-get install caddy")
        project = Project(lab, workdir)
        project.commit("web v0")
        runner = project.runner()
        first = runner.run_pass()
        if not first.ok:
            raise SystemExit(f"first deploy failed: {first.errors}")
        good = [first.rollouts[0].release_id]
        pass_seconds: dict[str, list[float]] = {"deploy": [], "failing": [], "rollback": []}
        rollback_hosts: dict[str, list[float]] = {h.name: [] for h in lab.hosts}
        rollback_walls: list[float] = []  # first step anywhere to the last host switched
        rollback_steps: dict[str, list[float]] = collections.defaultdict(list)
        failures: list[str] = []
        with Load([h.address for h in lab.hosts], args.threads) as load_gen:
            time.sleep(args.idle)

            def timed(kind: str, action: Callable[[], T]) -> T:
                load_gen.phase = "changing"
                t0 = time.perf_counter()
                try:
                    return action()
                finally:
                    pass_seconds[kind].append(time.perf_counter() - t0)
                    load_gen.phase = "between"

            for n in range(1, args.deploys + 1):
                project.commit(f"web v{n}")
                result = timed("deploy", runner.run_pass)
                if not result.ok:
                    failures.append(f"deploy {n}: {result.errors}")
                else:
                    good.append(result.rollouts[0].release_id)
                print(f"deploy {n}: {pass_seconds['deploy'][-1]:.2f}s", flush=True)
            for n in range(1, args.failing + 1):
                project.commit(f"web broken {n}", broken=True)
                result = timed("failing", runner.run_pass)
                if result.ok:
                    failures.append(f"failing deploy {n} succeeded")
                print(f"failing deploy {n}: {pass_seconds['failing'][-1]:.2f}s", flush=True)
            _block_registry(lab, True)
            try:
                for n in range(1, args.rollbacks + 1):
                    to = f"r{good[-2] if n % 2 else good[-1]}"
                    outcome = timed("rollback", lambda to=to: rollback_service(
                        runner, SERVICE, to))  # fmt: skip
                    if not outcome.ok:
                        failures.append(f"rollback {n}: {outcome.error}")
                    run = runner.state.runs(limit=1)[0]
                    steps = runner.state.steps(run.id)
                    moved = [s for s in steps if s.host and s.kind != "retire"]
                    routed = [s.finished_at for s in moved if s.kind == "route" and s.finished_at]
                    if len(routed) == len(lab.hosts):
                        first = min(s.started_at for s in moved)
                        rollback_walls.append((max(routed) - first).total_seconds())
                    for h in lab.hosts:
                        mine = [s for s in steps if s.host == h.name and s.kind != "retire"]
                        route = [s for s in mine if s.kind == "route" and s.finished_at]
                        if route:
                            first_start = min(s.started_at for s in mine)
                            end = route[0].finished_at
                            assert end is not None
                            took = (end - first_start).total_seconds()
                            rollback_hosts[h.name].append(took)
                        for s in mine:  # where the time goes: each step's own duration
                            if s.finished_at is not None:
                                rollback_steps[s.kind].append(
                                    (s.finished_at - s.started_at).total_seconds()
                                )
                    print(f"rollback {n} to {to}: {pass_seconds['rollback'][-1]:.2f}s", flush=True)
            finally:
                _block_registry(lab, False)
            time.sleep(1.0)
        runner.connections.close()
    answers = load_gen.answers
    outcomes = Counter(o for _p, _s, o in answers)
    failed = {o: n for o, n in outcomes.items() if not o.startswith("2")}
    idle = [s for p, s, _o in answers if p == "idle"]
    changing = [s for p, s, _o in answers if p == "changing"]
    rate = len(answers) / load_gen.seconds
    per_host = [t for ts in rollback_hosts.values() for t in ts]
    print()
    print(f"requests: {len(answers)} in {load_gen.seconds:.1f}s ({rate:.0f}/s, {args.threads} "
          f"threads, closed loop, a new connection each)")  # fmt: skip
    print(f"failed requests: {sum(failed.values())} {dict(failed) if failed else ''}")
    for (phase, outcome), n in Counter(
        (p, o) for p, _s, o in answers if not o.startswith("2")
    ).items():
        print(f"  failed while {phase}: {n} x {outcome}")
    print(f"answers: {dict(outcomes.most_common(6))}")
    print(f"latency idle:     p50 {_pct(idle, 0.5) * 1000:.1f} ms  p99 "
          f"{_pct(idle, 0.99) * 1000:.1f} ms ({len(idle)} requests)")  # fmt: skip
    print(f"latency changing: p50 {_pct(changing, 0.5) * 1000:.1f} ms  p99 "
          f"{_pct(changing, 0.99) * 1000:.1f} ms ({len(changing)} requests)")  # fmt: skip
    print(f"p99 ratio changing/idle: {_pct(changing, 0.99) / _pct(idle, 0.99):.2f} (target <= 2)")
    for kind, secs in pass_seconds.items():
        if secs:
            print(f"{kind} passes: {len(secs)}, median {statistics.median(secs):.2f}s")
    for host, ts in rollback_hosts.items():
        if ts:
            print(f"rollback until switched, {host}: median {statistics.median(ts):.3f}s, "
                  f"max {max(ts):.3f}s")  # fmt: skip
    if per_host:
        print(f"rollback per host, all: median {statistics.median(per_host):.3f}s, "
              f"max {max(per_host):.3f}s (target < 1 s)")  # fmt: skip
    if rollback_walls:
        wall, n = statistics.median(rollback_walls), len(lab.hosts)
        worst = max(rollback_walls)
        print(f"rollback until every host switched: median {wall:.3f}s, max {worst:.3f}s; "
              f"{wall / n:.3f}s per host ({n} hosts at once)")  # fmt: skip
    for kind, ts in rollback_steps.items():
        print(f"  rollback step {kind}: median {statistics.median(ts):.3f}s, max {max(ts):.3f}s")
    for f in failures:
        print(f"PROBLEM: {f}")
    return 0 if not failed and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
