"""The build context on the lab: symlinks, submodules and Git LFS files reach the deployed image
as a checkout has them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from deploy_helpers import Project
from git_context_helpers import LFS_ATTRIBUTES, path_without

from pipeline.lab.workrepo import WorkRepo, git

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def _git_file_ok(*args: str, cwd: Path) -> None:
    # `git submodule` refuses file:// URLs unless told (CVE-2022-39253); the lab's are local.
    subprocess.run(
        ["git", "-c", "protocol.file.allow=always", "-c", "user.name=t", "-c", "user.email=t@t",
         *args],
        cwd=cwd, check=True, capture_output=True,
    )  # fmt: skip


def test_symlinks_and_submodule_deploy_and_submodule_bump_redeploys(
    project: Project, tmp_path: Path
) -> None:
    """A context with an absolute symlink, a link outside the context and a submodule deploys
    with the submodule's files in the image; bumping only the submodule rebuilds and redeploys
    web alone."""
    lib = WorkRepo(tmp_path, bare=tmp_path / "lib.git", work=tmp_path / "lib")
    lib.write("lib.txt", "lib v1")
    lib.commit_push("lib v1")
    project.initial_commit()
    work = project.remote.work
    os.symlink("/www/index.html", work / "web" / "www" / "abs.html")
    os.symlink("../../api/Dockerfile", work / "web" / "www" / "outside")
    _git_file_ok("submodule", "add", "-q", "../lib.git", "web/www/lib", cwd=work)
    project.push("links and lib")
    result = project.run()
    assert result.ok, result.errors
    assert project.get(0, project.web_port) == "web v1"
    address = project.lab.hosts[0].address
    base = f"http://{address}:{project.web_port}"
    assert httpx.get(f"{base}/lib/lib.txt", timeout=5).text == "lib v1"
    assert httpx.get(f"{base}/abs.html", timeout=5).text == "web v1"
    api_before = project.containers(project.api)

    lib.write("lib.txt", "lib v2")
    lib.commit_push("lib v2")
    _git_file_ok("pull", "-q", "origin", "main", cwd=work / "web" / "www" / "lib")
    git("add", "web/www/lib", cwd=work)
    project.push("bump lib")
    result = project.run()
    assert result.ok, result.errors
    assert [(b.image, b.reason) for b in result.plan.builds] == [
        (project.web, "changed: web/www/lib")
    ]
    for i in range(2):
        address = project.lab.hosts[i].address
        assert httpx.get(f"http://{address}:{project.web_port}/lib/lib.txt", timeout=5).text == (
            "lib v2"
        )
    assert project.containers(project.api) == api_before


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")
def test_lfs_file_refused_without_git_lfs_and_deployed_with_it(
    project: Project, tmp_path: Path
) -> None:
    """Without git-lfs a pass refuses the build naming the LFS file and deploys nothing; with
    git-lfs and the object on the remote, the real file is in the image."""
    content = "real LFS content " * 100
    work = project.remote.work
    git("lfs", "install", "--local", cwd=work)
    project.remote.write(".gitattributes", LFS_ATTRIBUTES)
    project.initial_commit()
    project.remote.write("web/www/data.bin", content)
    project.push("lfs data")
    assert (project.remote.bare / "lfs" / "objects").is_dir()
    with path_without("git-lfs", tmp_path / "shadow-path"):
        result = project.run()
    assert not result.ok
    assert any("web/www/data.bin" in e and "git-lfs" in e for e in result.errors), result.errors
    assert project.containers(project.web) == {h.name: [] for h in project.lab.hosts}
    result = project.run()
    assert result.ok, result.errors
    address = project.lab.hosts[0].address
    assert httpx.get(f"http://{address}:{project.web_port}/data.bin", timeout=5).text == content
