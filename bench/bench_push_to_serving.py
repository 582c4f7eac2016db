"""Benchmark: a one-file change of the sample app from commit to serving, `pipeline run` against
the same steps done with the plain docker CLI, on one lab host; and the rebuild alone.

Run (root): .venv/bin/python bench/bench_push_to_serving.py [--rounds 5] [--stop-timeout 1s]
            [--monitor 5s] [--plain-build buildkit|path] [--subnet 10.88.220.0/24]
Targets: median(pipeline run CLI) / median(plain docker CLI) <= 1.3, in-process <= 1.15;
median(pipeline's build step) / median(plain `docker build` of the same change) <= 1.2.

A lab of its own (1 host, 10.88.220.0/24, taken down at the end, also on Ctrl-C). The app is
the sample app (it stops on SIGTERM) with a dependency step on a BuildKit cache mount
(`RUN --mount=type=cache`) before its pages, the same Dockerfile on both sides. Every round
changes www/index.html (the round's marker) and deploys it three ways, in rotating order so the
engines' cache state is comparable: (cli) commit + push to a bare repo, then time
`.venv/bin/pipeline run -c CONFIG` as a subprocess (Python start-up included) until the new
content is served; (in-process) the same with `Runner.run_pass()`; (plain) on a plain directory,
`docker build` (BuildKit: `DOCKER_BUILDKIT=1` with the CLI pipeline picks, unless
`--plain-build path`), `docker push`, `docker -H HOST pull REG/plain@DIGEST`, the same graceful
replace a stop-first rollout does (`docker stop -t STOP_TIMEOUT OLD`, `docker rm OLD`,
`docker run -d -p ...`), then poll until the new content answers. The commit and push are not
timed. The rebuild ratio compares pipeline's recorded build step (BuildKit, labels, two tags)
with the plain build of the same one-file change.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from _lab import (
    PIPELINE_BIN,
    GitRemote,
    PlainDocker,
    RunTimes,
    fmt,
    median,
    own_lab,
    run_times,
    wait_for_content,
)

from pipeline import logs
from pipeline.build.buildkit import choose_builder, cli_candidates
from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.runner import Runner
from pipeline.hosts import dockercli
from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.state.store import State

SUBNET = "10.88.220.0/24"
TARGET = 1.3
TARGET_IN_PROCESS = 1.15
TARGET_REBUILD = 1.2
APP_PORT = 18080
# The sample app with a dependency step on a BuildKit cache mount before its pages: a one-file
# change of www/ reuses the dependency layer, as a real app's `npm ci` / `pip install` would.
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY deps.txt /deps.txt
RUN --mount=type=cache,target=/cache ["/bin/busybox", "sh", "-c", \
    "/bin/busybox cp /deps.txt /cache/deps && /bin/busybox cp /cache/deps /deps"]
COPY www/ /www/
EXPOSE 8080
CMD ["/bin/busybox", "sh", "-c", \
     "/bin/busybox httpd -f -p 8080 -h /www & trap 'kill $!; exit 0' TERM; wait"]
"""
DEPS = "left-pad==1.3.0\n"


def _config(
    lab: LabState, repo_url: str, stop_timeout: str, interval: str, monitor: str
) -> str:
    return lab.toml + f"""
[pipeline]
data_dir = "data"

[repos.app]
url = "{repo_url}"
branch = "main"

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
monitor = "{monitor}"
"""


class Bench:
    """The three ways of deploying a change, each returning its wall time in seconds."""

    def __init__(
        self, lab: LabState, workdir: Path, stop_timeout: str, interval: str, monitor: str,
        plain_build: list[str], plain_env: dict[str, str] | None,
    ) -> None:
        self.lab, self.workdir = lab, workdir
        self.host = lab.hosts[0]
        self.remote = GitRemote(workdir)
        self.config = workdir / "pipeline.toml"
        self.config.write_text(_config(lab, self.remote.url, stop_timeout, interval, monitor))
        self.data_dir = workdir / "data"
        self.plain_docker = PlainDocker(
            lab, workdir, graceful=True, stop_timeout=max(1, round(float(stop_timeout[:-1]))),
            build=plain_build, build_env=plain_env,
            files={"Dockerfile": DOCKERFILE, "deps.txt": DEPS})
        self.cli_runs: list[RunTimes] = []
        self.inproc_runs: list[RunTimes] = []
        self.cli_outside: list[float] = []  # CLI wall time minus the run's recorded span
        # In-process runs log as the CLI does (info level), into a file instead of a pipe.
        self.log_file = (workdir / "inprocess.log").open("w")
        logs.configure("console", "info", stream=self.log_file)

    def _marker(self, how: str, rnd: int) -> str:
        return f"{how} round {rnd} {uuid.uuid4().hex[:8]}\n"

    def _app_url(self, port: int) -> str:
        return f"http://{self.host.address}:{port}/"

    # -- pipeline ---------------------------------------------------------------------------
    def initial(self) -> None:
        write_sample_app(self.remote.work, "app", "app v0")
        self.remote.write("app/Dockerfile", DOCKERFILE)
        self.remote.write("app/deps.txt", DEPS)
        self.remote.commit_push("initial")
        res = self._cli_run()
        if res.returncode != 0:
            raise RuntimeError(f"first pipeline run failed:\n{res.stdout}\n{res.stderr}")
        wait_for_content(self._app_url(APP_PORT), "app v0")

    def _cli_run(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PIPELINE_BIN), "run", "-c", str(self.config)],
                              capture_output=True, text=True, check=False, timeout=300,
                              cwd=self.workdir)

    def cli(self, rnd: int) -> float:
        marker = self._marker("cli", rnd)
        self.remote.write("app/www/index.html", marker)
        self.remote.commit_push(f"cli round {rnd}")
        t0 = time.perf_counter()
        res = self._cli_run()
        wait_for_content(self._app_url(APP_PORT), marker)
        wall = time.perf_counter() - t0
        match = re.search(r"run (\d+): ok", res.stdout)
        if res.returncode != 0 or match is None:
            raise RuntimeError(f"pipeline run failed:\n{res.stdout}\n{res.stderr}")
        times = run_times(self.data_dir, int(match.group(1)))
        self.cli_runs.append(times)
        self.cli_outside.append(wall - times.seconds)
        return wall

    def inprocess(self, rnd: int) -> float:
        marker = self._marker("in-process", rnd)
        self.remote.write("app/www/index.html", marker)
        self.remote.commit_push(f"in-process round {rnd}")
        loaded = load(self.config)
        runner = Runner(loaded, State.in_dir(loaded.data_dir), Connections(loaded))
        try:
            t0 = time.perf_counter()
            result = runner.run_pass()
            wait_for_content(self._app_url(APP_PORT), marker)
            wall = time.perf_counter() - t0
        finally:
            runner.connections.close()
            runner.state.engine.dispose()
        if not result.ok:
            raise RuntimeError(f"run_pass failed: {result.errors}")
        self.inproc_runs.append(run_times(self.data_dir, result.run_id))
        return wall

    # -- the plain docker CLI ---------------------------------------------------------------
    def plain(self, rnd: int, record: bool = True) -> float:
        return self.plain_docker.deploy(rnd, record)


def _labelled(times: RunTimes) -> list[tuple[str, float]]:
    """The run as consecutive segments: each step, and each gap between steps, in order."""
    out: list[tuple[str, float]] = []
    seen: dict[str, int] = defaultdict(int)
    cursor = 0.0
    for s in sorted(times.steps, key=lambda s: s.start):
        seen[s.kind] += 1
        label = s.kind if seen[s.kind] == 1 else f"{s.kind}#{seen[s.kind]}"
        out.append((f"  (between, before {label})", s.start - cursor))
        out.append((label, s.seconds))
        cursor = max(cursor, s.end)
    out.append(("  (after the last step: retire old, records)", times.seconds - cursor))
    return out


def _breakdown(title: str, runs: list[RunTimes], extra: list[tuple[str, list[float]]]) -> None:
    print(f"\n{title} (median seconds over rounds; steps from the state DB)")
    rows: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    for run in runs:
        for label, secs in _labelled(run):
            if label not in rows:
                order.append(label)
            rows[label].append(secs)
    for label, values in extra:
        order.append(label)
        rows[label] = values
    for label in order:
        print(f"  {label:<48} {median(rows[label]):7.3f}")
    print(f"  {'run recorded span (started_at→finished_at)':<48} "
          f"{median([r.seconds for r in runs]):7.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stop-timeout", default="1s", help="the service's stop_timeout")
    ap.add_argument("--health-interval", default="100ms", help="the service's health interval")
    ap.add_argument(
        "--monitor",
        default="5s",
        help="the health gate's monitoring window (5s is the default; 0 measures the deploy "
        "without it, as before the window existed)",
    )
    ap.add_argument(
        "--plain-build",
        choices=("buildkit", "path"),
        default="buildkit",
        help="the floor's build: BuildKit with the CLI pipeline picks (default), or `docker "
        "build` of the CLI first on PATH (here: Docker 28 without buildx, the legacy builder)",
    )
    ap.add_argument("--subnet", default=SUBNET, help="the lab's subnet (another lab may hold it)")
    args = ap.parse_args()
    if not args.stop_timeout.endswith("s"):
        raise SystemExit("--stop-timeout: give seconds, e.g. 1s")
    choice = choose_builder(
        "auto", [dockercli.probe(p) for p in cli_candidates(None, dockercli.which("docker"))]
    )
    if args.plain_build == "buildkit" and choice.cli and choice.kind == "buildkit":
        plain_build, plain_env = [choice.cli, "build"], {"DOCKER_BUILDKIT": "1"}
    elif args.plain_build == "buildkit" and choice.cli:
        plain_build, plain_env = [choice.cli, "buildx", "build", "--load"], None
    else:
        plain_build, plain_env = ["docker", "build"], None
    print(f"pipeline builds with: {choice.notice}; plain build: "
          f"{'DOCKER_BUILDKIT=1 ' if plain_env else ''}{' '.join(plain_build)}")

    with own_lab("bpts-", 1, args.subnet) as (lab, workdir):
        bench = Bench(lab, workdir, args.stop_timeout, args.health_interval, args.monitor,
                      plain_build, plain_env)
        print(f"lab: host {lab.hosts[0].docker_url}, registry {lab.registry}; "
              f"service stop_timeout = {args.stop_timeout!r} (stop-first; the app stops on "
              f"SIGTERM), health interval "
              f"{args.health_interval}, monitor {args.monitor}; plain path replaces with "
              "`docker stop` + `docker rm` + `docker run`")
        # Warm-up, not measured: both paths deploy once, so every round replaces a container.
        bench.initial()
        bench.plain(0, record=False)
        ways: list[tuple[str, Callable[[int], float]]] = [
            ("cli", bench.cli), ("in-process", bench.inprocess), ("plain", bench.plain)]
        results: dict[str, list[float]] = defaultdict(list)
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(ways)
            order = ways[shift:] + ways[:shift]
            for name, fn in order:
                results[name].append(fn(rnd))
            print(f"round {rnd}: " + ", ".join(
                f"{n} {results[n][-1]:.3f}s" for n, _ in order), flush=True)

        plain, cli, inproc = (median(results[k]) for k in ("plain", "cli", "in-process"))
        print(f"\nper round (s): pipeline run (CLI) {fmt(results['cli'])}")
        print(f"               run_pass (in-process) {fmt(results['in-process'])}")
        print(f"               plain docker CLI {fmt(results['plain'])}")
        print(f"\nmedian plain docker CLI (build, push, pull, stop, rm, run, first 200): "
              f"{plain:.3f}s")
        for name, secs, target in (("pipeline run (CLI subprocess)", cli, TARGET),
                                   ("Runner.run_pass() (in-process)", inproc, TARGET_IN_PROCESS)):
            ratio = secs / plain
            verdict = "meets" if ratio <= target else "MISSES"
            print(f"median {name}: {secs:.3f}s  ratio {ratio:.2f}  "
                  f"(target <= {target}: {verdict})")
        builds = [s.seconds for r in bench.cli_runs + bench.inproc_runs for s in r.steps
                  if s.kind == "build"]
        plain_build_s = median(bench.plain_docker.steps["build"])
        ratio = median(builds) / plain_build_s
        verdict = "meets" if ratio <= TARGET_REBUILD else "MISSES"
        print(f"rebuild after a one-file change (cache-mounted dependency step): pipeline's "
              f"build step {median(builds):.3f}s vs plain build {plain_build_s:.3f}s  ratio "
              f"{ratio:.2f}  (target <= {TARGET_REBUILD}: {verdict})")
        _breakdown("pipeline run (CLI)", bench.cli_runs,
                   [("CLI wall minus recorded run (start-up, config, exit, poll)",
                     bench.cli_outside)])
        _breakdown("Runner.run_pass() (in-process)", bench.inproc_runs, [])
        print("\nplain docker CLI steps (median seconds)")
        for step, values in bench.plain_docker.steps.items():
            print(f"  {step:<48} {median(values):7.3f}")
        logs.configure("console", "info")  # back to stderr for the teardown's lines
        bench.log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
