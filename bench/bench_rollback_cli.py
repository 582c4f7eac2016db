"""Benchmark: `pipeline rollback web` from the command line, start-up included, with the
registry unreachable: how long until every host's proxy serves the previous release.

Run (root): .venv/bin/python bench/bench_rollback_cli.py [--rollbacks 10]
            [--subnet 10.88.226.0/24] [--before PYTHON | --serve | --ssh]
Target: the previous revision served within 1 s per host ("per host" = time from the spawn of
the `pipeline rollback web` process until every host's proxy answers with the previous
release, divided by the number of hosts), as a new user would measure it.

A lab of its own (2 tcp:// hosts, 10.88.226.0/24 unless --subnet, taken down at the end, also
on Ctrl-C) with the lab's Caddy image; the repo, config and proxied service `web` of
bench_zero_downtime.py (sample app whose page says its version, `http = "/health"`, both
hosts). Two releases are deployed through the CLI (`pipeline deploy web --revision SHA
--json`), then the registry is made unreachable from both hosts (an iptables REJECT in each
host's namespace) and `--rollbacks` rounds run. Each round spawns, interleaved so that a
change of the machine's load hits all alike: `python -c pass` and `pipeline --help` (the
start-up floor every command pays), and `pipeline rollback web --to rK` alternating between
the two releases (each a switch back to the retained, paused container). While a rollback
runs, one thread per host (in this process: pipeline is a process of its own, so it never holds
their GIL) asks that host's proxy for `/` with the service's Host header every 20 ms, a new
connection each, and notes when the answer is the release rolled back to. Printed per rollback:
the time from the spawn to served on each host and on every host, and the command's exit.
From the run's recorded steps: start-up (spawn to the first step), the rollout as in-process
code does it (first step to the last `route` step, as bench_zero_downtime.py reads it), and
from the last switch to served. Then medians, p90 and ratios to the baselines.

--before PYTHON runs the same rollbacks (and `pipeline --help`), in the same rounds, with
another installation's `pipeline` (the script beside PYTHON), e.g. a venv of an older commit:
before and after measured under the same load, on the same lab and state database.

--serve starts `pipeline serve -c CONFIG --no-watch-repos` (`[server] listen` on a free
127.0.0.1 port, added to the bench's config) once the two releases are deployed, waits for its
/healthz, and in each round times both `pipeline rollback web --to rK`, which the command hands
to that serve (`DATA_DIR/serve.json`; its stderr must say so), and the same with `--no-serve`
(in-process), alternating which goes first; then prints the ratio handed / in-process, on every
host and per host. serve is stopped at the end (also on failure and Ctrl-C) and its
`serve.json` must be gone; error and warning lines of its log and of the commands' stderr are
printed. --ssh does the same (it implies --serve) on a lab of ONE host reached as
`ssh://root@ADDR:2222` (sshd in the host's namespace and an `ssh` wrapper first on PATH that
logs every ssh process started, by deploys, serve and rollbacks alike: `pipeline.lab.ssh`, as
tests/deploy/test_ssh_host.py uses it): it also prints the ssh processes started during each
rollback (spawn to exit of the command; a warm serve should start none).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _lab import PIPELINE_BIN, own_lab, run_times
from bench_webhook_to_serving import ServeProcess, free_port
from bench_zero_downtime import SERVICE, Project, _block_registry, get_page

from pipeline.lab.manage import LabState
from pipeline.lab.ssh import SshHost, ssh_host
from pipeline.state.store import State

SUBNET = "10.88.226.0/24"
TARGET_PER_HOST = 1.0
POLL_EVERY = 0.02  # s between one host's requests: 10 ms cost the rollback ~1 s on 2 busy cores
PAGES = ("web v1", "web v2")
HANDED = "rolling back in pipeline serve"  # the command's stderr when serve took it
NOT_TAKEN = "rolling back here"  # ... when serve did not, and it rolled back itself
NOISE = ("error", "warning", "traceback", "exception")  # stderr/log lines worth showing


class Watch:
    """One thread per host asking its proxy for `/` (Host: the service's) every POLL_EVERY s,
    a new connection each; `served[address]` is the perf_counter time of the first answer
    whose body is `expect`. Start it, wait for `armed` (every host answered once, with another
    body), then act; `wait()` joins the threads (raises RuntimeError after `timeout` s)."""

    def __init__(self, addresses: list[str], expect: str, timeout: float = 30.0) -> None:
        self.expect, self.timeout = expect, timeout
        self.served: dict[str, float] = {}
        self.last: dict[str, str] = {}
        self.early: set[str] = set()  # hosts serving `expect` before the rollback
        self._asked: dict[str, threading.Event] = {a: threading.Event() for a in addresses}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(a,), daemon=True)
                         for a in addresses]  # fmt: skip

    def _poll(self, address: str) -> None:
        deadline = time.perf_counter() + self.timeout
        while not self._stop.is_set() and time.perf_counter() < deadline:
            try:
                status, body = get_page(address, timeout=0.2)
                at = time.perf_counter()
                self.last[address] = f"{status} {body[:40]!r}"
                if status == 200 and body == self.expect:
                    if not self._asked[address].is_set():
                        self.early.add(address)
                        break
                    self.served[address] = at
                    return
            except (OSError, http.client.HTTPException) as exc:
                self.last[address] = type(exc).__name__
            self._asked[address].set()
            time.sleep(POLL_EVERY)
        self._asked[address].set()

    def __enter__(self) -> Watch:
        for t in self._threads:
            t.start()
        for address, asked in self._asked.items():
            if not asked.wait(5.0) or address in self.early:
                self.__exit__()
                raise RuntimeError(f"{address}: served {self.expect!r} before the rollback")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def wait(self) -> dict[str, float]:
        for t in self._threads:
            t.join()
        missing = {a: self.last.get(a, "-") for a in self._asked if a not in self.served}
        if missing:
            raise RuntimeError(f"not served {self.expect!r}: {missing}")
        return self.served


@dataclass(frozen=True)
class Variant:
    """One way of running the rollback command: the `pipeline` script, arguments added after
    the command's own, and whether it must be handed to a running serve (True), must not be
    (False), or is not checked (None: no serve runs)."""

    label: str
    pipeline: Path
    extra: tuple[str, ...] = ()
    handed: bool | None = None


@dataclass
class Rollbacks:
    """The samples of one variant's rollbacks, seconds from the spawn of the process."""

    hosts: dict[str, list[float]]
    every: list[float] = field(default_factory=list)
    exit: list[float] = field(default_factory=list)
    startup: list[float] = field(default_factory=list)  # spawn -> first recorded step
    rollout: list[float] = field(default_factory=list)  # first step -> last `route` step
    after_route: list[float] = field(default_factory=list)  # last `route` -> every host served
    cpu: list[float] = field(default_factory=list)  # user + system of the process (and children)
    ssh: list[int] = field(default_factory=list)  # ssh processes started, spawn -> exit (--ssh)
    noise: Counter[str] = field(default_factory=Counter)  # stderr lines naming an error


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def _time(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of `argv`."""
    cpu, t0 = _cpu(), time.perf_counter()
    _run(argv, cwd)
    return time.perf_counter() - t0, _cpu() - cpu


def _deploy(pipeline: Path, config: Path, sha: str, cwd: Path) -> int:
    """Deploy `sha` through the CLI; return the release id it made."""
    out = _run([str(pipeline), "deploy", SERVICE, "--revision", sha, "--json", "-c", str(config)],
               cwd)  # fmt: skip
    releases = [r for r in json.loads(out)["releases"] if r["status"] == "succeeded"]
    if not releases:
        raise SystemExit(f"deploy of {sha[:12]} made no succeeded release:\n{out}")
    return int(releases[0]["id"])


def _noise(text: str) -> list[str]:
    """The lines of `text` that name an error, a warning or a traceback."""
    return [line.strip() for line in text.splitlines() if any(n in line.lower() for n in NOISE)]


def _rollback(
    variant: Variant,
    project: Project,
    lab: LabState,
    to: int,
    expect: str,
    into: Rollbacks,
    ssh: SshHost | None = None,
) -> str:
    """Spawn `pipeline rollback web --to rTO` as `variant` says, record its times into `into`;
    return a line. Raises SystemExit when it fails, or was (not) handed to serve against
    `variant.handed`."""
    argv = [str(variant.pipeline), "rollback", SERVICE, "--to", f"r{to}",
            "-c", str(project.config), *variant.extra]  # fmt: skip
    addresses = [h.address for h in lab.hosts]
    with Watch(addresses, expect) as watch:
        ssh_before = len(ssh.starts()) if ssh else 0
        cpu, wall0, t0 = _cpu(), time.time(), time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              cwd=project.config.parent, timeout=120)  # fmt: skip
        exited, cpu = time.perf_counter() - t0, _cpu() - cpu
        if ssh:
            into.ssh.append(len(ssh.starts()) - ssh_before)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        handed = HANDED in done.stderr and NOT_TAKEN not in done.stderr
        if variant.handed is not None and handed != variant.handed:
            raise SystemExit(f"{' '.join(argv)} was {'not ' if variant.handed else ''}handed to "
                             f"pipeline serve:\n{done.stderr[-3000:]}")  # fmt: skip
        into.noise.update(_noise(done.stderr))
        served = {a: at - t0 for a, at in watch.wait().items()}
    data_dir = project.config.parent / "data"
    state = State.in_dir(data_dir)
    try:
        run_id = state.runs(limit=1)[0].id
    finally:
        state.engine.dispose()
    times = run_times(data_dir, run_id)
    moved = [s for s in times.steps if s.host and s.kind != "retire"]
    first = min(s.start for s in moved)
    last_route = times.last_end(["route"])
    every = max(served.values())
    for h in lab.hosts:
        into.hosts[h.name].append(served[h.address])
    into.every.append(every)
    into.exit.append(exited)
    into.cpu.append(cpu)
    startup = times.started + first - wall0
    into.startup.append(startup)
    into.rollout.append(last_route - first)
    into.after_route.append(every - (startup + last_route - first))
    per_host = " ".join(f"{h.name} {served[h.address]:.3f}s" for h in lab.hosts)
    started = f", ssh started {into.ssh[-1]}" if ssh else ""
    return (f"served {per_host}, every host {every:.3f}s, exit {exited:.3f}s (start-up "
            f"{startup:.3f}s, rollout {last_route - first:.3f}s, CPU {cpu:.3f}s"
            f"{started})")  # fmt: skip


def _p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def _row(name: str, values: list[float], base: float, cpus: list[float] | None = None) -> str:
    median = statistics.median(values)
    cpu = f"{statistics.median(cpus):>7.3f}s" if cpus else ""
    return f"{name:<50} {median:>8.3f}s {_p90(values):>8.3f}s {median / base:>9.1f}x {cpu}"


@contextlib.contextmanager
def _ssh_on_path(lab: LabState, workdir: Path) -> Iterator[SshHost]:
    """sshd on the lab's first host (`pipeline.lab.ssh`), its `ssh` wrapper first on the PATH
    of this process and so of every pipeline process it spawns, until the end."""
    with ssh_host(lab, workdir / "ssh") as host:
        old = os.environ["PATH"]
        os.environ["PATH"] = f"{host.bin_dir}:{old}"
        try:
            yield host
        finally:
            os.environ["PATH"] = old


def _hand_over(project: Project, lab: LabState, ssh: SshHost | None) -> int:
    """Point the bench's config at the ssh:// host (`ssh`) and give it `[server] listen` on a
    free loopback port, which it returns."""
    text = project.config.read_text()
    if ssh is not None:
        tcp = f'docker = "{lab.hosts[0].docker_url}"'
        if tcp not in text:
            raise SystemExit(f"no {tcp} in {project.config}")
        text = text.replace(tcp, f'docker = "{ssh.docker_url}"')
    port = free_port()
    project.config.write_text(f'{text}\n[server]\nlisten = "127.0.0.1:{port}"\n')
    return port


def _stop_serve(serve: ServeProcess, data_dir: Path, log: Path, problems: list[str]) -> None:
    """Stop `serve`; print its log's error and warning lines; add to `problems` if its
    serve.json outlived it."""
    serve.stop()
    if (data_dir / "serve.json").exists():
        problems.append(f"{data_dir / 'serve.json'} left behind by the stopped serve")
    noisy = _noise(log.read_text(errors="replace"))
    print(f"pipeline serve stopped (exit {serve.proc.returncode}); serve.json "
          f"{'LEFT BEHIND' if problems else 'removed'}; {len(noisy)} error/warning line(s) in "
          f"its log{':' if noisy else ''}", flush=True)  # fmt: skip
    for line in noisy[:20]:
        print(f"  serve log: {line[:300]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollbacks", type=int, default=10, help="rounds (rollbacks of each)")
    parser.add_argument("--subnet", default=SUBNET)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--before", help="another installation's python, run alongside")
    mode.add_argument(
        "--serve",
        action="store_true",
        help="a running pipeline serve: handed rollbacks against --no-serve ones",
    )
    mode.add_argument(
        "--ssh",
        action="store_true",
        help="as --serve, on one ssh:// host; counts ssh processes per rollback",
    )
    args = parser.parse_args()
    handing = args.serve or args.ssh
    installs = {"": PIPELINE_BIN}
    if args.before:
        installs = {"before: ": Path(args.before).with_name("pipeline"), **installs}
    variants = [Variant(label, pipeline) for label, pipeline in installs.items()]
    if handing:
        variants = [Variant("handed: ", PIPELINE_BIN, (), True),
                    Variant("in-process: ", PIPELINE_BIN, ("--no-serve",), False)]  # fmt: skip
    judged = variants[0].label if handing else ""  # the one the target applies to
    floor_argv = {"python -c pass": [sys.executable, "-c", "pass"]}
    floor_argv |= {f"{label}pipeline --help": [str(p), "--help"] for label, p in installs.items()}
    floors: dict[str, list[float]] = {name: [] for name in floor_argv}
    floor_cpus: dict[str, list[float]] = {name: [] for name in floor_argv}
    problems: list[str] = []
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the start {load_before}", flush=True)
    with (own_lab("pipeline-rbcli-", 1 if args.ssh else 2, args.subnet) as (lab, workdir),
          contextlib.ExitStack() as stack):  # fmt: skip
        if lab.proxy_image is None:
            raise SystemExit("the lab has no proxy image: apt-get install caddy")
        project = Project(lab, workdir)
        ssh = stack.enter_context(_ssh_on_path(lab, workdir)) if args.ssh else None
        port = _hand_over(project, lab, ssh) if handing else 0
        release = {}
        for page in PAGES:
            sha = project.commit(page)
            release[page] = _deploy(PIPELINE_BIN, project.config, sha, workdir)
            print(f"deployed {page!r} through the CLI: release r{release[page]}", flush=True)
        if handing:
            log = workdir / "serve.log"
            serve = ServeProcess(project.config, port, log)
            stack.callback(_stop_serve, serve, project.config.parent / "data", log, problems)
            print(f"pipeline serve pid {serve.pid} answers on {serve.url}", flush=True)
        results = {v.label: Rollbacks({h.name: [] for h in lab.hosts}) for v in variants}
        for argv in floor_argv.values():
            _time(argv, workdir)  # warm-up: page cache, .pyc files
        _block_registry(lab, True)
        try:
            serving = PAGES[1]
            for rnd in range(1, args.rollbacks + 1):
                for name, argv in floor_argv.items():
                    wall, cpu = _time(argv, workdir)
                    floors[name].append(wall)
                    floor_cpus[name].append(cpu)
                # Alternate which variant goes first, so neither always follows the other.
                for variant in variants if rnd % 2 else variants[::-1]:
                    page = PAGES[0] if serving == PAGES[1] else PAGES[1]
                    line = _rollback(variant, project, lab, release[page], page,
                                     results[variant.label], ssh)  # fmt: skip
                    serving = page
                    print(f"round {rnd}: {variant.label}rollback to r{release[page]} ({page!r}): "
                          f"{line}", flush=True)  # fmt: skip
        finally:
            _block_registry(lab, False)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        hosts = len(lab.hosts)
        names = [h.name for h in lab.hosts]
        kind = "ssh://" if args.ssh else "tcp://"
    base = statistics.median(floors["python -c pass"])
    print()
    print(f"{args.rollbacks} rounds, {hosts} {kind} host(s), registry unreachable; "
          f"{os.cpu_count()} CPUs; load average at the start {load_before}, "
          f"at the end {load}")  # fmt: skip
    print(f"{'measure':<50} {'median':>9} {'p90':>9} {'x python':>10} {'CPU':>8}")
    for name, values in floors.items():
        print(_row(name, values, base, floor_cpus[name]))
    failed = bool(problems)
    for label, res in results.items():
        for name in names:
            print(_row(f"{label}rollback: served on {name}", res.hosts[name], base))
        print(_row(f"{label}rollback: served on every host", res.every, base))
        print(_row(f"{label}rollback: command exited", res.exit, base, res.cpu))
        print(_row(f"{label}  spawn -> first step (start-up)", res.startup, base))
        print(_row(f"{label}  first step -> last route (rollout)", res.rollout, base))
        print(_row(f"{label}  last route -> every host served", res.after_route, base))
    print()
    for label, res in results.items():
        every, rollout = statistics.median(res.every), statistics.median(res.rollout)
        helps = statistics.median(floors.get(f"{label}pipeline --help", floors["pipeline --help"]))
        per_host = every / hosts
        verdict = "met" if per_host <= TARGET_PER_HOST else "MISSED"
        failed = failed or (label == judged and per_host > TARGET_PER_HOST)
        print(f"{label}per host: {every:.3f}s / {hosts} = {per_host:.3f}s (p90 "
              f"{_p90(res.every) / hosts:.3f}s), target <= {TARGET_PER_HOST:.1f} s: {verdict}; "
              f"every host served = {every / rollout:.1f}x the in-process rollout "
              f"({rollout:.3f}s), {every / helps:.1f}x `pipeline --help` ({helps:.3f}s); "
              f"start-up is {statistics.median(res.startup) / every:.0%} of it")  # fmt: skip
        if res.ssh:
            print(f"{label}ssh processes started per rollback: {res.ssh} (median "
                  f"{statistics.median(res.ssh):g}, total {sum(res.ssh)})")  # fmt: skip
        for line, count in res.noise.most_common(10):
            print(f"{label}stderr, {count}x: {line[:300]}")
    if args.before:
        before, after = results["before: "], results[""]
        ratio = statistics.median(after.every) / statistics.median(before.every)
        startup = statistics.median(after.startup) / statistics.median(before.startup)
        print(f"after / before: every host served {ratio:.2f}, start-up {startup:.2f}")
    if handing:
        handed, own = results["handed: "], results["in-process: "]
        on_hosts = ", ".join(f"served on {n} {_ratio(handed.hosts[n], own.hosts[n])}"
                             for n in names)  # fmt: skip
        print(f"handed / in-process: every host served {_ratio(handed.every, own.every)}, "
              f"command exited {_ratio(handed.exit, own.exit)}, start-up "
              f"{_ratio(handed.startup, own.startup)}, rollout "
              f"{_ratio(handed.rollout, own.rollout)}; {on_hosts}")  # fmt: skip
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
