"""Build-context export of a 2,000-file commit: `Mirror.export` (git read-tree + checkout-index)
against the former path (`git archive` piped through Python's tarfile "data" filter).

    .venv/bin/python bench/bench_export.py [--files 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.sources.git import Mirror


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        work = root / "work"
        subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
        for i in range(args.files):
            path = work / f"d{i // 100}" / f"f{i}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text(f"file {i}\n" * 20)
        ident = ["-c", "user.name=b", "-c", "user.email=b@b"]
        subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
        subprocess.run(["git", "-C", str(work), *ident, "commit", "-qm", "files"], check=True)
        mirror = Mirror(work.as_uri(), root / "mirror.git")
        rev = mirror.fetch(branch="main")
        assert rev is not None

        def archive(dest: Path) -> None:
            dest.mkdir()
            with tempfile.TemporaryFile() as tmp:
                git = ["git", "--git-dir", str(mirror.path), "archive", "--format=tar", rev.sha]
                subprocess.run(git, stdout=tmp, check=True)
                tmp.seek(0)
                with tarfile.open(fileobj=tmp, mode="r:") as tar:
                    tar.extractall(dest, filter="data")

        def checkout(dest: Path) -> None:
            mirror.export(rev.sha, dest)

        ways: list[tuple[str, Callable[[Path], None]]] = [
            ("git archive + tarfile (before)", archive),
            ("Mirror.export: read-tree + checkout-index", checkout),
        ]
        for name, export in ways:
            times = []
            for k in range(args.rounds):
                dest = root / f"{export.__name__}-{k}"
                start = time.perf_counter()
                export(dest)
                times.append(time.perf_counter() - start)
                shutil.rmtree(dest)
            print(f"{name}: median {statistics.median(times) * 1000:.0f} ms, "
                  f"min {min(times) * 1000:.0f} ms over {args.rounds}")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
