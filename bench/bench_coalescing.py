"""Benchmark: a burst of 50 pushes to one repo, each followed by its signed GitHub webhook, with
`pipeline serve` running; how many builds does it make?

Run (root): .venv/bin/python bench/bench_coalescing.py [--pushes 50] [--mode push|update-ref]
Target: exactly one build, of the newest commit (PASS/FAIL).

A lab of its own (1 host, 10.88.251.0/24, taken down at the end). `pipeline serve
--no-watch-repos` runs as a subprocess; the repo has no `poll`, so webhooks are the only
trigger. The app is deployed once first (untimed). The burst: 50 commits are made in the working
clone beforehand, then pushed one by one to the bare repo, each followed at once by its webhook
(--mode push: `git push origin SHA:refs/heads/main`; --mode update-ref: the objects are pushed
to a side ref before the burst and each "push" is `git update-ref refs/heads/main SHA` in the
bare repo, about 10x faster). Builds are counted from the state DB (steps of kind "build" of the
runs after the warm-up), and events from GET /api/events.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _lab import own_lab
from bench_webhook_to_serving import (
    ServeProcess,
    WebhookBench,
    signed_push,
    wait_content_fast,
)

from pipeline.lab.sample_app import write_sample_app
from pipeline.lab.workrepo import git
from pipeline.state.store import State

SUBNET = "10.88.251.0/24"


def _builds_after(data_dir: Path, run_id: int) -> list[tuple[int, str, str]]:
    """(run id, revision, status) of every build step of the runs after `run_id`."""
    state = State.in_dir(data_dir)
    try:
        out = []
        for run in sorted(state.runs(1000), key=lambda r: r.id):
            if run.id <= run_id:
                continue
            out += [(run.id, s.revision or "?", s.status) for s in state.steps(run.id)
                    if s.kind == "build"]
        return out
    finally:
        state.engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushes", type=int, default=50)
    ap.add_argument("--mode", choices=["push", "update-ref"], default="push")
    args = ap.parse_args()

    with own_lab("bcoal-", 1, SUBNET) as (lab, workdir):
        (workdir / "hook").mkdir()
        bench = WebhookBench(lab, workdir, "1s", "100ms")
        serve: ServeProcess = bench.serve
        try:
            write_sample_app(bench.remote.work, "app", "app v0")
            bench.deploy("app v0", "initial")
            warm_run = bench.runs[-1]
            baseline_run = max(r["id"] for r in serve.get("/api/runs?limit=5"))
            first_event = max(e["id"] for e in serve.get("/api/events?limit=5"))
            print(f"warm-up deployed (run {baseline_run}, {warm_run.seconds:.2f}s); "
                  f"pipeline serve pid {serve.pid}")

            work, bare = bench.remote.work, bench.remote.bare
            shas: list[str] = []
            for i in range(1, args.pushes + 1):
                (work / "app" / "www" / "index.html").write_text(f"burst commit {i}\n")
                git("commit", "-q", "-am", f"burst {i}", cwd=work)
                shas.append(git("rev-parse", "HEAD", cwd=work))
            if args.mode == "update-ref":
                git("push", "-q", "origin", f"{shas[-1]}:refs/bench/burst", cwd=work)

            before = bench.head
            answers: list[int] = []
            t0 = time.perf_counter()
            t0_wall = time.time()
            for sha in shas:
                if args.mode == "push":
                    git("push", "-q", "origin", f"{sha}:refs/heads/main", cwd=work)
                else:
                    git("update-ref", "refs/heads/main", sha, cwd=bare)
                answers.append(signed_push(serve.client, "app", sha, before=before).status_code)
                before = sha
            burst = time.perf_counter() - t0
            if any(a != 202 for a in answers):
                raise RuntimeError(f"webhook answers: {sorted(set(answers))}")
            print(f"burst: {len(shas)} pushes + webhooks in {burst:.3f}s ({args.mode})")

            wait_content_fast(bench.url, f"burst commit {len(shas)}\n", timeout=300)
            settled = time.perf_counter() - t0
            deadline = time.monotonic() + 120
            while True:
                evs = [e for e in serve.get("/api/events?limit=500") if e["id"] > first_event]
                if len(evs) == len(shas) and all(
                        e["status"] in ("done", "failed", "superseded", "ignored") for e in evs):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("burst events not all final after 120 s")
                time.sleep(0.1)
            runs = sorted({e["run_id"] for e in evs if e["run_id"] is not None})
            run_info = {r: serve.get(f"/api/runs/{r}") for r in runs}
        finally:
            bench.close()

        builds = _builds_after(bench.data_dir, baseline_run)
        index = {sha: i for i, sha in enumerate(shas, 1)}
        by_status: dict[str, int] = {}
        for e in evs:
            by_status[e["status"]] = by_status.get(e["status"], 0) + 1
        print(f"newest commit served {settled:.3f}s after the burst began")
        print(f"events: {len(evs)} ({', '.join(f'{k} {v}' for k, v in sorted(by_status.items()))})")
        for r in runs:
            info = run_info[r]
            handled = [e for e in evs if e["run_id"] == r]
            first_recv = min(e["received_at"] for e in handled)
            print(f"  run {r}: {info['status']}, revision {str(info['revision'])[:12]} "
                  f"(commit #{index.get(info['revision'] or '', '?')}), handled "
                  f"{len(handled)} event(s) (first received {first_recv}), "
                  f"started {info['started_at']}")
        print(f"burst began at {time.strftime('%H:%M:%S', time.gmtime(t0_wall))}"
              f".{int(t0_wall % 1 * 1e6):06d} UTC")
        print(f"builds: {len(builds)}")
        for run_id, rev, status in builds:
            print(f"  run {run_id}: build of {rev[:12]} (commit #{index.get(rev, '?')} of "
                  f"{len(shas)}), {status}")
        superseded = by_status.get("superseded", 0)
        print(f"events superseded: {superseded}")
        ok = len(builds) == 1 and builds[0][1] == shas[-1]
        print(f"target: exactly one build, of the newest commit: {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
