"""Benchmark of the command line's start-up: how long a command takes before it answers.

Run: .venv/bin/python bench/bench_cli_startup.py [--runs N] [--config FILE] [--before PYTHON]

Each command is run N times as a fresh process, in the same run as `python -c pass` (the floor
every Python command pays on this machine), and the runs are interleaved round by round so that
a change of the machine's load during the run hits every command alike. Timed with hyperfine
when it is installed, else with time.perf_counter around subprocess.run. Prints median and p90
of each, and their ratio to the baseline's median. With perf_counter the median CPU time
(user + system) of each process is printed too: on a machine shared with other work it moves
far less than the wall time does.

Commands: `pipeline --help`; `pipeline validate -c FILE`; `python -m pipeline hook-validate`
(what the pre-receive hook runs on every push: the server config, then the pushed file);
`python -m pipeline hook-event` (what post-receive runs: queue one push event in the state
database; without --follow, so no deploy starts) against a copy of FILE whose data_dir is a
temporary folder. Targets: --help <= 0.25 s, validate <= 0.4 s.

--before PYTHON runs the same commands, in the same rounds, with another installation's
interpreter (its `pipeline` script beside it), e.g. a checkout of main: before and after
measured under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"pipeline --help": 0.25, "pipeline validate": 0.4}


def _commands(config: Path, work: Path, python: str, label: str = "") -> dict[str, list[str]]:
    pipeline = str(Path(python).with_name("pipeline"))
    # A copy of the config whose state database lives in `work`: hook-event writes to it.
    text = config.read_text(encoding="utf-8")
    own = work / f"pipeline{label.strip(': ')}.toml"
    data = work / f"data{label.strip(': ')}"
    own.write_text(text.replace('data_dir = ".pipeline"', f'data_dir = "{data}"'))
    repo = "shop"
    commands = {
        "pipeline --help": [pipeline, "--help"],
        "pipeline validate": [pipeline, "validate", "-c", str(config)],
        "hook-validate": [
            *(python, "-m", "pipeline", "hook-validate"),
            *("--repo", repo, "--ref", "refs/heads/main", "-c", str(config), str(config)),
        ],
        "hook-event": [
            *(python, "-m", "pipeline", "hook-event", "--repo", repo),
            *("--ref", "refs/heads/main", "--sha", "a" * 40, "-c", str(own)),
        ],
    }
    return {f"{label}{name}": argv for name, argv in commands.items()}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time_once(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of `argv`; exits when it fails."""
    cpu = _cpu()
    start = time.perf_counter()
    # From a folder of its own: `python -m pipeline` must not find a checkout in the cwd.
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}{done.stdout}")
    return elapsed, _cpu() - cpu


def _perf_counter(
    commands: dict[str, list[str]], runs: int, cwd: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU times of each command, runs interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    for argv in commands.values():  # one warm-up each: page cache, .pyc files, the state db
        _time_once(argv, cwd)
    for _ in range(runs):
        for name, argv in commands.items():
            wall, cpu = _time_once(argv, cwd)
            times[name].append(wall)
            cpus[name].append(cpu)
    return times, cpus


def _hyperfine(commands: dict[str, list[str]], runs: int, work: Path) -> dict[str, list[float]]:
    out = work / "hyperfine.json"
    argv = ["hyperfine", "-N", "--warmup", "1", "--runs", str(runs), "--export-json", str(out)]
    for name, cmd in commands.items():
        argv += ["-n", name, " ".join(cmd)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=work)
    results = json.loads(out.read_text())["results"]
    return {r["command"]: r["times"] for r in results}


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command")
    parser.add_argument("--config", type=Path, default=Path("pipeline.example.toml"))
    parser.add_argument("--no-hyperfine", action="store_true", help="time with perf_counter")
    parser.add_argument("--before", help="another installation's python, run alongside")
    args = parser.parse_args()
    config = args.config.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        commands = {"python -c pass": [sys.executable, "-c", "pass"]}
        if args.before:
            commands |= _commands(config, work, args.before, "before: ")
        commands |= _commands(config, work, sys.executable)
        use_hyperfine = shutil.which("hyperfine") is not None and not args.no_hyperfine
        env_note = "hyperfine" if use_hyperfine else "time.perf_counter over subprocess.run"
        cpus: dict[str, list[float]] = {}
        if use_hyperfine:
            times = _hyperfine(commands, args.runs, work)
        else:
            times, cpus = _perf_counter(commands, args.runs, work)
    base = statistics.median(times["python -c pass"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.runs} runs each, timed with {env_note}; {os.cpu_count()} CPUs; load {load}")
    print(f"{'command':<28} {'median':>9} {'p90':>9} {'x baseline':>11} {'cpu':>8}  target")
    for name in commands:
        median = statistics.median(times[name])
        cpu = f"{statistics.median(cpus[name]):.3f}s" if cpus else "-"
        target = None if name.startswith("before") else TARGETS.get(name)
        verdict = ""
        if target is not None:
            verdict = f"<= {target:.2f} s: {'met' if median <= target else 'MISSED'}"
        print(
            f"{name:<28} {median:>8.3f}s {_p90(times[name]):>8.3f}s "
            f"{median / base:>10.1f}x {cpu:>8}  {verdict}"
        )


if __name__ == "__main__":
    main()
