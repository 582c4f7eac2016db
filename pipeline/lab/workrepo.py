"""A bare repository and a working clone of it, driven with the git CLI: what the demo, the
tests and the benchmarks push commits through, the way a user would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_ENV = {
    **os.environ,
    # The user's own git config must not change what the demo, tests or benchmarks do.
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
}
GIT_ID = ["-c", "user.name=pipeline", "-c", "user.email=pipeline@pipeline.invalid",
       "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]


def git(*args: str, cwd: Path) -> str:
    """Run git (argv, fixed identity, no user config); return stdout, or raise with stderr."""
    res = subprocess.run(["git", *GIT_ID, *args], cwd=cwd, env=GIT_ENV, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {res.stderr.strip()}")
    return res.stdout.strip()


class WorkRepo:
    """`bare` (its `url` is file://) and a clone `work` on branch main; made if missing."""

    def __init__(self, root: Path, *, bare: Path | None = None, work: Path | None = None) -> None:
        self.bare = bare or root / "remote.git"
        self.work = work or root / "work"
        self.url = self.bare.as_uri()
        if not self.bare.exists():
            self.bare.parent.mkdir(parents=True, exist_ok=True)
            git("init", "--bare", "--initial-branch=main", str(self.bare), cwd=self.bare.parent)
        if not self.work.exists():
            git("clone", "--", self.url, str(self.work), cwd=self.bare.parent)
            git("symbolic-ref", "HEAD", "refs/heads/main", cwd=self.work)

    def write(self, path: str, text: str) -> Path:
        """Write a file of the working clone (parents created)."""
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target

    def commit(self, message: str) -> str:
        """Commit every change of the working clone; return the new commit's sha."""
        git("add", "--all", cwd=self.work)
        git("commit", "--allow-empty", "-m", message, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def push(self, ref: str = "main", force: bool = False) -> None:
        """Push the local branch `ref` to the bare repo."""
        git("push", *(["--force"] if force else []), "origin", f"{ref}:refs/heads/{ref}",
            cwd=self.work)

    def commit_push(self, message: str) -> str:
        """Commit every change and push main; return the new commit's sha."""
        sha = self.commit(message)
        self.push()
        return sha

    def tag(self, name: str) -> str:
        """Tag HEAD (lightweight); return the tagged sha."""
        git("tag", "--", name, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)
