"""pipeline.sources.git against real repositories: a bare "remote" and a working clone."""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from git import cmd as git_cmd
from structlog.testing import capture_logs

from pipeline.errors import StallingError, TransientError
from pipeline.sources.git import (
    GitError,
    Mirror,
    validate_ref_name,
    validate_sha,
)
from pipeline.sources.refs import newest_tag


def git(cwd: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@dataclass
class Remote:
    bare: Path
    work: Path
    url: str

    def write(self, path: str, content: str = "x\n") -> None:
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)

    def commit(self, message: str) -> str:
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", message)
        return git(self.work, "rev-parse", "HEAD")

    def push(self, *args: str) -> None:
        git(self.work, "push", "-q", *args, "origin", "HEAD:refs/heads/main")


@pytest.fixture(autouse=True)
def isolated_git_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's own ~/.gitconfig (signing, hooks, default branch) must not change results.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    bare, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    git(work, "remote", "add", "origin", str(bare))
    r = Remote(bare=bare, work=work, url=bare.as_uri())
    r.write("README.md", "hello\n")
    r.write("app/main.py", "print(1)\n")
    r.write("app/Dockerfile", "FROM scratch\n")
    r.write("lib/util.py", "u = 1\n")
    r.commit("initial")
    r.push()
    return r


@pytest.fixture
def mirror(remote: Remote, tmp_path: Path) -> Mirror:
    return Mirror(remote.url, tmp_path / "data" / "git" / "remote.git")


def test_remote_head_sees_new_commit_without_fetching(remote: Remote, mirror: Mirror) -> None:
    """remote_head reports the remote's new branch tip while the mirror still lacks the commit."""
    first = mirror.fetch(branch="main")
    assert first is not None
    remote.write("README.md", "changed\n")
    new_sha = remote.commit("change")
    remote.push()
    head = mirror.remote_head(branch="main")
    assert head is not None
    assert (head.sha, head.ref, head.tag, head.version) == (new_sha, "refs/heads/main", None, None)
    assert mirror.changed_paths(first.sha, first.sha) == frozenset()
    with pytest.raises(GitError, match="fetch first"):
        mirror.changed_paths(first.sha, new_sha)


def test_fetch_then_changed_paths_lists_touched_files(remote: Remote, mirror: Mirror) -> None:
    """changed_paths lists added, modified and deleted files and both paths of a rename."""
    old = mirror.fetch(branch="main")
    assert old is not None
    remote.write("new.txt", "new\n")
    remote.write("app/main.py", "print(2)\n")
    (remote.work / "README.md").unlink()
    git(remote.work, "mv", "lib/util.py", "lib/helpers.py")
    new_sha = remote.commit("edit")
    remote.push()
    new = mirror.fetch(branch="main")
    assert new is not None and new.sha == new_sha
    assert mirror.changed_paths(old.sha, new.sha) == {
        "new.txt",
        "app/main.py",
        "README.md",
        "lib/util.py",
        "lib/helpers.py",
    }
    assert mirror.is_ancestor(old.sha, new.sha)
    assert not mirror.is_ancestor(new.sha, old.sha)


def test_changed_paths_unknown_without_old_commit(remote: Remote, mirror: Mirror) -> None:
    """changed_paths returns None (rebuild everything) when old is None or not in the mirror."""
    rev = mirror.fetch(branch="main")
    assert rev is not None
    assert mirror.changed_paths(None, rev.sha) is None
    assert mirror.changed_paths("a" * 40, rev.sha) is None
    assert not mirror.is_ancestor("a" * 40, rev.sha)


def test_force_push_diff_uses_old_commit_still_in_mirror(remote: Remote, mirror: Mirror) -> None:
    """After a force push, the diff between the old (now unreachable) and new tips is right."""
    remote.write("feature.txt", "f\n")
    remote.write("app/main.py", "print('feature')\n")
    remote.commit("feature")
    remote.push()
    old = mirror.fetch(branch="main")
    assert old is not None
    git(remote.work, "reset", "-q", "--hard", "HEAD~1")
    remote.write("lib/util.py", "u = 2\n")
    git(remote.work, "commit", "-q", "-a", "--amend", "-m", "rewritten")
    remote.push("--force")
    new = mirror.fetch(branch="main")
    assert new is not None and new.sha != old.sha
    assert not mirror.is_ancestor(old.sha, new.sha)
    assert mirror.changed_paths(old.sha, new.sha) == {"feature.txt", "app/main.py", "lib/util.py"}


def test_has_fetched_is_the_followed_ref_not_the_reflog(remote: Remote, mirror: Mirror) -> None:
    """An announced commit counts as fetched when the branch's head is it or contains it, not
    before its fetch, and no longer once force-pushed away (the reflog still keeps it)."""
    first = git(remote.work, "rev-parse", "HEAD")
    remote.write("b.txt", "b\n")
    second = remote.commit("second")
    assert not mirror.has_fetched(second, branch="main")  # no mirror yet
    remote.push()
    mirror.fetch(branch="main")
    assert mirror.has_fetched(second, branch="main") and mirror.has_fetched(first, branch="main")
    remote.write("c.txt", "c\n")
    third = remote.commit("third")
    remote.push()
    assert not mirror.has_fetched(third, branch="main")  # on the remote, not fetched yet
    mirror.fetch(branch="main")
    assert mirror.has_fetched(third, branch="main")
    git(remote.work, "reset", "-q", "--hard", first)
    remote.push("--force")
    mirror.fetch(branch="main")
    assert not mirror.has_fetched(third, branch="main")
    assert not mirror.has_fetched("b" * 40, branch="main")


def test_has_fetched_a_tag_by_its_object_or_commit(remote: Remote, mirror: Mirror) -> None:
    """For a repo following tags, a fetched annotated tag is found by its tag object's sha and
    by its commit's; a commit no tag points at is not fetched."""
    target = git(remote.work, "rev-parse", "HEAD")
    git(remote.work, "tag", "-a", "-m", "release", "v1.0.0")
    tag_object = git(remote.work, "rev-parse", "v1.0.0")
    remote.write("b.txt", "b\n")
    untagged = remote.commit("untagged")
    git(remote.work, "push", "-q", "origin", "--tags", "HEAD:refs/heads/main")
    assert not mirror.has_fetched(tag_object, tags="v*")
    mirror.fetch(tags="v*")
    assert mirror.has_fetched(tag_object, tags="v*") and mirror.has_fetched(target, tags="v*")
    assert not mirror.has_fetched(untagged, tags="v*")


def test_tags_pick_newest_version_and_peel_annotated(remote: Remote, mirror: Mirror) -> None:
    """Tag following orders v1.10.0 above v1.9.0 and resolves an annotated tag to its commit."""
    git(remote.work, "tag", "v1.2.0")
    remote.write("a.txt", "a\n")
    target = remote.commit("for 1.10")
    git(remote.work, "tag", "-a", "-m", "release", "v1.10.0")
    remote.write("b.txt", "b\n")
    remote.commit("for 1.9")
    git(remote.work, "tag", "v1.9.0")
    git(remote.work, "tag", "zzz-not-a-release")
    git(remote.work, "push", "-q", "origin", "--tags", "HEAD:refs/heads/main")
    tag_object = git(remote.work, "rev-parse", "v1.10.0")
    assert tag_object != target
    expected = ("refs/tags/v1.10.0", "v1.10.0", "1.10.0", target)
    head = mirror.remote_head(tags="v*")
    assert head is not None
    assert (head.ref, head.tag, head.version, head.sha) == expected
    fetched = mirror.fetch(tags="v*")
    assert fetched is not None
    assert (fetched.ref, fetched.tag, fetched.version, fetched.sha) == expected


def test_nothing_to_follow_gives_none(remote: Remote, mirror: Mirror) -> None:
    """A tags glob matching nothing and a missing branch resolve to None, remotely and locally."""
    git(remote.work, "tag", "v1.0.0")
    git(remote.work, "push", "-q", "origin", "--tags")
    assert mirror.remote_head(tags="release-*") is None
    assert mirror.fetch(tags="release-*") is None
    assert mirror.remote_head(branch="nope") is None
    assert mirror.fetch(branch="nope") is None


def test_deleted_branch_is_forgotten_by_fetch(remote: Remote, mirror: Mirror) -> None:
    """fetch of a branch deleted upstream returns None instead of the stale local tip."""
    git(remote.work, "push", "-q", "origin", "HEAD:refs/heads/topic")
    assert mirror.fetch(branch="topic") is not None
    git(remote.work, "push", "-q", "origin", ":refs/heads/topic")
    assert mirror.fetch(branch="topic") is None


@pytest.mark.parametrize(
    "url",
    [
        "ext::sh -c touch% /tmp/pwned",
        "ext::sh",
        "fd::17",
        "--upload-pack=touch /tmp/pwned",
        "-oProxyCommand=x",
        "ftp://host/x.git",
        "/local/path.git",
        "ssh://-oProxyCommand=x/r.git",
        "ssh://-oProxyCommand=x@host/r.git",
        "git@-oProxyCommand=x:r.git",
        "https://host/x.git\n",
        "",
    ],
)
def test_dangerous_urls_refused(url: str, tmp_path: Path) -> None:
    """URLs with transport helpers, option-like text or other schemes are refused up front."""
    with pytest.raises(GitError) as info:
        Mirror(url, tmp_path / "m.git")
    assert isinstance(info.value, StallingError)
    assert not (tmp_path / "m.git").exists()


@pytest.mark.parametrize(
    "url",
    ["https://h/x.git", "http://h/x", "ssh://git@h/x", "git://h/x", "file:///x", "git@h:o/r.git"],
)
def test_allowed_urls_accepted(url: str, tmp_path: Path) -> None:
    """The supported schemes and scp-like user@host:path are accepted."""
    assert Mirror(url, tmp_path / "m.git").url == url


def test_credentials_never_in_errors_or_logs(tmp_path: Path) -> None:
    """A failing https remote with credentials raises a transient GitError without the password."""
    mirror = Mirror("https://user:s3cret@127.0.0.1:9/x.git", tmp_path / "m.git")
    with capture_logs() as logs:
        for call in (
            lambda: mirror.remote_head(branch="main"),
            lambda: mirror.fetch(branch="main"),
        ):
            with pytest.raises(GitError) as info:
                call()
            assert isinstance(info.value, TransientError)
            assert "127.0.0.1:9" in str(info.value)
            text = f"{info.value} {info.value!r} {info.value.__cause__} {info.value.__context__}"
            assert "s3cret" not in text
    assert "s3cret" not in repr(logs)
    assert "s3cret" not in repr(mirror)


@pytest.fixture
def silent_server() -> Iterator[int]:
    # Accepts TCP connections (kernel backlog) but never answers: a hung remote.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_network_call_times_out(silent_server: int, tmp_path: Path) -> None:
    """A remote that never answers makes ls-remote fail as transient after the timeout."""
    mirror = Mirror(f"https://u:s3cret@127.0.0.1:{silent_server}/x.git", tmp_path / "m", timeout=1)
    start = time.monotonic()
    with pytest.raises(GitError, match="timed out") as info:
        mirror.remote_head(branch="main")
    assert time.monotonic() - start < 15
    assert isinstance(info.value, TransientError)
    assert "s3cret" not in str(info.value)


def test_a_timeout_kill_reaped_before_it_is_flagged_still_reads_as_timed_out(
    silent_server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeout kill whose flag GitPython sets only after git was reaped is still a timeout."""
    real_kill = git_cmd._kill_process

    def kill_then_flag_late(pid: int) -> bool:
        # GitPython flags the kill only after this returns; git is reaped in the meantime, as
        # happened on a loaded CI machine ("failed (exit -9): no output").
        killed = real_kill(pid)
        time.sleep(0.5)
        return killed

    monkeypatch.setattr(git_cmd, "_kill_process", kill_then_flag_late)
    mirror = Mirror(f"https://127.0.0.1:{silent_server}/x.git", tmp_path / "m", timeout=1)
    with pytest.raises(GitError, match="timed out after 1s") as info:
        mirror.remote_head(branch="main")
    assert isinstance(info.value, TransientError)


class _AuthRequired(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - name fixed by http.server
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="x"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def auth_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthRequired)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_auth_prompt_never_blocks(auth_server: int, tmp_path: Path) -> None:
    """A remote asking for a password fails at once as a stalling error instead of prompting."""
    mirror = Mirror(f"http://127.0.0.1:{auth_server}/x.git", tmp_path / "m", timeout=30)
    start = time.monotonic()
    with pytest.raises(GitError) as info:
        mirror.remote_head(branch="main")
    assert time.monotonic() - start < 10
    assert isinstance(info.value, StallingError)


def test_export_writes_subdir_files(remote: Remote, mirror: Mirror, tmp_path: Path) -> None:
    """export of a subdir writes exactly that directory's files, executable bits kept."""
    (remote.work / "app" / "run.sh").write_text("#!/bin/sh\n")
    (remote.work / "app" / "run.sh").chmod(0o755)
    remote.commit("script")
    remote.push()
    rev = mirror.fetch(branch="main")
    assert rev is not None
    dest = mirror.export(rev.sha, tmp_path / "ctx", "app")
    assert sorted(p.name for p in dest.iterdir()) == ["Dockerfile", "main.py", "run.sh"]
    assert (dest / "main.py").read_text() == "print(1)\n"
    assert (dest / "run.sh").stat().st_mode & 0o100
    whole = mirror.export(rev.sha, tmp_path / "all")
    assert (whole / "lib" / "util.py").is_file() and (whole / "README.md").is_file()
    with pytest.raises(GitError, match="no directory"):
        mirror.export(rev.sha, tmp_path / "x", "missing")
    with pytest.raises(GitError, match="invalid subdir"):
        mirror.export(rev.sha, tmp_path / "x", "../etc")


def test_read_and_list_files(remote: Remote, mirror: Mirror) -> None:
    """read_file returns a blob's bytes and None for a missing path or a directory."""
    rev = mirror.fetch(branch="main")
    assert rev is not None
    assert mirror.read_file(rev.sha, "app/Dockerfile") == b"FROM scratch\n"
    assert mirror.read_file(rev.sha, "app/nope") is None
    assert mirror.read_file(rev.sha, "app") is None
    assert sorted(mirror.list_files(rev.sha)) == [
        "README.md",
        "app/Dockerfile",
        "app/main.py",
        "lib/util.py",
    ]
    info = mirror.commit_info(rev.sha)
    assert (info["sha"], info["author"], info["subject"]) == (rev.sha, "t", "initial")
    assert info["committed_at"][:2] == "20"


def test_changed_paths_fast_on_large_tree(remote: Remote, mirror: Mirror) -> None:
    """changed_paths on a 50,000-file tree with a 3-file change answers in well under a second."""
    blob = git(remote.work, "hash-object", "-w", "--stdin", stdin="same\n")
    index = "".join(f"100644 {blob}\tbig/d{i // 500}/f{i}.txt\n" for i in range(50_000))
    git(remote.work, "update-index", "--index-info", stdin=index)
    git(remote.work, "commit", "-q", "-m", "big")
    old_sha = git(remote.work, "rev-parse", "HEAD")
    git(remote.work, "reset", "-q", "--hard")
    for name in ("big/d0/f0.txt", "big/d50/f25000.txt", "big/d99/f49999.txt"):
        remote.write(name, "different\n")
    remote.commit("three")
    remote.push()
    new = mirror.fetch(branch="main")
    assert new is not None
    start = time.monotonic()
    changed = mirror.changed_paths(old_sha, new.sha)
    elapsed = time.monotonic() - start
    assert changed == {"big/d0/f0.txt", "big/d50/f25000.txt", "big/d99/f49999.txt"}
    assert elapsed < 1.0


@pytest.mark.parametrize("name", ["main", "feature/x-1", "release-1.0", "user@host"])
def test_valid_ref_names(name: str) -> None:
    """Ordinary branch names pass validation unchanged."""
    assert validate_ref_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-x", "a..b", "a b", "x.lock", "/a", "a/", "a//b", "@", "a@{b", "a~1", "a^", "a:b"]
    + ["a?", "a*", "a[", "a\\b", ".hidden", "a/.b", "a.", "HEAD", "a\tb", "a\x7f"],
)
def test_invalid_ref_names(name: str) -> None:
    """Names git check-ref-format --branch rejects raise a stalling GitError naming the value."""
    with pytest.raises(GitError, match="invalid branch name") as info:
        validate_ref_name(name)
    assert isinstance(info.value, StallingError)


def test_validate_sha() -> None:
    """Full SHA-1 and SHA-256 hex names are lowercased; short or non-hex names are refused."""
    assert validate_sha("A" * 40) == "a" * 40
    assert validate_sha("0" * 64) == "0" * 64
    for bad in ("abc", "g" * 40, "a" * 41, "", "HEAD"):
        with pytest.raises(GitError, match="invalid commit sha"):
            validate_sha(bad)


def test_invalid_tag_glob_refused(mirror: Mirror) -> None:
    """A tags glob that cannot be a ref pattern is refused before any git command runs."""
    with pytest.raises(GitError, match="invalid tags glob"):
        mirror.remote_head(tags="-v*")
    with pytest.raises(GitError, match="exactly one"):
        mirror.fetch()


@pytest.mark.parametrize(
    ("names", "pattern", "expected"),
    [
        (["v1.2.0", "v1.10.0", "v1.9.0"], "v*", "v1.10.0"),
        (["1.9.0", "v1.10.0"], "*", "v1.10.0"),
        (["v2.0.0-rc1", "v1.9.9", "v2.0.0"], "v*", "v2.0.0"),
        (["v2.0.0-rc2", "v2.0.0-rc10", "v1.0.0"], "v*", "v2.0.0-rc10"),
        (["v1.0", "v1.0.1"], "v1.*", "v1.0.1"),
        (["v1.0.0", "other"], "release-*", None),
    ],
)
def test_newest_tag_orders_by_version(names: list[str], pattern: str, expected: str | None) -> None:
    """Tags compare numerically part by part, a release beats its pre-releases, globs filter."""
    assert newest_tag(names, pattern) == expected
