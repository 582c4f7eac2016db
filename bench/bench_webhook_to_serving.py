"""Benchmark: a signed GitHub push webhook to a running `pipeline serve` until the sample app
serves the new content on a lab host, against the plain docker CLI floor, alternating.

Run (root): .venv/bin/python bench/bench_webhook_to_serving.py [--rounds 5]
Target: median(webhook -> new content) / median(plain docker CLI) <= 1.3.

A lab of its own (1 host, 10.88.250.0/24, taken down at the end, also on Ctrl-C). `pipeline
serve --no-watch-repos` runs as a real subprocess on a free 127.0.0.1 port; the repo has no
`poll`, so the webhook is the only trigger. Each round changes www/index.html, commits and pushes
to the bare repo (untimed), then times: POST /hooks/app (X-GitHub-Event: push, HMAC-SHA256 of
the body with the repo's secret) until the new content answers. The plain path, in the same
round (order alternates): docker build, push, pull by digest on the host, rm -f the old
container, run, first 200 with the new content. The run's steps (state DB, as GET
/api/runs/{id} shows them) give the breakdown.

`ServeProcess` and `signed_push` are shared with bench_coalescing.py and bench_polling.py.
"""

from __future__ import annotations

import argparse
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
from collections import defaultdict
from pathlib import Path
from typing import Any

import docker
import httpx
from _lab import (
    LOCAL_DOCKER,
    PIPELINE_BIN,
    PlainDocker,
    RunTimes,
    fmt,
    median,
    own_lab,
    run_times,
    wait_for_content,
)

from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.lab.workrepo import WorkRepo

SUBNET = "10.88.250.0/24"
TARGET = 1.3
APP_PORT = 18080
SECRET_ENV = "PIPELINE_BENCH_HOOK_SECRET"
SECRET = "bench-secret-" + uuid.uuid4().hex
ZERO = "0" * 40


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (closed again before it is returned)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def signed_push(
    client: httpx.Client, repo: str, sha: str, before: str = ZERO, ref: str = "refs/heads/main"
) -> httpx.Response:
    """POST a GitHub push delivery for `sha`, signed with the bench secret, to /hooks/`repo`."""
    body = json.dumps({
        "ref": ref, "before": before, "after": sha, "created": before == ZERO,
        "deleted": False, "forced": False,
        "repository": {"full_name": f"bench/{repo}", "name": repo},
        "pusher": {"name": "bench"}, "commits": [], "head_commit": {"id": sha},
    }).encode()
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "push",
               "X-GitHub-Delivery": str(uuid.uuid4()), "X-Hub-Signature-256": sig}
    return client.post(f"/hooks/{repo}", content=body, headers=headers)


class ServeProcess:
    """`pipeline serve -c CONFIG --no-watch-repos` as a subprocess, logging to a file; `stop`
    sends SIGTERM and waits (SIGKILL after 30 s)."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._log = log_path.open("w")
        env = {**os.environ, SECRET_ENV: SECRET}
        self.proc = subprocess.Popen(
            [str(PIPELINE_BIN), "serve", "-c", str(config), "--no-watch-repos"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=config.parent)
        self.client = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pipeline serve exited {self.proc.returncode}; see {log_path}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pipeline serve did not answer in 60 s; see {log_path}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str) -> Any:
        r = self.client.get(path)
        r.raise_for_status()
        return r.json()

    def wait_event_final(self, event_id: int, timeout: float = 120.0) -> dict[str, Any]:
        """Poll /api/events until event `event_id` has a final status; return it."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.get("/api/events?limit=200"):
                if ev["id"] == event_id and ev["status"] in ("done", "failed", "superseded",
                                                             "ignored"):
                    return dict(ev)
            if time.monotonic() > deadline:
                raise RuntimeError(f"event {event_id} not final after {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _config(lab: LabState, repo_url: str, port: int, stop_timeout: str, interval: str) -> str:
    return lab.toml + f"""
[pipeline]
data_dir = "data"

[server]
listen = "127.0.0.1:{port}"

[repos.app]
url = "{repo_url}"
branch = "main"
webhook_secret_env = "{SECRET_ENV}"

[images.app]
repo = "app"
context = "app"

[services.app]
image = "app"
hosts = ["{lab.hosts[0].name}"]
ports = ["{APP_PORT}:8080"]
stop_timeout = "{stop_timeout}"

[services.app.health]
http = "/health"
interval = "{interval}"
timeout = "30s"
"""


wait_content_fast = wait_for_content  # one poller for every benchmark (bench/_lab.py)


class WebhookBench:
    """Webhook path through a running `pipeline serve`; records the timeline of each round."""

    def __init__(self, lab: LabState, workdir: Path, stop_timeout: str, interval: str) -> None:
        self.lab, self.workdir = lab, workdir
        self.remote = WorkRepo(workdir / "hook")
        port = free_port()
        self.config = workdir / "hook" / "pipeline.toml"
        self.config.write_text(_config(lab, self.remote.url, port, stop_timeout, interval))
        self.data_dir = workdir / "hook" / "data"
        self.url = f"http://{lab.hosts[0].address}:{APP_PORT}/"
        self.serve = ServeProcess(self.config, port, workdir / "serve.log")
        self.runs: list[RunTimes] = []
        self.segments: dict[str, list[float]] = defaultdict(list)
        self.head = ZERO

    def deploy(self, marker: str, message: str) -> float:
        self.remote.write("app/www/index.html", marker)
        sha = self.remote.commit_push(message)
        t0_wall, t0 = time.time(), time.perf_counter()
        r = signed_push(self.serve.client, "app", sha, before=self.head)
        t_ack = time.perf_counter()
        if r.status_code != 202:
            raise RuntimeError(f"webhook answered {r.status_code}: {r.text}")
        wait_content_fast(self.url, marker)
        wall = time.perf_counter() - t0
        self.head = sha
        ev = self.serve.wait_event_final(int(r.json()["event_id"]))
        if ev["status"] != "done" or ev["run_id"] is None:
            raise RuntimeError(f"event ended {ev['status']}: {ev.get('note')}")
        times = run_times(self.data_dir, int(ev["run_id"]))
        self.runs.append(times)
        seg = self.segments
        seg["webhook POST answered (202, event committed)"].append(t_ack - t0)
        seg["webhook sent -> run started (worker pick-up)"].append(times.started - t0_wall)
        seg["run recorded span"].append(times.seconds)
        seg["run finished -> new content seen by the poller"].append(
            t0_wall + wall - times.finished)
        return wall

    def close(self) -> None:
        self.serve.stop()


def _breakdown(runs: list[RunTimes]) -> None:
    """Median of each step and of each gap between steps, in order, over the runs."""
    rows: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        seen: dict[str, int] = defaultdict(int)
        cursor = 0.0
        for s in sorted(run.steps, key=lambda s: s.start):
            seen[s.kind] += 1
            label = s.kind if seen[s.kind] == 1 else f"{s.kind}#{seen[s.kind]}"
            rows[f"  (gap before {label})"].append(s.start - cursor)
            rows[label].append(s.seconds)
            cursor = max(cursor, s.end)
        rows["  (after the last step: retire old, records)"].append(run.seconds - cursor)
    for label, values in rows.items():
        print(f"  {label:<48} {median(values):7.3f}")


def remove_untagged(registry: str) -> int:
    """Remove local images left untagged whose digests point at `registry` (a tag replaced by
    the next round's build leaves the old image behind, named only by its repo digest)."""
    client = docker.DockerClient(base_url=LOCAL_DOCKER, timeout=60)
    count = 0
    try:
        for image in client.images.list():
            digests = image.attrs.get("RepoDigests") or []
            if not image.tags and any(d.startswith(f"{registry}/") for d in digests):
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(image.id, force=True)
                    count += 1
    finally:
        client.close()
    return count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stop-timeout", default="1s", help="the service's stop_timeout")
    ap.add_argument("--health-interval", default="100ms", help="the service's health interval")
    args = ap.parse_args()

    registry = ""
    try:
        with own_lab("bwts-", 1, SUBNET) as (lab, workdir):
            registry = lab.registry
            _bench(args, lab, workdir)
    finally:
        if registry:
            print(f"cleanup: {remove_untagged(registry)} untagged image(s) of {registry} removed")
    return 0


def _bench(args: argparse.Namespace, lab: LabState, workdir: Path) -> None:
    """The rounds and the report, in a lab that `main` takes down."""
    (workdir / "hook").mkdir()
    plain = PlainDocker(lab, workdir)
    hook = WebhookBench(lab, workdir, args.stop_timeout, args.health_interval)
    try:
        print(f"lab: host {lab.hosts[0].docker_url}, registry {lab.registry}; "
              f"pipeline serve at {hook.serve.url} (pid {hook.serve.pid}); "
              f"stop_timeout {args.stop_timeout!r}, health interval {args.health_interval}")
        # Warm-up, not measured: both paths deploy once, so every round replaces a container.
        write_sample_app(hook.remote.work, "app", "app v0")
        hook.deploy("app v0", "initial")
        hook.runs.clear()
        hook.segments.clear()
        plain.deploy(0, record=False)
        results: dict[str, list[float]] = defaultdict(list)
        for rnd in range(1, args.rounds + 1):
            order = ["webhook", "plain"] if rnd % 2 else ["plain", "webhook"]
            for how in order:
                if how == "plain":
                    results[how].append(plain.deploy(rnd))
                else:
                    marker = f"webhook round {rnd} {uuid.uuid4().hex[:8]}\n"
                    results[how].append(hook.deploy(marker, f"round {rnd}"))
            print(f"round {rnd}: " + ", ".join(f"{h} {results[h][-1]:.3f}s" for h in order),
                  flush=True)
    finally:
        hook.close()

    p, w = median(results["plain"]), median(results["webhook"])
    ratio = w / p
    print(f"\nper round (s): webhook -> serving {fmt(results['webhook'])}")
    print(f"               plain docker CLI  {fmt(results['plain'])}")
    print(f"\nmedian plain docker CLI (build, push, pull, rm -f, run, first 200): {p:.3f}s")
    print(f"median webhook -> new content served:                         {w:.3f}s")
    verdict = "meets" if ratio <= TARGET else "MISSES"
    print(f"ratio {ratio:.2f}  (target <= {TARGET}: {verdict})")
    print("\ntimeline of the webhook path (median seconds)")
    for label, values in hook.segments.items():
        print(f"  {label:<48} {median(values):7.3f}")
    print("\npipeline serve's run (median seconds; steps from the state DB)")
    _breakdown(hook.runs)
    print("\nplain docker CLI steps (median seconds)")
    for step, values in plain.steps.items():
        print(f"  {step:<48} {median(values):7.3f}")


if __name__ == "__main__":
    sys.exit(main())
