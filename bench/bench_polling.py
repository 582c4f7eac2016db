"""Benchmark: CPU of `pipeline serve` polling 500 repos every 30 s, against the same 500
`git ls-remote` calls made by a plain `xargs -P4` loop every 30 s.

Run: .venv/bin/python bench/bench_polling.py [--repos 500] [--measure 90]
Target: pipeline serve's average CPU (user+sys, its git children included) < 10 % of one core.

500 bare repos (one commit each: one repo made, then copied) are served by `git daemon` on a
free 127.0.0.1 port. The config has 500 `[repos.rN]` with `url = "git://127.0.0.1:PORT/rN.git"`,
`poll = "30s"`, and no images or services. `pipeline serve --no-watch-repos` runs as a
subprocess: the first poll of each repo finds no mirror and queues an event (the worker's fetch
creates the mirror); once all 500 are handled and one full poll cycle (30 s + jitter) has passed,
its CPU is read from /proc/PID/stat (utime+stime+cutime+cstime: the git subprocesses it waited
for are included) over `--measure` seconds. Baseline: `xargs -P4 -n1 git ls-remote --heads`
of the same 500 URLs and ref, once per 30 s, over the same span; its CPU from getrusage of
this process's children. git daemon's own CPU (its upload-pack children) is printed for both.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_webhook_to_serving import ServeProcess, free_port

from pipeline.lab.workrepo import git

TARGET_PCT = 10.0
INTERVAL = 30.0
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int, children: bool = True) -> float:
    """CPU seconds of `pid` (user+sys), plus its waited-for children's when `children`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")": state is field 0, so utime/stime/cutime/cstime are 11..14.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def make_repos(base: Path, count: int) -> None:
    """r0.git .. r{count-1}.git under `base`, each a bare repo with one commit on main."""
    seed = base / "seed"
    seed.mkdir()
    git("init", "-q", str(seed), cwd=base)
    (seed / "README").write_text("seed\n")
    git("add", "README", cwd=seed)
    git("commit", "-q", "-m", "seed", cwd=seed)
    first = base / "r0.git"
    git("clone", "-q", "--bare", str(seed), str(first), cwd=base)
    shutil.rmtree(seed)
    for n in range(1, count):
        shutil.copytree(first, base / f"r{n}.git", symlinks=True)


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def config_text(count: int, git_port: int, http_port: int) -> str:
    lines = ['[pipeline]\ndata_dir = "data"\n', f'[server]\nlisten = "127.0.0.1:{http_port}"\n']
    for n in range(count):
        lines.append(f'[repos.r{n}]\nurl = "git://127.0.0.1:{git_port}/r{n}.git"\n'
                     f'poll = "{INTERVAL:g}s"\n')
    return "\n".join(lines)


def baseline(urls_file: Path, seconds: float) -> float:
    """CPU seconds of `xargs -P4 git ls-remote` over all URLs once per INTERVAL, for `seconds`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    cycles = 0
    while time.monotonic() - start < seconds - 0.5:
        t = time.monotonic()
        with urls_file.open() as urls:
            subprocess.run(["xargs", "-P4", "-I{}", "git", "ls-remote", "--heads", "--", "{}",
                            "refs/heads/main"], stdin=urls, stdout=subprocess.DEVNULL,
                           check=True)
        cycles += 1
        took = time.monotonic() - t
        print(f"  baseline cycle {cycles}: 500 ls-remote in {took:.2f}s", flush=True)
        time.sleep(max(0.0, min(INTERVAL - took, seconds - (time.monotonic() - start))))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repos", type=int, default=500)
    ap.add_argument("--measure", type=float, default=90.0, help="seconds measured")
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bpoll-", dir="/tmp"))
    daemon: subprocess.Popen[bytes] | None = None
    serve: ServeProcess | None = None
    try:
        repos = tmp / "repos"
        repos.mkdir()
        t = time.perf_counter()
        make_repos(repos, args.repos)
        print(f"{args.repos} bare repos made in {time.perf_counter() - t:.1f}s")
        git_port = free_port()
        daemon = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", f"--base-path={repos}", "--export-all",
             "--listen=127.0.0.1", f"--port={git_port}", str(repos)],
            stdout=subprocess.DEVNULL, stderr=(tmp / "daemon.log").open("w"))
        wait_port(git_port)
        http_port = free_port()
        config = tmp / "pipeline.toml"
        config.write_text(config_text(args.repos, git_port, http_port))
        urls = tmp / "urls.txt"
        urls.write_text("".join(f"git://127.0.0.1:{git_port}/r{n}.git\n"
                                for n in range(args.repos)))

        t = time.perf_counter()
        serve = ServeProcess(config, http_port, tmp / "serve.log")
        print(f"pipeline serve up in {time.perf_counter() - t:.1f}s (pid {serve.pid}); "
              f"git daemon on 127.0.0.1:{git_port} (pid {daemon.pid})")
        # Warm-up: every repo's first poll queues an event whose fetch creates the mirror.
        t = time.perf_counter()
        while True:
            handled = sum(1 for e in serve.get("/api/events?limit=1000")
                          if e["status"] in ("done", "failed", "superseded", "ignored"))
            depth = serve.get("/healthz")["queue_depth"]
            if handled >= args.repos and depth == 0:
                break
            if time.perf_counter() - t > 900:
                raise RuntimeError(f"warm-up: {handled} events handled after 900 s")
            time.sleep(1.0)
        failed = [e for e in serve.get("/api/events?limit=1000") if e["status"] == "failed"]
        if failed:
            raise RuntimeError(f"{len(failed)} first fetches failed: {failed[0]['note']}")
        print(f"warm-up: {args.repos} first fetches handled in {time.perf_counter() - t:.1f}s; "
              f"waiting one poll cycle ({INTERVAL:g}s + jitter)")
        time.sleep(INTERVAL * 1.1 + 1)

        cpu0, d0, w0 = proc_cpu(serve.pid), proc_cpu(daemon.pid), time.monotonic()
        events0 = len(serve.get("/api/events?limit=1000"))
        time.sleep(args.measure)
        cpu1, d1, wall = proc_cpu(serve.pid), proc_cpu(daemon.pid), time.monotonic() - w0
        events1 = len(serve.get("/api/events?limit=1000"))
        own = proc_cpu(serve.pid, children=False)
        pct = (cpu1 - cpu0) / wall * 100
        daemon_pct = (d1 - d0) / wall * 100
        print(f"pipeline serve over {wall:.1f}s: CPU {cpu1 - cpu0:.2f}s = {pct:.1f}% of one core "
              f"(git daemon side: {daemon_pct:.1f}%); new events {events1 - events0}; "
              f"serve's own (non-child) CPU since start {own:.1f}s")
        serve.stop()
        serve = None

        if not args.skip_baseline:
            print(f"baseline: xargs -P4 git ls-remote x{args.repos} every {INTERVAL:g}s "
                  f"for {args.measure:g}s")
            d0 = proc_cpu(daemon.pid)
            t = time.monotonic()
            base_cpu = baseline(urls, args.measure)
            base_wall = time.monotonic() - t
            base_pct = base_cpu / base_wall * 100
            bd_pct = (proc_cpu(daemon.pid) - d0) / base_wall * 100
            print(f"baseline over {base_wall:.1f}s: CPU {base_cpu:.2f}s = {base_pct:.1f}% of one "
                  f"core (git daemon side: {bd_pct:.1f}%)")
            print(f"ratio pipeline serve / plain loop: {pct / base_pct:.2f}")
        verdict = "PASS" if pct < TARGET_PCT else "FAIL"
        print(f"target < {TARGET_PCT:g}% of one core: {pct:.1f}% {verdict}")
    finally:
        if serve is not None:
            serve.stop()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
