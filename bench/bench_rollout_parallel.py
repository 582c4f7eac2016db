"""Benchmark: rolling a new revision out to 4 lab hosts with max_parallel = 4, against 1 host.

Run (root): .venv/bin/python bench/bench_rollout_parallel.py [--rounds 5] [--stop-timeout 1s]
Target: median(rollout to 4 hosts) / median(rollout to 1 host) <= 1.5.

A lab of its own (4 hosts, 10.88.221.0/24, taken down at the end, also on Ctrl-C). One repo holds
two copies of the sample app, `one/` and `four/`; config A deploys image `one` to lab-1, config B
image `four` to lab-1..lab-4 with max_parallel = 4 (separate state, separate images, so no host
finds B's layers already pulled by A). Both are built and deployed once first. Then each round
changes both apps' index.html in one commit and runs `Runner.run_pass()` for A and for B, in
alternating order. The rollout is measured from the state DB: from the end of the last push
step to the end of the run (pull, stop-first replace, health, removal of the old containers,
records); also given, the span of the pull/start/health steps alone. For reference, each
round also does the same with the plain docker CLI (not the target's subject): a fresh image
built and pushed untimed, then `docker -H HOST pull`, `rm -f` of the old container, `run -d`
and the first 200 of the new content, timed on 1 host and on 4 hosts at once (threads).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _lab import GitRemote, RunTimes, fmt, median, own_lab, run_times, wait_for_content

from pipeline import logs
from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.runner import Runner
from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.state.store import State

SUBNET = "10.88.221.0/24"
TARGET = 1.5
ROLLOUT_STEPS = ("pull", "start", "health")


class Deployment:
    """One config (its own dir and state) deploying image `name` to some lab hosts."""

    def __init__(self, lab: LabState, root: Path, repo_url: str, name: str, hosts: int,
                 port: int, stop_timeout: str, interval: str) -> None:
        self.name, self.port = name, port
        self.hosts = lab.hosts[:hosts]
        root.mkdir()
        self.config = root / "pipeline.toml"
        self.data_dir = root / "data"
        host_list = ", ".join(f'"{h.name}"' for h in self.hosts)
        self.config.write_text(lab.toml + f"""
[pipeline]
data_dir = "data"

[repos.app]
url = "{repo_url}"
branch = "main"

[images.{name}]
repo = "app"
context = "{name}"

[services.{name}]
image = "{name}"
hosts = [{host_list}]
ports = ["{port}:8080"]
stop_timeout = "{stop_timeout}"
max_parallel = {hosts}

[services.{name}.health]
http = "/health"
interval = "{interval}"
timeout = "30s"
""")
        self.runs: list[RunTimes] = []

    def run(self, expect: str, record: bool = True) -> None:
        loaded = load(self.config)
        runner = Runner(loaded, State.in_dir(loaded.data_dir), Connections(loaded))
        try:
            result = runner.run_pass()
        finally:
            runner.connections.close()
            runner.state.engine.dispose()
        if not result.ok or not result.rollouts:
            raise RuntimeError(f"{self.name}: run_pass did not roll out: {result.errors}")
        for h in self.hosts:
            wait_for_content(f"http://{h.address}:{self.port}/", expect, timeout=5)
        if record:
            self.runs.append(run_times(self.data_dir, result.run_id))

    def rollouts(self) -> list[float]:
        """Per round: end of the last push step to the end of the run."""
        return [r.seconds - r.last_end(("push",)) for r in self.runs]

    def spans(self) -> list[float]:
        return [r.span(ROLLOUT_STEPS) for r in self.runs]


class PlainRollout:
    """The floor: the same replace done with the docker CLI, on `hosts` at once."""

    def __init__(self, lab: LabState, workdir: Path, name: str, hosts: int, port: int) -> None:
        self.hosts, self.port = lab.hosts[:hosts], port
        self.ctx = write_sample_app(workdir / "plain", name, f"{name} v0")
        self.repo = f"{lab.registry}/{name}"
        self.name = name
        self.containers: dict[str, str] = {}
        self.times: list[float] = []

    def _docker(self, argv: list[str]) -> str:
        res = subprocess.run(["docker", *argv], capture_output=True, text=True, check=False,
                             timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"docker {' '.join(argv)} failed: {res.stderr.strip()}")
        return res.stdout

    def round(self, rnd: int, record: bool = True) -> None:
        marker = f"{self.name} round {rnd} {uuid.uuid4().hex[:8]}\n"
        (self.ctx / "www" / "index.html").write_text(marker)
        tag = f"{self.repo}:r{rnd}"
        self._docker(["build", "-q", "-t", tag, str(self.ctx)])
        digest = re.search(r"digest: (sha256:[0-9a-f]{64})", self._docker(["push", tag]))
        if digest is None:
            raise RuntimeError("no digest in the output of docker push")
        ref = f"{self.repo}@{digest.group(1)}"

        def replace(host_index: int) -> None:
            h = self.hosts[host_index]
            on = ["-H", h.docker_url]
            self._docker([*on, "pull", "-q", ref])
            if h.name in self.containers:
                self._docker([*on, "rm", "-f", self.containers[h.name]])
            name = f"{self.name}-r{rnd}"
            self._docker([*on, "run", "-d", "--name", name, "-p", f"{self.port}:8080", ref])
            self.containers[h.name] = name
            wait_for_content(f"http://{h.address}:{self.port}/", marker)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
            list(pool.map(replace, range(len(self.hosts))))
        if record:
            self.times.append(time.perf_counter() - t0)


def _step_medians(dep: Deployment) -> str:
    per: dict[str, list[float]] = defaultdict(list)
    for run in dep.runs:
        for kind in ROLLOUT_STEPS:
            steps = [s.seconds for s in run.steps if s.kind == kind]
            if steps:
                per[kind].append(max(steps))
    return ", ".join(f"{k} {median(v):.3f}" for k, v in per.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stop-timeout", default="1s", help="the services' stop_timeout")
    ap.add_argument("--health-interval", default="100ms", help="the services' health interval")
    args = ap.parse_args()

    with own_lab("bpar-", 4, SUBNET) as (lab, workdir):
        log_file = (workdir / "runs.log").open("w")
        logs.configure("console", "info", stream=log_file)  # as the CLI logs, into a file
        try:
            remote = GitRemote(workdir)
            a = Deployment(lab, workdir / "a", remote.url, "one", 1, 18090,
                           args.stop_timeout, args.health_interval)
            b = Deployment(lab, workdir / "b", remote.url, "four", 4, 18091,
                           args.stop_timeout, args.health_interval)
            print(f"lab: {len(lab.hosts)} hosts, registry {lab.registry}; A: service on "
                  f"{a.hosts[0].name}; B: service on {len(b.hosts)} hosts, max_parallel 4; "
                  f"stop_timeout {args.stop_timeout!r} (the app stops on SIGTERM), "
                  f"health interval {args.health_interval}")
            write_sample_app(remote.work, "one", "one v0")
            write_sample_app(remote.work, "four", "four v0")
            remote.commit_push("initial")
            a.run("one v0", record=False)  # builds the images and deploys them a first time
            b.run("four v0", record=False)
            pa = PlainRollout(lab, workdir, "plainone", 1, 18092)
            pb = PlainRollout(lab, workdir, "plainfour", 4, 18093)
            pa.round(0, record=False)
            pb.round(0, record=False)
            for rnd in range(1, args.rounds + 1):
                marks = {d.name: f"{d.name} round {rnd} {uuid.uuid4().hex[:8]}\n" for d in (a, b)}
                for d in (a, b):
                    remote.write(f"{d.name}/www/index.html", marks[d.name])
                remote.commit_push(f"round {rnd}")
                for d in ((a, b) if rnd % 2 else (b, a)):
                    d.run(marks[d.name])
                for p in ((pa, pb) if rnd % 2 else (pb, pa)):
                    p.round(rnd)
                print(f"round {rnd}: rollout 1 host {a.rollouts()[-1]:.3f}s, "
                      f"4 hosts {b.rollouts()[-1]:.3f}s; plain docker CLI 1 host "
                      f"{pa.times[-1]:.3f}s, 4 hosts {pb.times[-1]:.3f}s", flush=True)
        finally:
            logs.configure("console", "info")  # back to stderr for the teardown's lines
            log_file.close()

        ma, mb = median(a.rollouts()), median(b.rollouts())
        sa, sb = median(a.spans()), median(b.spans())
        print(f"\nper round (s): 1 host {fmt(a.rollouts())}")
        print(f"               4 hosts {fmt(b.rollouts())}")
        verdict = "meets" if mb / ma <= TARGET else "MISSES"
        print(f"\nmedian rollout (last push end → run end): 1 host {ma:.3f}s, 4 hosts "
              f"{mb:.3f}s, ratio {mb / ma:.2f} (target <= {TARGET}: {verdict})")
        print(f"median pull→healthy span (steps only): 1 host {sa:.3f}s, 4 hosts {sb:.3f}s, "
              f"ratio {sb / sa:.2f}")
        pma, pmb = median(pa.times), median(pb.times)
        print(f"reference, plain docker CLI (pull, rm -f, run, first 200; hosts in parallel): "
              f"1 host {pma:.3f}s, 4 hosts {pmb:.3f}s, ratio {pmb / pma:.2f}")
        print(f"step medians, slowest host: 1 host: {_step_medians(a)}")
        print(f"                            4 hosts: {_step_medians(b)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
