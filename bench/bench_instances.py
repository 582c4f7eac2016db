"""Benchmark: several `pipeline serve` instances on one PostgreSQL database under polling and
webhook load, then `kill -9` of the instance holding a rollout.

Run (root): .venv/bin/python bench/bench_instances.py [--instances 3] [--repos 200]
            [--interval 30] [--rate 20] [--load 60] [--subnet 10.88.252.0/24]
Targets: polls per repo per interval exactly 1; events lost 0; double rollouts 0; takeover
(the dead instance's rollout put back by a live one) under 10 s after `kill -9`.

A lab of its own (1 host; taken down at the end) and a throwaway PostgreSQL cluster (initdb +
pg_ctl, tests/pg_helpers.py). `--repos` bare repos (one commit each) polled every `--interval`
seconds, plus repo `app` whose image `app` runs as service `app` on the lab host. The
`--instances` instances each have a config of their own (own data_dir and port) naming the
same `[pipeline] database`, and run `--no-watch-repos`. After every repo's first poll is
handled (mirrors made), for `--load` seconds: `--rate` signed push webhooks a second, sent
round-robin to the instances, each naming a random polled repo's head (a pass that fetches and
finds nothing to do), and every 5 s a new commit of `app` announced by a webhook (a build and
a rollout). Measured:
- polls per repo per interval: each instance's `pipeline_polls_total{repo}` (/metrics), summed
  over the instances, over whole intervals of the load window, divided by the intervals;
- events lost: deliveries answered 202 whose event is missing or not final in the database
  once the queue is empty;
- double rollouts: pairs of `app` releases whose [started, finished] overlap;
- takeover: a commit of `app` with a slow health check; the instance whose run holds the
  rollout is killed with SIGKILL mid-rollout; time until its release is no longer "running"
  (put back by a live instance), and until `app` serves the commit again from a new release.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from _lab import own_lab, wait_for_content
from bench_polling import make_repos
from bench_webhook_to_serving import SECRET_ENV, ServeProcess, free_port, signed_push

from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app
from pipeline.lab.workrepo import WorkRepo, git
from pipeline.state.store import State

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg_helpers import PASSWORD, pg_server  # noqa: E402

APP_PORT = 18090
PASSWORD_ENV = "PIPELINE_BENCH_DB_PASSWORD"
FINAL = {"done", "failed", "superseded", "ignored"}


def config(lab: LabState, n: int, port: int, database: str, repos: Path, count: int,
           interval: float, app: WorkRepo, health: str) -> str:  # fmt: skip
    """The config of instance `n`: its own data_dir and port, the shared database."""
    text = lab.toml + (
        f'\n[pipeline]\ndata_dir = "data-{n}"\ndatabase = "{database}"\n'
        f'database_password_env = "{PASSWORD_ENV}"\n\n[server]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[repos.app]\nurl = "{app.url}"\nbranch = "main"\nwebhook_secret_env = "{SECRET_ENV}"\n\n'
        '[images.app]\nrepo = "app"\ncontext = "app"\n\n'
        f'[services.app]\nimage = "app"\nhosts = ["{lab.hosts[0].name}"]\n'
        f'ports = ["{APP_PORT}:8080"]\nstop_timeout = "1s"\n\n'
        f'[services.app.health]\nhttp = "/health"\n{health}\n'
    )
    for r in range(count):
        text += (
            f'\n[repos.r{r}]\nurl = "{(repos / f"r{r}.git").as_uri()}"\nbranch = "main"\n'
            f'poll = "{interval:g}s"\nwebhook_secret_env = "{SECRET_ENV}"\n'
        )
    return text


def polls(instances: list[ServeProcess]) -> dict[str, float]:
    """repo -> poll ticks run, summed over the instances' /metrics."""
    total: dict[str, float] = {}
    for inst in instances:
        text = inst.client.get("/metrics").text
        for repo, value in re.findall(r'^pipeline_polls_total\{repo="([^"]+)"\} (\S+)$', text,
                                      re.M):  # fmt: skip
            total[repo] = total.get(repo, 0.0) + float(value)
    return total


def wait_idle(state: State, timeout: float) -> bool:
    """Wait until no event is queued or working; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [e for e in state_events(state) if e["status"] not in FINAL]:
            return True
        time.sleep(0.5)
    return False


def state_events(state: State) -> list[dict[str, object]]:
    from pipeline.state.queue import EventQueue

    return EventQueue(state).recent(100_000)


def double_rollouts(state: State) -> int:
    """Pairs of `app` releases whose [started, finished] overlap (a running one open-ended)."""
    spans = sorted(
        (r.started_at.timestamp(), r.finished_at.timestamp() if r.finished_at else float("inf"))
        for r in state.releases("app", limit=10_000)
        if r.status != "superseded"  # a commit gone past, recorded for history: no rollout
    )
    return sum(1 for (_, end), (start, _) in itertools.pairwise(spans) if start < end)


def commit_app(app: WorkRepo, text: str) -> str:
    write_sample_app(app.work, "app", text)
    return app.commit_push(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--repos", type=int, default=200)
    p.add_argument("--interval", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=20.0, help="webhooks per second")
    p.add_argument("--load", type=float, default=60.0, help="seconds of load")
    p.add_argument("--subnet", default="10.88.252.0/24")
    args = p.parse_args()
    with own_lab("pipeline-bench-inst-", 1, args.subnet) as (lab, workdir), pg_server() as pg:
        _bench(args, lab, workdir, pg.create_database(), pg)
    return 0


def _bench(args: argparse.Namespace, lab: LabState, workdir: Path, name: str, pg: Any) -> None:
    database = pg.url(name, password=False)
    state = State(pg.url(name))
    repos = workdir / "repos"
    repos.mkdir()
    make_repos(repos, args.repos)
    heads = {f"r{r}": git("rev-parse", "main", cwd=repos / f"r{r}.git") for r in range(args.repos)}
    app = WorkRepo(workdir / "app")
    commit_app(app, "app v1")
    # ~3 s of checks per rollout: one to catch in the middle. Set from the start: a config
    # edit would queue a pass over every repo on each instance, ahead of the takeover.
    slow = 'interval = "1s"\nhealthy_threshold = 3\ntimeout = "30s"'
    ports = [free_port() for _ in range(args.instances)]
    for n, port in enumerate(ports, 1):
        (workdir / f"pipeline-{n}.toml").write_text(
            config(lab, n, port, database, repos, args.repos, args.interval, app, slow)
        )
    os.environ[PASSWORD_ENV] = PASSWORD  # the instances inherit it
    instances = [
        ServeProcess(workdir / f"pipeline-{n}.toml", port, workdir / f"serve-{n}.log")
        for n, port in enumerate(ports, 1)
    ]
    try:
        print(f"{args.instances} instances up; {args.repos} repos polled every "
              f"{args.interval:g}s; waiting for the first polls to be handled")  # fmt: skip
        started = time.monotonic()
        signed_push(instances[0].client, "app", git("rev-parse", "main", cwd=app.work))
        time.sleep(args.interval * 0.5)
        if not wait_idle(state, 600):
            print("warning: the first polls were not all handled in 600 s")
        print(f"  mirrors made in {time.monotonic() - started:.0f}s")
        # -- load --------------------------------------------------------------------------
        accepted: list[str] = []
        refused = 0
        # Polls are counted between slot boundaries (epoch multiples of the interval), so a
        # window holds whole slots: each should hold exactly one poll of every repo.
        snapshots: list[dict[str, float]] = []
        boundary = (time.time() // args.interval + 1) * args.interval
        t0 = time.monotonic()
        sent, next_app, version = 0, t0, 1
        client_of = itertools.cycle(instances)
        while (now := time.monotonic()) < t0 + args.load:
            if time.time() >= boundary:
                snapshots.append(polls(instances))
                boundary += args.interval
            if now >= next_app:
                version += 1
                sha = commit_app(app, f"app v{version}")
                answer = signed_push(next(client_of).client, "app", sha)
                next_app += 5.0
            else:
                repo = f"r{random.randrange(args.repos)}"  # noqa: S311
                answer = signed_push(next(client_of).client, repo, heads[repo])
            sent += 1
            if answer.status_code == 202:
                accepted.append(str(answer.json().get("event_id")))
            else:
                refused += 1
            time.sleep(max(0.0, t0 + sent / args.rate - time.monotonic()))
        window = time.monotonic() - t0
        idle = wait_idle(state, 300)
        events = {str(e["id"]): e for e in state_events(state)}
        lost = sum(1 for i in accepted if i not in events or events[i]["status"] not in FINAL)
        intervals = len(snapshots) - 1
        if intervals < 1:
            print("polls: the load window held no whole interval (raise --load)")
            intervals, snapshots = 1, [{}, {}]
        begin, end = snapshots[0], snapshots[-1]
        ratios = sorted((end.get(r, 0) - begin.get(r, 0)) / intervals for r in heads)
        doubles = double_rollouts(state)
        print(f"load: {sent} webhooks in {window:.0f}s ({sent / window:.1f}/s), {refused} "
              f"refused; queue empty after: {idle}")  # fmt: skip
        print(f"polls per repo per interval over {intervals} whole intervals: min "
              f"{ratios[0]:.2f}, median {ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f} "
              f"(target 1)")  # fmt: skip
        print(f"events lost: {lost} of {len(accepted)} accepted (target 0)")
        print(f"double rollouts of app: {doubles} (target 0)")
        # -- takeover ------------------------------------------------------------------------
        version += 1
        sha = commit_app(app, f"app v{version}")
        signed_push(instances[0].client, "app", sha)
        holder, crashed = None, None
        deadline = time.monotonic() + 120
        while holder is None and time.monotonic() < deadline:
            for rel in state.releases("app", limit=3):
                run = state.run(rel.run_id) if rel.status == "running" and rel.run_id else None
                if run and any(h.phase != "planned" for h in state.rollouts.release_hosts(rel.id)):
                    pid = int(run.owner.rpartition(":")[2])
                    holder = next((i for i in instances if i.pid == pid), None)
                    crashed = rel.id
            time.sleep(0.05)
        if holder is None or crashed is None:
            print("takeover: no rollout caught in 120 s")
            return
        holder.proc.kill()
        killed = time.monotonic()
        holder.proc.wait()
        taken = resumed = None
        while time.monotonic() - killed < 120 and resumed is None:
            rels = state.releases("app", limit=5)
            if taken is None and any(r.id == crashed and r.status != "running" for r in rels):
                taken = time.monotonic() - killed
            if any(r.id > crashed for r in rels):
                resumed = time.monotonic() - killed
            time.sleep(0.05)
        wait_for_content(f"http://{lab.hosts[0].address}:{APP_PORT}/", f"app v{version}", 120)
        served = time.monotonic() - killed
        print(f"takeover after kill -9 of the instance holding the rollout: put back in "
              f"{taken:.2f}s, new release started {resumed:.2f}s, serving the commit "
              f"{served:.1f}s after the kill (target: put back < 10 s)")  # fmt: skip
        print(f"double rollouts of app overall: {double_rollouts(state)} (target 0)")
    finally:
        for inst in instances:
            if inst.proc.poll() is None:
                inst.stop()
            else:
                inst.client.close()
        state.engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
