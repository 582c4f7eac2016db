"""Real git repositories for the build-context tests: a work tree pushed to a bare remote, a
submodule repo beside it, LFS pointers, and a PATH on which git-lfs is missing."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

LFS_ATTRIBUTES = "*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git(cwd: Path, *args: str) -> str:
    """Run git in `cwd` as a fixed test user; its stdout, stripped."""
    result = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "protocol.file.allow=always",
         *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout.strip()


@dataclass
class Repo:
    """A work tree whose `push()` updates the bare repo at `bare` (branch main)."""

    bare: Path
    work: Path

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def write(self, path: str, content: str | bytes = "x\n") -> None:
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)

    def commit(self, message: str = "change") -> str:
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.work, "rev-parse", "HEAD")

    def push(self) -> str:
        git(self.work, "push", "-q", "origin", "HEAD:refs/heads/main")
        return git(self.work, "rev-parse", "HEAD")


def make_repo(root: Path, name: str) -> Repo:
    """An empty repo `name` under `root`: `name.git` (bare) and `name` (its work tree)."""
    bare, work = root / f"{name}.git", root / name
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    git(work, "remote", "add", "origin", str(bare))
    return Repo(bare, work)


def add_submodule(parent: Repo, sub: Repo, path: str) -> None:
    """Add `sub` to `parent` at `path` by a URL relative to the parent's (../NAME.git)."""
    git(parent.work, "submodule", "add", "-q", f"../{sub.bare.name}", path)


def bump_submodule(parent: Repo, path: str) -> None:
    """Move the submodule at `path` to its remote's main and stage the new gitlink."""
    git(parent.work / path, "pull", "-q", "origin", "main")
    git(parent.work, "add", path)


def lfs_pointer(content: bytes) -> str:
    """The Git LFS pointer text of `content` (git-lfs spec v1)."""
    import hashlib

    oid = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(content)}\n"


@contextmanager
def path_without(program: str, shadow: Path) -> Iterator[None]:
    """Run the block with a PATH on which `program` is missing: `shadow` gets a link to every
    other command of the current PATH. The old PATH is restored afterwards."""
    shadow.mkdir(parents=True, exist_ok=True)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = shadow / entry.name
            if entry.name != program and not os.path.lexists(link):
                link.symlink_to(entry.path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(shadow))
        yield
