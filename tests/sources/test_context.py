"""The build context `Mirror.export` writes is what `docker build` of a fresh checkout sends:
symlinks, submodules, Git LFS content and export-ignore paths, on real git repositories."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
from git_context_helpers import (
    LFS_ATTRIBUTES,
    Repo,
    add_submodule,
    bump_submodule,
    git,
    lfs_pointer,
    make_repo,
    path_without,
)

from pipeline.build.builder import Builder
from pipeline.config.load import parse
from pipeline.plan.planner import Build, ImageRecord, RepoSnapshot, image_spec_hash, plan
from pipeline.sources.checkout import (
    confined,
    lfs_pointers,
    parse_gitmodules,
    submodule_url,
)
from pipeline.sources.git import GitError, Mirror, Revision


@pytest.fixture(autouse=True)
def isolated_git_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Neither the developer's ~/.gitconfig nor /etc/gitconfig (git-lfs's filter) may decide.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def app(tmp_path: Path) -> Repo:
    repo = make_repo(tmp_path, "app")
    repo.write("web/Dockerfile", "FROM scratch\nCOPY . /ctx/\n")
    repo.write("web/index.html", "hello\n")
    repo.write("api/Dockerfile", "FROM scratch\n")
    repo.commit("initial")
    repo.push()
    return repo


def fetched(repo: Repo, tmp_path: Path, **kwargs: bool) -> tuple[Mirror, str]:
    mirror = Mirror(repo.url, tmp_path / "data" / "git" / "app.git", **kwargs)
    rev = mirror.fetch(branch="main")
    assert rev is not None
    return mirror, rev.sha


def test_symlinks_exported_as_links_and_docker_builds_them(app: Repo, tmp_path: Path) -> None:
    """An absolute symlink and one pointing outside the context arrive as links, and `docker
    build` of the exported context succeeds, as it does for a checkout."""
    os.symlink("/etc/hostname", app.work / "web" / "abs-link")
    os.symlink("../api/Dockerfile", app.work / "web" / "outside-link")
    os.symlink("index.html", app.work / "web" / "inside-link")
    app.commit("links")
    app.push()
    mirror, sha = fetched(app, tmp_path)
    ctx = mirror.export(sha, tmp_path / "ctx", "web")
    assert os.readlink(ctx / "abs-link") == "/etc/hostname"
    assert os.readlink(ctx / "outside-link") == "../api/Dockerfile"
    assert os.readlink(ctx / "inside-link") == "index.html"
    tag = f"pipeline-test-context-links:{os.getpid()}"
    try:
        subprocess.run(
            ["docker", "build", "-q", "-t", tag, str(ctx)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def test_export_never_writes_through_a_symlink(app: Repo, tmp_path: Path) -> None:
    """A crafted tree with a symlink `a` to a folder outside and a file `a/b` writes nothing
    outside the export directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    bare = app.bare

    def put(cmd: str, text: str) -> str:
        args = ["git", *cmd.split()]
        done = subprocess.run(
            args, cwd=bare, input=text, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    blob = put("hash-object -w --stdin", "evil\n")
    link = put("hash-object -w --stdin", str(outside))
    sub = put("mktree", f"100644 blob {blob}\tb\n")
    tree = put("mktree", f"120000 blob {link}\ta\n040000 tree {sub}\ta\n")
    commit = git(bare, "commit-tree", tree, "-m", "evil")
    git(bare, "update-ref", "refs/heads/main", commit)
    mirror, sha = fetched(app, tmp_path)
    assert sha == commit
    ctx = mirror.export(sha, tmp_path / "ctx")
    assert list(outside.iterdir()) == []
    assert all(str(p.resolve()).startswith(str(ctx)) for p in ctx.rglob("*") if not p.is_symlink())


def test_confined_refuses_symlinked_parents(tmp_path: Path) -> None:
    """A path whose parent inside the export is a symlink is refused before anything is written."""
    (tmp_path / "ctx").mkdir()
    os.symlink(tmp_path, tmp_path / "ctx" / "up")
    with pytest.raises(GitError, match="'up' is not a directory"):
        confined(tmp_path / "ctx", "up/lib")
    assert confined(tmp_path / "ctx", "new/lib") == tmp_path / "ctx" / "new" / "lib"


def test_export_ignore_paths_are_in_the_context(app: Repo, tmp_path: Path) -> None:
    """Paths marked export-ignore in .gitattributes are exported, as a checkout has them, and
    the planner's file list holds them too."""
    app.write("web/.gitattributes", "secret.txt export-ignore\n")
    app.write("web/secret.txt", "kept\n")
    app.commit()
    app.push()
    mirror, sha = fetched(app, tmp_path)
    ctx = mirror.export(sha, tmp_path / "ctx", "web")
    assert (ctx / "secret.txt").read_text() == "kept\n"
    assert "web/secret.txt" in mirror.list_files(sha)


@pytest.fixture
def with_lib(app: Repo, tmp_path: Path) -> Repo:
    """`app` with a submodule `lib` at web/vendor/lib (relative URL ../lib.git)."""
    lib = make_repo(tmp_path, "lib")
    lib.write("lib.txt", "v1\n")
    lib.commit()
    lib.push()
    add_submodule(app, lib, "web/vendor/lib")
    app.commit("add lib")
    app.push()
    return lib


def test_submodule_files_exported_at_the_recorded_commit(
    app: Repo, with_lib: Repo, tmp_path: Path
) -> None:
    """A submodule's files are in the context at the commit the gitlink records, not at the
    submodule's newest commit."""
    with_lib.write("lib.txt", "v2 (not recorded)\n")
    with_lib.commit()
    with_lib.push()
    mirror, sha = fetched(app, tmp_path)
    ctx = mirror.export(sha, tmp_path / "ctx", "web")
    assert (ctx / "vendor" / "lib" / "lib.txt").read_text() == "v1\n"
    assert "web/vendor/lib" in mirror.list_files(sha)
    assert mirror.submodule_paths(sha) == ["web/vendor/lib"]


def test_submodules_off_leaves_an_empty_folder(app: Repo, with_lib: Repo, tmp_path: Path) -> None:
    """With `submodules = false` the context has the empty folder a plain checkout has, and a
    bump of the submodule changes no file."""
    mirror, old = fetched(app, tmp_path, submodules=False)
    ctx = mirror.export(old, tmp_path / "ctx", "web")
    assert list((ctx / "vendor" / "lib").iterdir()) == []
    with_lib.write("lib.txt", "v2\n")
    with_lib.commit()
    with_lib.push()
    bump_submodule(app, "web/vendor/lib")
    app.commit("bump")
    new = app.push()
    mirror.fetch(branch="main")
    assert mirror.changed_paths(old, new) == frozenset()
    assert "web/vendor/lib" not in mirror.list_files(new)


def test_gitlink_bump_rebuilds_the_image_whose_context_holds_it(
    app: Repo, with_lib: Repo, tmp_path: Path
) -> None:
    """Bumping only the submodule is a change of its path: the planner rebuilds the image whose
    context holds it and leaves the other image alone."""
    mirror, old = fetched(app, tmp_path)
    with_lib.write("lib.txt", "v2\n")
    with_lib.commit()
    with_lib.push()
    bump_submodule(app, "web/vendor/lib")
    app.commit("bump lib")
    new = app.push()
    mirror.fetch(branch="main")
    assert mirror.changed_paths(old, new) == {"web/vendor/lib"}
    cfg = parse(
        f"""
[hosts.h1]
docker = "unix:///var/run/docker.sock"
[repos.app]
url = "{app.url}"
[images.web]
repo = "app"
context = "web"
[images.api]
repo = "app"
context = "api"
""",
        Path("pipeline.toml"),
    ).model
    records = {
        name: ImageRecord(old, "sha256:x", image_spec_hash(cfg.images[name]))
        for name in ("web", "api")
    }
    snapshot = RepoSnapshot(
        repo="app",
        revision=new,
        files=frozenset(mirror.list_files(new)),
        changes={old: mirror.changed_paths(old, new)},
        dockerignores={},
        submodules=frozenset(mirror.submodule_paths(new)),
    )
    result = plan(cfg, {"app": snapshot}, records, {})
    assert [(b.image, b.reason) for b in result.builds] == [("web", "changed: web/vendor/lib")]
    ctx = mirror.export(new, tmp_path / "ctx", "web")
    assert (ctx / "vendor" / "lib" / "lib.txt").read_text() == "v2\n"


def lfs_repo(app: Repo) -> None:
    """Commit web/model.bin as an LFS pointer (attributes and pointer text, no git-lfs needed)."""
    app.write(".gitattributes", LFS_ATTRIBUTES)
    app.write("web/model.bin", lfs_pointer(b"weights\n"))
    app.commit("lfs")
    app.push()


def test_lfs_pointer_refused_naming_the_file_without_git_lfs(app: Repo, tmp_path: Path) -> None:
    """Without git-lfs installed, export refuses a commit with an LFS file and names it; no
    pointer text is left for a build."""
    lfs_repo(app)
    mirror, sha = fetched(app, tmp_path)
    with path_without("git-lfs", tmp_path / "shadow-path"):
        assert shutil.which("git-lfs") is None
        with pytest.raises(GitError, match=r"git-lfs is not installed.*web/model\.bin"):
            mirror.export(sha, tmp_path / "ctx", "web")
    assert shutil.which("git-lfs") is not None or not Path("/usr/bin/git-lfs").exists()


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")
def test_lfs_file_exported_with_its_content(app: Repo, tmp_path: Path) -> None:
    """With git-lfs and the object on the (local, file://) remote, the real content is exported."""
    content = os.urandom(3000)
    git(app.work, "lfs", "install", "--local")
    app.write(".gitattributes", LFS_ATTRIBUTES)
    app.write("web/model.bin", content)
    app.commit("lfs")
    app.push()
    assert len(list((app.bare / "lfs" / "objects").rglob("*"))) > 0
    mirror, sha = fetched(app, tmp_path)
    ctx = mirror.export(sha, tmp_path / "ctx", "web")
    assert (ctx / "model.bin").read_bytes() == content


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")
def test_lfs_object_missing_on_remote_refused(app: Repo, tmp_path: Path) -> None:
    """With git-lfs but the object nowhere, the export fails instead of shipping the pointer."""
    lfs_repo(app)
    mirror, sha = fetched(app, tmp_path)
    with pytest.raises(GitError):
        mirror.export(sha, tmp_path / "ctx", "web")


@pytest.mark.parametrize(
    ("parent", "url", "expected"),
    [
        ("https://u:t@h.io/org/app.git", "../lib.git", "https://u:t@h.io/org/lib.git"),
        ("https://u:t@h.io/org/app.git", "./lib", "https://u:t@h.io/org/app.git/lib"),
        ("https://u:t@h.io/org/app.git", "https://h.io/o/x.git", "https://u:t@h.io/o/x.git"),
        ("https://u:t@h.io/org/app.git", "https://o.io/o/x.git", "https://o.io/o/x.git"),
        ("https://u:t@h.io/org/app.git", "https://v@h.io/o/x.git", "https://v@h.io/o/x.git"),
        ("file:///srv/git/app.git", "../lib.git", "file:///srv/git/lib.git"),
        ("file:///srv/git/app.git", "/srv/lib.git", "file:///srv/lib.git"),
        ("git@h.io:org/app.git", "../../x/lib.git", "git@h.io:x/lib.git"),
    ],
)
def test_submodule_url_resolution(parent: str, url: str, expected: str) -> None:
    """Submodule URLs resolve as `git submodule` resolves them, with the parent's credentials
    for the parent's own host."""
    assert submodule_url(parent, url, where="submodule.lib.url") == expected


@pytest.mark.parametrize(
    ("parent", "url", "error"),
    [
        ("https://h.io/org/app.git", "../../../x", "climbs above"),
        ("https://h.io/org/app.git", "/srv/lib.git", "only for a local repository"),
        ("https://h.io/org/app.git", "file:///srv/lib.git", "only for a local repository"),
        ("https://h.io/org/app.git", "ext::sh", "transport helpers"),
        ("https://h.io/org/app.git", "-oProxyCommand=x:y", "refused git URL"),
    ],
)
def test_submodule_url_refused(parent: str, url: str, error: str) -> None:
    """A submodule URL that escapes, is local under a remote parent, or is unsafe is refused,
    naming the .gitmodules key."""
    with pytest.raises(GitError, match=f"submodule.lib.url: .*{error}"):
        submodule_url(parent, url, where="submodule.lib.url")


def test_parse_gitmodules_keys_by_path() -> None:
    """`.gitmodules` entries are keyed by path (dotted names kept); incomplete ones are left out."""
    listing = (
        "submodule.a.b.path\nvendor/ab\0submodule.a.b.url\n../ab.git\0"
        "submodule.c.path\nc\0core.x\ny\0"
    )
    modules = parse_gitmodules(listing)
    assert list(modules) == ["vendor/ab"]
    assert (modules["vendor/ab"].name, modules["vendor/ab"].url) == ("a.b", "../ab.git")


def test_lfs_pointers_never_follow_symlinks(tmp_path: Path) -> None:
    """Pointer detection reads only small regular files: a link to a pointer is not one."""
    (tmp_path / "p.bin").write_text(lfs_pointer(b"x"))
    (tmp_path / "plain.txt").write_text("version 1\n")
    os.symlink(tmp_path / "p.bin", tmp_path / "link.bin")
    assert lfs_pointers(tmp_path, ["p.bin", "plain.txt", "link.bin", "gone"]) == ["p.bin"]


def test_dockerfile_outside_context_never_written_through_a_link(app: Repo, tmp_path: Path) -> None:
    """A `.pipeline.Dockerfile` symlink in the commit is replaced by the copied Dockerfile; the
    file it points at outside the context is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    os.symlink(victim, app.work / "web" / ".pipeline.Dockerfile")
    app.write("docker/web.Dockerfile", "FROM scratch\n")
    app.commit()
    app.push()
    mirror, sha = fetched(app, tmp_path)
    loaded = parse(
        f"""
[repos.app]
url = "{app.url}"
[images.web]
repo = "app"
context = "web"
dockerfile = "docker/web.Dockerfile"
""",
        Path("pipeline.toml"),
    )

    class Connections:
        def mirror(self, repo: str) -> Mirror:
            return mirror

    builder = Builder(loaded, cast(Any, None), cast(Any, Connections()), report=print)
    (tmp_path / "work").mkdir()
    context, dockerfile = builder._export(
        Build("web", "app", sha, "test"),
        Revision(sha, "refs/heads/main", None, None),
        tmp_path / "work",
    )
    assert victim.read_text() == "untouched\n"
    assert (context / dockerfile).read_text() == "FROM scratch\n"
    assert not (context / dockerfile).is_symlink()
