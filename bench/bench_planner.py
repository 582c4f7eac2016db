"""Benchmark of `planner.plan` on a 200-image monorepo with 50,000 files and a 3-file commit.

Run: .venv/bin/python bench/bench_planner.py [--rounds N] [--naive-rounds N]
The baseline is the naive way to answer the same question: compute every image's inputs by
matching every file of the tree against it, then intersect with the changed paths.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config.load import parse
from pipeline.config.model import Config
from pipeline.plan.dockerignore import DockerIgnore
from pipeline.plan.planner import (
    ImageRecord,
    RepoSnapshot,
    ServiceRecord,
    image_inputs_changed,
    image_spec_hash,
    plan,
    service_spec_hash,
)

IMAGES = 200
FILES = 50_000
TARGET_MS = 100.0
OLD = "1" * 40
NEW = "2" * 40


def _config() -> Config:
    lines = [
        '[hosts.h1]\ndocker = "unix:///var/run/docker.sock"',
        '[repos.mono]\nurl = "https://example.com/mono.git"',
    ]
    for i in range(IMAGES):
        watch = 'watch = ["shared/", "proto/**/*.proto"]' if i % 4 == 0 else ""
        lines.append(f'[images.svc-{i:03d}]\nrepo = "mono"\ncontext = "svc/{i:03d}"\n{watch}')
        lines.append(
            f'[services.svc-{i:03d}]\nimage = "svc-{i:03d}"\nhosts = ["h1"]\n'
            f'env = {{ INDEX = "{i}" }}\nmemory = "128m"'
        )
    return parse("\n".join(lines) + "\n", Path("pipeline.toml")).model


def _snapshot() -> RepoSnapshot:
    files: set[str] = set()
    for n in range(1000):
        files.add(f"shared/lib{n % 20}/mod{n}.py")
        files.add(f"proto/v{n % 3}/m{n}.proto")
    per_image = (FILES - len(files)) // IMAGES
    for i in range(IMAGES):
        files.add(f"svc/{i:03d}/Dockerfile")
        for n in range(per_image - 1):
            files.add(f"svc/{i:03d}/{['src', 'tests', 'docs'][n % 3]}/pkg{n % 7}/f{n}.py")
    while len(files) < FILES:
        files.add(f"docs/page{len(files)}.md")
    changed = frozenset(
        {"svc/007/src/pkg0/f0.py", "shared/lib3/mod3.py", "svc/010/docs/pkg2/f2.py"}
    )
    assert changed <= files
    ignores = {
        f"svc/{i:03d}": "# keep images small\ndocs\n*.md\n!README.md\n" for i in range(0, IMAGES, 2)
    }
    return RepoSnapshot("mono", NEW, frozenset(files), {OLD: changed}, ignores)


def _records(config: Config) -> tuple[dict[str, ImageRecord], dict[str, ServiceRecord]]:
    images = {
        n: ImageRecord(OLD, f"sha256:{n}", image_spec_hash(i)) for n, i in config.images.items()
    }
    services = {
        n: ServiceRecord(OLD, f"sha256:{s.image}", service_spec_hash(s))
        for n, s in config.services.items()
    }
    return images, services


def _naive(config: Config, snapshot: RepoSnapshot) -> set[str]:
    """Images to rebuild, found by computing each image's full input set from the tree."""
    changed = snapshot.changes[OLD] or frozenset()
    rebuild = set()
    for name, image in config.images.items():
        text = snapshot.dockerignores.get(image.context)
        ignore = DockerIgnore.from_text(text) if text is not None else None
        inputs = set(image_inputs_changed(image, snapshot.files, ignore))
        if inputs & changed:
            rebuild.add(name)
    return rebuild


def _time(fn: Callable[[], object], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--naive-rounds", type=int, default=3)
    args = parser.parse_args()

    config, snapshot = _config(), _snapshot()
    image_records, service_records = _records(config)

    def run() -> object:
        return plan(config, {"mono": snapshot}, image_records, service_records)

    start = time.perf_counter()
    result = plan(config, {"mono": snapshot}, image_records, service_records)
    cold = (time.perf_counter() - start) * 1000  # includes compiling globs and .dockerignores
    expected = {b.image for b in result.builds}
    assert expected == _naive(config, snapshot), "planner and naive baseline disagree"

    samples = _time(run, args.rounds)
    naive = _time(lambda: _naive(config, snapshot), args.naive_rounds)
    median, naive_median = statistics.median(samples), statistics.median(naive)
    print(f"{len(config.images)} images, {len(snapshot.files)} files, 3 changed paths")
    print(
        f"plan: {len(result.builds)} builds, {len(result.rollouts)} rollouts: "
        f"{', '.join(sorted(expected)[:6])}{' ...' if len(expected) > 6 else ''}"
    )
    print(
        f"plan(): median {median:.2f} ms over {args.rounds} rounds "
        f"(min {min(samples):.2f}, max {max(samples):.2f}; first, cold: {cold:.2f})"
    )
    print(f"target: < {TARGET_MS:.0f} ms -> {'OK' if median < TARGET_MS else 'MISSED'}")
    print(
        f"naive baseline (every file x every image): median {naive_median:.0f} ms "
        f"over {args.naive_rounds} rounds"
    )
    print(f"ratio: naive / plan = {naive_median / median:.0f}x")


if __name__ == "__main__":
    main()
