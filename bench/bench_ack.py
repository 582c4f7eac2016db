"""Benchmark of webhook acknowledgement: signed GitHub pushes to `pipeline serve`'s HTTP server.

Run: .venv/bin/python bench/bench_ack.py [--senders 20] [--each 25] [--rounds 3] [--in-process]
     .venv/bin/python bench/bench_ack.py --rate 10            # paced Python senders
     .venv/bin/python bench/bench_ack.py --generator wrk      # wrk -t2 -c20 --latency, closed loop
     .venv/bin/python bench/bench_ack.py --generator wrk --rate 10   # wrk, paced per connection
The app runs under uvicorn on 127.0.0.1 (a free port) with a fresh SQLite state in a temp dir,
logging JSON lines to a file there, in a process of its own as in production (`--in-process`
runs it in the senders' process instead, sharing one GIL with them). Each sender (a thread
with its own httpx client) posts signed deliveries with distinct delivery ids; every 202 means
the event was committed first. Target: p99 < 50 ms. The baseline is `GET /healthz` (one read of
the state, no signature, no write) under the same concurrency. CPU per request is printed for
the server and the senders: on a small machine the senders can cost more than the server.

Load generators: the default Python threads run a closed loop (each sender sends its next
request when the previous one is answered), so with 20 senders the server is kept saturated and
latency includes queueing behind the other 19. `--rate R` paces each sender at R requests/s on a
fixed schedule (open loop: a late answer does not push the schedule back, and latency is counted
from the scheduled send time, so coordinated omission is not hidden). `--generator wrk` uses
/usr/bin/wrk (C, `-t2 -c20 --latency`, `--duration` s per round) with a Lua script that gives
every request its own X-GitHub-Delivery; with `--rate R` its Lua `delay()` waits 1000/R ms
between a connection's answer and its next request (closed loop with think time).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline import logs
from pipeline.config.load import parse
from pipeline.service.server import RunningServer, ServerContext, create_app, start
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

TARGET_P99_MS = 50.0
SECRET_ENV = "PIPELINE_BENCH_HOOK_SECRET"
SECRET = "bench-secret-0123456789"
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
PUSH = FIXTURES / "webhooks" / "github" / "push.json"
CONFIG = f"""
[server]
listen = "127.0.0.1:0"

[repos.app]
url = "file:///srv/app.git"
branch = "changes"
webhook_secret_env = "{SECRET_ENV}"
"""

Request = Callable[[httpx.Client], httpx.Response]
EXPECT = {"push": 202, "healthz": 200}


def _requester(kind: str) -> Request:
    """The request one sender repeats: a signed push (fresh delivery id each) or /healthz."""
    if kind == "healthz":
        return lambda client: client.get("/healthz")
    body = PUSH.read_bytes()
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()

    def push(client: httpx.Client) -> httpx.Response:
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": signature,
        }
        return client.post("/hooks/app", content=body, headers=headers)

    return push


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _load(base: str, senders: int, each: int, kind: str) -> tuple[list[float], float]:
    """Run `senders` threads doing `each` requests at once; return every latency in ms and the
    CPU seconds this process spent doing it."""
    request, expect = _requester(kind), EXPECT[kind]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(senders)
    cpu0 = time.process_time()

    def sender() -> None:
        mine: list[float] = []
        with httpx.Client(base_url=base, timeout=30) as client:
            request(client)  # connect and warm up outside the measurement
            barrier.wait()
            for _ in range(each):
                t0 = time.perf_counter()
                r = request(client)
                mine.append((time.perf_counter() - t0) * 1000)
                if r.status_code != expect:
                    with lock:
                        failures.append(f"{r.status_code} {r.text[:120]}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} unexpected answers, first: {failures[0]}")
    return latencies, time.process_time() - cpu0


def _paced(base: str, senders: int, each: int, rate: float) -> tuple[list[float], float]:
    """Like `_load` but each sender sends at `rate`/s on a fixed schedule (phases spread over
    one period); latency is measured from the scheduled time."""
    request, expect = _requester("push"), EXPECT["push"]
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(senders)
    period = 1.0 / rate
    cpu0 = time.process_time()

    def sender(n: int) -> None:
        mine: list[float] = []
        with httpx.Client(base_url=base, timeout=30) as client:
            request(client)
            barrier.wait()
            start = time.perf_counter() + period * n / senders
            for k in range(each):
                due = start + k * period
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                r = request(client)
                mine.append((time.perf_counter() - due) * 1000)
                if r.status_code != expect:
                    with lock:
                        failures.append(f"{r.status_code} {r.text[:120]}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} unexpected answers, first: {failures[0]}")
    return latencies, time.process_time() - cpu0


_WRK_LUA = """
local counter, nonce, body, sig, pause = 0, "", "", "", 0
function init(args)
  nonce = args[1]
  local f = assert(io.open(args[2], "rb")); body = f:read("*a"); f:close()
  sig = args[3]
  pause = tonumber(args[4])
end
function request()
  counter = counter + 1
  return wrk.format("POST", "/hooks/app", {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "push",
    ["X-GitHub-Delivery"] = string.format("%s-%s-%d", nonce, tostring(wrk.thread), counter),
    ["X-Hub-Signature-256"] = sig,
  }, body)
end
function delay()
  return pause
end
"""
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


@dataclass(frozen=True)
class _WrkResult:
    requests: int
    percentiles: dict[str, float]  # "50%" -> ms
    worst: float
    bad: int  # non-2xx answers and socket errors
    cpu: float  # wrk's user+sys CPU seconds


def _wrk(url: str, tmp: Path, connections: int, seconds: float, rate: float) -> _WrkResult:
    """One wrk run of signed pushes, each with a unique delivery id."""
    script = tmp / "push.lua"
    script.write_text(_WRK_LUA)
    body = PUSH.read_bytes()
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    pause = round(1000 / rate) if rate > 0 else 0
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script),
            url, "--", uuid.uuid4().hex, str(PUSH), sig, str(pause)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"wrk failed: {res.stderr.strip()}")
    out = res.stdout
    pct = {m.group(1): _wrk_ms(m.group(2))
           for m in re.finditer(r"^\s+(\d+%)\s+([0-9.]+\w+)\s*$", out, re.M)}
    worst = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    bad = sum(int(m.group(1)) for m in re.finditer(r"Non-2xx or 3xx responses: (\d+)", out))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    if errors:
        bad += sum(int(g) for g in errors.groups())
    if total is None or "50%" not in pct or "99%" not in pct or worst is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return _WrkResult(int(total.group(1)), pct, _wrk_ms(worst.group(1)), bad, cpu)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Stats:
    p50: float
    p99: float
    worst: float
    server_cpu_ms: float  # CPU the server process spent per request
    sender_cpu_ms: float  # CPU the sending process(es) spent per request

    def __str__(self) -> str:
        return (
            f"p50 {self.p50:.1f} ms  p99 {self.p99:.1f} ms  max {self.worst:.1f} ms  "
            f"(CPU per request: server {self.server_cpu_ms:.2f} ms, "
            f"senders {self.sender_cpu_ms:.2f} ms)"
        )


def _measure(
    url: str, server_pid: int, senders: int, each: int, kind: str, rate: float = 0.0
) -> _Stats:
    own = server_pid == os.getpid()
    server0 = _cpu_seconds(server_pid)
    if rate > 0 and kind == "push":
        latencies, sender_cpu = _paced(url, senders, each, rate)
    else:
        latencies, sender_cpu = _load(url, senders, each, kind)
    requests = senders * (each + 1)
    server = (_cpu_seconds(server_pid) - server0) * 1000 / requests
    return _Stats(
        p50=_percentile(latencies, 0.50),
        p99=_percentile(latencies, 0.99),
        worst=max(latencies),
        server_cpu_ms=float("nan") if own else server,
        sender_cpu_ms=float("nan") if own else sender_cpu * 1000 / requests,
    )


def _serve(data_dir: Path, ready: Callable[[str], None]) -> RunningServer:
    """Start the app on a free loopback port over a state in `data_dir`; report its URL."""
    os.environ[SECRET_ENV] = SECRET
    log_file = (data_dir / "server.log").open("a", encoding="utf-8")
    logs.configure("json", stream=log_file)
    loaded = parse(CONFIG, data_dir / "pipeline.toml")
    state = State.in_dir(data_dir / "data")
    ctx = ServerContext(
        loaded=lambda: loaded,
        state=state,
        queue=EventQueue(state),
        status=lambda: [],
        wake=lambda: None,
        started_at=time.time(),
    )
    server = start(create_app(ctx), "127.0.0.1:0")
    ready(server.url)
    return server


def _server_process(data_dir: Path) -> None:
    """The `--serve` child: serve until the parent closes stdin."""
    server = _serve(data_dir, lambda url: print(url, flush=True))
    sys.stdin.read()
    server.stop()


@contextlib.contextmanager
def _server(data_dir: Path, in_process: bool) -> Iterator[tuple[str, int]]:
    """The server's URL and pid (this process's own pid with `in_process`)."""
    if in_process:
        server = _serve(data_dir, lambda _url: None)
        try:
            yield server.url, os.getpid()
        finally:
            server.stop()
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        if not url:
            raise SystemExit("the server process did not start")
        yield url, child.pid
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _main_wrk(args: argparse.Namespace) -> None:
    """Rounds of wrk against a server in its own process; prints p50/p99 and CPU per request."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    rows: list[tuple[_WrkResult, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ack-") as tmp:
        with _server(Path(tmp), False) as (url, pid):
            for _ in range(args.rounds):
                server0 = _cpu_seconds(pid)
                result = _wrk(f"{url}/hooks/app", Path(tmp), args.senders, args.duration,
                              args.rate)
                rows.append((result, _cpu_seconds(pid) - server0))
        state = State.in_dir(Path(tmp) / "data")
        stored = EventQueue(state).depth()
        state.engine.dispose()
    answered = sum(r.requests for r, _ in rows)
    # wrk counts answered requests; the ones in flight when it stops are stored but not counted.
    assert stored >= answered, f"{stored} events stored, {answered} answered"
    pacing = f"each connection pausing {1000 / args.rate:.0f} ms" if args.rate else "closed loop"
    print(f"server in its own process; wrk -t2 -c{args.senders} -d{args.duration:g}s --latency, "
          f"{pacing}; {args.rounds} rounds; {answered} answered, {stored} events committed")
    for n, (r, server_cpu) in enumerate(rows, 1):
        if r.bad:
            raise SystemExit(f"round {n}: {r.bad} non-2xx answers or socket errors")
        rps = r.requests / args.duration
        print(f"round {n}: webhook p50 {r.percentiles['50%']:.1f} ms  "
              f"p90 {r.percentiles.get('90%', float('nan')):.1f} ms  "
              f"p99 {r.percentiles['99%']:.1f} ms  max {r.worst:.1f} ms  {rps:.0f} req/s  "
              f"(CPU per request: server {server_cpu * 1000 / r.requests:.2f} ms, "
              f"wrk {r.cpu * 1000 / r.requests:.2f} ms)")
    p50 = statistics.median(r.percentiles["50%"] for r, _ in rows)
    p99 = statistics.median(r.percentiles["99%"] for r, _ in rows)
    print(f"median of rounds: webhook ack p50 {p50:.1f} ms  p99 {p99:.1f} ms")
    verdict = "PASS" if p99 < TARGET_P99_MS else "FAIL"
    print(f"target p99 < {TARGET_P99_MS:.0f} ms: {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=20, help="sender threads / wrk connections")
    ap.add_argument("--each", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--in-process", action="store_true", help="serve from this process")
    ap.add_argument("--generator", choices=["python", "wrk"], default="python")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="requests/s per sender (0: closed loop)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk round")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _server_process(args.serve)
        return
    if args.generator == "wrk":
        _main_wrk(args)
        return

    rounds: list[tuple[_Stats, _Stats]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ack-") as tmp:
        with _server(Path(tmp), args.in_process) as (url, pid):
            for _ in range(args.rounds):
                hooks = _measure(url, pid, args.senders, args.each, "push", args.rate)
                health = _measure(url, pid, args.senders, args.each, "healthz")
                rounds.append((hooks, health))
        state = State.in_dir(Path(tmp) / "data")
        stored = EventQueue(state).depth()
        state.engine.dispose()

    # Each sender's warm-up delivery is stored too.
    expected = args.rounds * args.senders * (args.each + 1)
    assert stored == expected, f"{stored} events stored, expected {expected}"
    where = "in the senders' process" if args.in_process else "in its own process"
    pacing = f"paced at {args.rate:g}/s each, open loop" if args.rate else "closed loop"
    print(
        f"server {where}; {pacing}; {args.senders} senders x "
        f"{args.each} signed GitHub pushes of {len(PUSH.read_bytes())} bytes, "
        f"{args.rounds} rounds; {stored} events committed"
    )
    for n, (hooks, health) in enumerate(rounds, 1):
        print(f"round {n}: webhook {hooks}")
        print(f"round {n}: healthz {health}")
    p50 = statistics.median(h.p50 for h, _ in rounds)
    p99 = statistics.median(h.p99 for h, _ in rounds)
    h99 = statistics.median(b.p99 for _, b in rounds)
    print(f"median of rounds: webhook ack p50 {p50:.1f} ms  p99 {p99:.1f} ms")
    print(f"median of rounds: GET /healthz baseline p99 {h99:.1f} ms")
    print(f"ratio webhook p99 / healthz p99: {p99 / h99:.2f}")
    verdict = "PASS" if p99 < TARGET_P99_MS else "FAIL"
    print(f"target p99 < {TARGET_P99_MS:.0f} ms: {verdict}")


if __name__ == "__main__":
    main()
