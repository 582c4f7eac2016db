"""pipeline installed like any Python tool: a wheel built from the tree, installed into a fresh
virtualenv, installs the git hooks (shipped as package data) and a push through them deploys."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import Project

from pipeline.lab.workrepo import GIT_ENV, GIT_ID

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False,
                          timeout=300, **kwargs)  # type: ignore[call-overload]  # fmt: skip


def test_a_wheel_in_a_fresh_virtualenv_installs_hooks_and_a_push_deploys(
    project: Project, tmp_path: Path
) -> None:
    """`pip wheel .` then `pip install` into a new virtualenv: its `pipeline hooks install`
    finds the hook scripts inside the installed package, and a `git push` through them builds
    and deploys the sample app on the lab hosts."""
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    src = tmp_path / "src"
    top = {".venv", ".git", "build", "tests", "bench", "pipeline.egg-info"}
    shutil.copytree(ROOT, src, ignore=lambda d, names: [
        n for n in names if (Path(d) == ROOT and n in top) or n == "__pycache__"])  # fmt: skip
    dist = tmp_path / "dist"
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("pipeline-*.whl")

    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    python = venv / "bin" / "python"
    installed = _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                     "-q", wheel)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    # Offline and fast: the dependencies come from this venv's site-packages, added after the
    # fresh venv's own (so its pipeline is the wheel's, not the source tree's).
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    where = _run(python, "-c", "import pipeline; print(pipeline.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    hooks = _run(venv / "bin" / "pipeline", "hooks", "install", project.remote.bare, "--repo",
                 "shop", "-c", project.config, cwd=tmp_path)  # fmt: skip
    assert hooks.returncode == 0, hooks.stderr
    assert (project.remote.bare / "hooks" / "post-receive").read_text().startswith("#!/bin/sh")

    from pipeline.lab.sample_app import write_sample_app

    write_sample_app(project.remote.work, "web", "web v1")
    write_sample_app(project.remote.work, "api", "api v1")
    project.remote.commit("initial")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | GIT_ENV
    pushed = _run("git", *GIT_ID, "push", "origin", "main:refs/heads/main",
                  cwd=project.remote.work, env=env)  # fmt: skip
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    output = pushed.stdout + pushed.stderr
    assert "healthy" in output, output
    assert project.get(0, project.web_port) == "web v1"
    assert project.get(1, project.api_port) == "api v1"
