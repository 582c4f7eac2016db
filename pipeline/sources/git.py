"""Git mirrors of followed repositories: cheap remote checks, fetches, diffs and tree exports.

The only module that imports GitPython. Every command is an argv list run through GitPython's
`Git` wrapper with `cwd` set to the bare mirror (never `os.chdir`), prompts disabled, a timeout on
network calls, and errors rebuilt so that no credential from a URL ever reaches a message.
The pure checks of URLs, refs, shas and tag versions live in `pipeline.sources.refs`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypedDict, cast

import structlog

from pipeline.redact import redact, redact_url, url_secrets
from pipeline.sources.checkout import (
    confined,
    lfs_objects_missing,
    lfs_pointers,
    parse_gitmodules,
    submodule_url,
)
from pipeline.sources.refs import (
    ALLOWED_SCHEMES,
    HEX_SHA,
    GitError,
    GitStallingError,
    GitTransientError,
    check_target,
    clean_path,
    newest_tag,
    tag_version,
    validate_sha,
    validate_url,
)
from pipeline.sources.refs import validate_ref_name as validate_ref_name  # re-exported

log = structlog.get_logger(__name__)

NETWORK_TIMEOUT = 60.0
SUBMODULE_DEPTH = 8  # nested submodules followed at most this deep (a cycle stops here)
FETCH_TIMEOUT = 600.0  # a first fetch of a large repository legitimately takes minutes

# Git-level allow-list as a second line behind validate_url: redirects and config cannot widen it.
_SAFE_CONFIG = [
    "-c", "protocol.allow=never",
    *(arg for s in sorted(ALLOWED_SCHEMES) for arg in ("-c", f"protocol.{s}.allow=always")),
    "-c", "protocol.ext.allow=never",
]  # fmt: skip
# An empty GIT_ASKPASS stops git from falling back to core.askPass/SSH_ASKPASS helpers, and
# GIT_TERMINAL_PROMPT=0 makes it fail instead of waiting for a password nobody will type.
_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "",
    "SSH_ASKPASS": "",
    "SSH_ASKPASS_REQUIRE": "never",
    "GIT_LITERAL_PATHSPECS": "1",
}
# A fresh checkout's filters, set here so that neither a user's config nor its absence decides:
# with git-lfs, its filter fetches each LFS object from the remote (and must succeed); without
# it, LFS files stay pointer text, which export then refuses by name.
_LFS_ON = [
    "-c",
    "filter.lfs.process=git-lfs filter-process",
    "-c",
    "filter.lfs.required=true",
    "-c",
    "filter.lfs.smudge=git-lfs smudge -- %f",
]
_LFS_OFF = [
    "-c",
    "filter.lfs.process=",
    "-c",
    "filter.lfs.smudge=",
    "-c",
    "filter.lfs.required=false",
]
_GITLINK, _SYMLINK = "160000", "120000"
# Submodule mirrors are shared by every export that needs them; one fetch into each at a time.
_module_locks: dict[Path, threading.Lock] = {}
_module_locks_guard = threading.Lock()

# stderr that means a human must act (credentials, URL, missing ref or object), not a blip.
_STALLING = re.compile(
    r"authentication failed|could not read (username|password)|terminal prompts disabled"
    r"|permission denied|host key verification failed|repository not found|not allowed"
    r"|does not appear to be a git repository|unsupported protocol|returned error: 40[134]"
    r"|not a valid object name|not a tree object|couldn't find remote ref",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Revision:
    """A commit a followed ref points at; `tag`/`version` are set only when following tags."""

    sha: str
    ref: str
    tag: str | None
    version: str | None


class CommitInfo(TypedDict):
    sha: str
    author: str
    email: str
    subject: str
    committed_at: str


class Mirror:
    """A bare mirror of one remote repository at `path`; the caller serialises ops per Mirror."""

    def __init__(
        self,
        url: str,
        path: Path,
        *,
        timeout: float = NETWORK_TIMEOUT,
        fetch_timeout: float = FETCH_TIMEOUT,
        submodules: bool = True,
    ) -> None:
        self.url = validate_url(url)
        self.path = Path(path).absolute()
        self.submodules = submodules  # export fetches them; their gitlinks count as files
        self._last_tree: tuple[str, list[tuple[str, str]]] | None = None
        self.timeout = timeout
        self.fetch_timeout = fetch_timeout
        self._ready = False
        self._secrets = url_secrets(url)

    def __repr__(self) -> str:
        return f"Mirror({redact_url(self.url)!r}, {str(self.path)!r})"

    # -- remote -------------------------------------------------------------------------------

    def remote_head(self, *, branch: str | None = None, tags: str | None = None) -> Revision | None:
        """Ask the remote (one `ls-remote`, no fetch) where the branch or newest matching tag is."""
        branch, tags = check_target(branch, tags)
        self._ensure_mirror()
        if branch is not None:
            ref = f"refs/heads/{branch}"
            out = self._run(["ls-remote", "--heads", "--", self.url, ref], timeout=self.timeout)
            for line in out.decode().splitlines():
                sha, _, name = line.partition("\t")
                if name == ref:  # ls-remote patterns match ref tails; keep only the exact ref
                    return Revision(sha=sha, ref=ref, tag=None, version=None)
            return None
        assert tags is not None
        out = self._run(["ls-remote", "--tags", "--", self.url], timeout=self.timeout)
        shas: dict[str, str] = {}
        peeled: dict[str, str] = {}
        for line in out.decode().splitlines():
            sha, _, name = line.partition("\t")
            if not name.startswith("refs/tags/"):
                continue
            tag = name.removeprefix("refs/tags/")
            if tag.endswith("^{}"):  # an annotated tag's target commit
                peeled[tag.removesuffix("^{}")] = sha
            else:
                shas[tag] = sha
        newest = newest_tag(list(shas), tags)
        if newest is None:
            return None
        sha = peeled.get(newest, shas[newest])
        return Revision(sha=sha, ref=f"refs/tags/{newest}", tag=newest, version=tag_version(newest))

    def fetch(self, *, branch: str | None = None, tags: str | None = None) -> Revision | None:
        """Fetch the branch (or all tags) with --prune; return what the local refs now point at."""
        branch, tags = check_target(branch, tags)
        self._ensure_mirror()
        if branch is not None:
            refspec = f"+refs/heads/{branch}:refs/heads/{branch}"
        else:
            refspec = "+refs/tags/*:refs/tags/*"
        args = ["fetch", "--prune", "--no-tags", "--no-recurse-submodules", "--no-write-fetch-head"]
        try:
            self._run([*args, "--quiet", "--", "origin", refspec], timeout=self.fetch_timeout)
        except GitStallingError as exc:
            if branch is None or "couldn't find remote ref" not in str(exc):
                raise
            # The branch is gone upstream: forget it locally too (the reflog keeps old commits).
            self._run(["update-ref", "-d", f"refs/heads/{branch}"])
        revision = self._local_revision(branch, tags)
        log.info(
            "git.fetched",
            repo=redact_url(self.url),
            ref=revision.ref if revision else None,
            revision=revision.sha if revision else None,
        )
        return revision

    def local_head(self, *, branch: str | None = None, tags: str | None = None) -> Revision | None:
        """Where the mirror's own refs point (no network); None before the first fetch."""
        branch, tags = check_target(branch, tags)
        if not (self.path / "HEAD").exists():
            return None
        if branch is not None:
            # A fetch writes the branch as a loose ref: reading it spares a git process per
            # poll. Packed or odd refs fall through to rev-parse.
            loose = self.path / "refs" / "heads" / branch
            try:
                sha = loose.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                sha = ""
            if HEX_SHA.fullmatch(sha):
                return Revision(sha=sha, ref=f"refs/heads/{branch}", tag=None, version=None)
        return self._local_revision(branch, tags)

    def resolve(self, rev: str) -> str:
        """The full sha of a commit given as a sha, an unambiguous sha prefix, or a tag name."""
        if not re.fullmatch(r"[0-9a-fA-F]{4,64}", rev):
            clean_path(rev, "revision")
            rev = f"refs/tags/{rev}"
        out = self._run(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], ok=(0, 1)
        )
        sha = out.decode().strip()
        if not sha:
            raise GitStallingError(f"revision {rev!r} not found in {self._name} (fetched?)")
        return sha

    def has_fetched(self, sha: str, *, branch: str | None = None, tags: str | None = None) -> bool:
        """True when commit (or annotated tag object) `sha` is on what the mirror follows: the
        branch's head or one of its ancestors, or a tag pointing at it (as object or commit).
        A commit kept only by the reflog (force-pushed away) is not; no network."""
        sha = validate_sha(sha)
        branch, tags = check_target(branch, tags)
        if not (self.path / "HEAD").is_file() or not self._has_commit(sha):
            return False
        if branch is None:
            # --points-at matches a tag whose object is `sha` or whose commit is (ref-filter).
            out = self._run(
                ["for-each-ref", f"--points-at={sha}", "--format=%(refname)", "refs/tags/"]
            )
            return bool(out.strip())
        head = self.local_head(branch=branch)
        return head is not None and (head.sha == sha or self.is_ancestor(sha, head.sha))

    def _local_revision(self, branch: str | None, tags: str | None) -> Revision | None:
        if branch is not None:
            ref = f"refs/heads/{branch}"
            tag = None
        else:
            assert tags is not None
            out = self._run(["for-each-ref", "--format=%(refname:strip=2)", "refs/tags/"])
            tag = newest_tag(out.decode().splitlines(), tags)
            if tag is None:
                return None
            ref = f"refs/tags/{tag}"
        # ^{commit} peels annotated tags (even tags of tags) down to the commit.
        out = self._run(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], ok=(0, 1))
        sha = out.decode().strip()
        if not sha:
            if tag is None:
                return None
            raise GitStallingError(f"tag {tag!r} of {self._name} does not point at a commit")
        return Revision(sha=sha, ref=ref, tag=tag, version=tag_version(tag) if tag else None)

    # -- local --------------------------------------------------------------------------------

    def changed_paths(self, old: str | None, new: str) -> frozenset[str] | None:
        """Paths changed between two commits (renames give both paths); None means unknown.

        The same paths `list_files` and `export` see: a submodule whose recorded commit moved is
        its path, unless `submodules` is off (the context then holds an empty folder for it)."""
        new = validate_sha(new)
        if old is None:
            return None
        old = validate_sha(old)
        self._require_commit(new)
        if not self._has_commit(old):
            return None
        if old == new:
            return frozenset()
        # Comparing the two trees directly works whether or not old is an ancestor of new.
        out = self._run(["diff-tree", "-r", "-z", "--no-renames", old, new])
        fields = out.decode(errors="surrogateescape").split("\0")
        paths = set()
        for meta, path in zip(fields[0::2], fields[1::2], strict=False):
            modes = {m for m in meta.lstrip(":").split(" ")[:2] if m != "000000"}
            if path and (self.submodules or modes - {_GITLINK}):
                paths.add(path)
        return frozenset(paths)

    def list_files(self, sha: str) -> list[str]:
        """Every file path in the tree of commit `sha`: blobs, symlinks, and each submodule's
        path when `submodules` is on (its files are in the context then, not in this tree)."""
        kinds = ("blob", "commit") if self.submodules else ("blob",)
        return [path for kind, path in self._tree(sha) if kind in kinds]

    def submodule_paths(self, sha: str) -> list[str]:
        """The paths of the submodules (gitlinks) in commit `sha`'s tree; [] when `submodules`
        is off (the context then holds an empty folder for each, as a plain checkout does)."""
        if not self.submodules:
            return []
        return [path for kind, path in self._tree(sha) if kind == "commit"]

    def _tree(self, sha: str) -> list[tuple[str, str]]:
        """(object type, path) of every entry of `sha`'s tree; the last answer is kept, since
        a snapshot asks for the files and the submodules of the same commit."""
        sha = self._require_commit(validate_sha(sha))
        if self._last_tree is not None and self._last_tree[0] == sha:
            return self._last_tree[1]
        out = self._run(["ls-tree", "-r", "-z", "--full-tree", sha])
        entries = []
        for entry in out.decode(errors="surrogateescape").split("\0"):
            meta, _, name = entry.partition("\t")
            if name:
                entries.append((meta.split(" ")[1], name))
        self._last_tree = (sha, entries)
        return entries

    def read_file(self, sha: str, path: str) -> bytes | None:
        """Content of the file at `path` in commit `sha`, or None if there is no such file."""
        sha = self._require_commit(validate_sha(sha))
        path = clean_path(path, "path")
        out = self._run(["ls-tree", "-z", sha, "--", path])
        meta, _, name = out.decode(errors="surrogateescape").partition("\0")[0].partition("\t")
        if name != path or meta.split(" ")[1] != "blob":
            return None
        return self._run(["cat-file", "blob", meta.split(" ")[2]])

    def export(self, sha: str, dest: Path, subdir: str = "") -> Path:
        """Write what `docker build` of a fresh checkout of `sha` would send as its context (the
        tree or its `subdir`) into `dest`, created if needed and otherwise empty; return dest.

        git itself checks out (`read-tree` + `checkout-index` into `dest`, a temporary index), so
        symlinks stay symlinks wherever they point, `export-ignore` paths are there as in a
        checkout, and nothing is written through a symlink or outside `dest`. Submodules (when
        `submodules` is on) are fetched into mirrors of their own and placed at the commit each
        gitlink records. Git LFS files are fetched with git-lfs when it is installed; a file
        left as LFS pointer text, or whose LFS object the remote lacks, is refused
        (GitStallingError naming the paths), never exported.
        """
        sha = self._require_commit(validate_sha(sha))
        sub = "" if subdir.strip("/") in ("", ".") else clean_path(subdir, "subdir")
        if sub:
            kind = self._run(["cat-file", "-t", f"{sha}:{sub}"], ok=(0, 128)).decode().strip()
            if kind != "tree":
                raise GitStallingError(f"no directory {sub!r} in commit {sha} of {self._name}")
        dest = Path(dest).absolute()
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise GitStallingError(f"export of {sha[:12]}: {dest} is not empty")
        self._export(sha, dest, sub, depth=0)
        return dest

    def _export(self, sha: str, dest: Path, sub: str, *, depth: int) -> None:
        with tempfile.TemporaryDirectory(prefix=".pipeline-export-", dir=dest.parent) as tmp:
            work = dest if not sub else Path(tmp) / "tree"
            work.mkdir(exist_ok=True)
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index"), "GIT_WORK_TREE": str(work)}
            self._run(["read-tree", "--", sha], env=env)
            listing = self._run(
                ["ls-files", "-s", "-z", *(["--", f"{sub}/"] if sub else [])], env=env
            )
            entries = []  # (mode, object, path)
            for line in listing.decode(errors="surrogateescape").split("\0"):
                meta, _, path = line.partition("\t")
                if path:
                    mode, obj, _stage = meta.split(" ")
                    entries.append((mode, obj, path))
            lfs = _LFS_ON if shutil.which("git-lfs") else _LFS_OFF
            paths = Path(tmp) / "paths"
            paths.write_bytes(
                b"".join(p.encode(errors="surrogateescape") + b"\0" for *_, p in entries)
            )
            try:
                with paths.open("rb") as stdin:
                    self._run(
                        ["checkout-index", "-f", "-z", "--stdin"],
                        config=["-c", "core.symlinks=true", *lfs],
                        env=env,
                        cwd=work,  # git wants to run inside the work tree it writes
                        stdin=stdin,
                        timeout=self.fetch_timeout,
                    )
            except _LfsObjectsMissing as exc:
                raise GitStallingError(
                    f"refused to build from commit {sha[:12]} of {self._name}: Git LFS object "
                    f"of {', '.join(exc.files[:10])} is not on the remote"
                    + (f" +{len(exc.files) - 10} more" if len(exc.files) > 10 else "")
                ) from None
            regular = [p for mode, _, p in entries if mode not in (_GITLINK, _SYMLINK)]
            if pointers := lfs_pointers(work, regular):
                why = (
                    "git-lfs could not replace them"
                    if lfs is _LFS_ON
                    else "git-lfs is not installed"
                )
                raise GitStallingError(
                    f"refused to build from commit {sha[:12]} of {self._name}: Git LFS files "
                    f"would be sent as pointer text ({why}): {', '.join(pointers[:10])}"
                    + (f" +{len(pointers) - 10} more" if len(pointers) > 10 else "")
                )
            gitlinks = [(obj, p) for mode, obj, p in entries if mode == _GITLINK]
            if gitlinks and self.submodules:
                self._place_submodules(sha, work, gitlinks, Path(tmp), depth=depth)
            if sub:
                dest.rmdir()
                confined(work, sub).rename(dest)

    def _place_submodules(
        self, sha: str, work: Path, gitlinks: list[tuple[str, str]], tmp: Path, *, depth: int
    ) -> None:
        """Export each gitlink's commit from the submodule's own mirror and move it into place."""
        if depth >= SUBMODULE_DEPTH:
            raise GitStallingError(
                f"submodules of {self._name} nest deeper than {SUBMODULE_DEPTH} levels"
            )
        if self.read_file(sha, ".gitmodules") is None:
            raise GitStallingError(
                f"commit {sha[:12]} of {self._name} has submodules but no .gitmodules"
            )
        listing = self._run(["config", "--blob", f"{sha}:.gitmodules", "-z", "--list"])
        modules = parse_gitmodules(listing.decode(errors="replace"))
        for i, (commit, path) in enumerate(gitlinks):
            module = modules.get(path)
            if module is None:
                raise GitStallingError(
                    f".gitmodules at {sha[:12]} of {self._name}: no url for submodule path {path!r}"
                )
            where = f".gitmodules at {sha[:12]} of {self._name}: submodule.{module.name}.url"
            url = submodule_url(self.url, module.url, where=where)
            mirror = self._submodule_mirror(module.name, url)
            staging = tmp / f"module-{i}"
            staging.mkdir()
            with _module_lock(mirror.path):
                mirror._fetch_commit(commit, f"submodule {path!r} of {self._name}")
                mirror._export(commit, staging, "", depth=depth + 1)
            target = confined(work, path)
            if target.is_dir() and not target.is_symlink():
                target.rmdir()  # the empty folder checkout-index made for the gitlink
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)

    def _submodule_mirror(self, name: str, url: str) -> Mirror:
        # Keyed by URL (credentials left out): a moved submodule gets a mirror of its own.
        key = hashlib.sha256(redact_url(url).encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:40].lstrip(".-") or "module"
        path = self.path.with_name(self.path.name + ".modules") / f"{safe}-{key}.git"
        return Mirror(url, path, timeout=self.timeout, fetch_timeout=self.fetch_timeout)

    def _fetch_commit(self, sha: str, what: str) -> None:
        """Make `sha` present: fetch it by name (protocol v2 and most hosts allow it), else all
        branches and tags; keep it under refs/pipeline/ so gc cannot drop it."""
        self._ensure_mirror()
        if self._has_commit(sha):
            return
        args = ["fetch", "--quiet", "--no-tags", "--no-recurse-submodules", "--no-write-fetch-head"]
        with contextlib.suppress(GitStallingError):
            self._run(
                [*args, "--", "origin", f"+{sha}:refs/pipeline/commits/{sha}"],
                timeout=self.fetch_timeout,
            )
        if not self._has_commit(sha):
            refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
            self._run([*args, "--", "origin", *refspecs], timeout=self.fetch_timeout)
        if not self._has_commit(sha):
            raise GitStallingError(f"{what}: commit {sha} not found in {self._name}")

    def commit_info(self, sha: str) -> CommitInfo:
        """Author, e-mail, subject and committer time (ISO 8601) of a commit in the mirror."""
        sha = self._require_commit(validate_sha(sha))
        fmt = "--format=%H%x00%an%x00%ae%x00%cI%x00%s"
        out = self._run(["log", "-1", "--no-show-signature", fmt, sha, "--"])
        full, author, email, when, subject = out.decode(errors="replace").rstrip("\n").split("\0")
        return CommitInfo(sha=full, author=author, email=email, subject=subject, committed_at=when)

    def is_ancestor(self, old: str, new: str) -> bool:
        """True when `old` is reachable from `new`; False too when `old` is not in the mirror."""
        old, new = validate_sha(old), self._require_commit(validate_sha(new))
        if not self._has_commit(old):
            return False
        code = self._run_status(["merge-base", "--is-ancestor", old, new], ok=(0, 1))
        return code == 0

    # -- internals ----------------------------------------------------------------------------

    @property
    def _name(self) -> str:
        return redact_url(self.url)

    def _scrub(self, text: str) -> str:
        # redact() masks URL credentials; the literal ones are masked too, since git and remote
        # helpers sometimes echo the user name or password without the URL around them.
        text = redact(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _ensure_mirror(self) -> None:
        if self._ready:
            return
        if not (self.path / "HEAD").is_file() or not (self.path / "objects").is_dir():
            # mode 0o700: the remote URL in the config may carry a token.
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._run(["init", "--bare", "--quiet", "--template=", "--", str(self.path)])
            # Old branch tips stay reachable through the reflog, so a force push does not let
            # gc drop the commit we last deployed before we have diffed against it.
            self._run(["config", "core.logAllRefUpdates", "always"])
            log.info("git.mirror_created", repo=self._name, path=str(self.path))
        current = self._run(["config", "--get", "remote.origin.url"], ok=(0, 1)).decode().strip()
        if current != self.url:
            self._run(["config", "--", "remote.origin.url", self.url])
        self._ready = True

    def _has_commit(self, sha: str) -> bool:
        return self._run_status(["cat-file", "-e", f"{sha}^{{commit}}"], ok=None) == 0

    def _require_commit(self, sha: str) -> str:
        if not self.path.is_dir() or not self._has_commit(sha):
            raise GitStallingError(
                f"commit {sha} is not in the mirror of {self._name}; fetch first"
            )
        return sha

    def _run(
        self,
        args: list[str],
        *,
        timeout: float | None = None,
        ok: tuple[int, ...] = (0,),
        stream: IO[bytes] | None = None,
        env: dict[str, str] | None = None,
        stdin: IO[bytes] | None = None,
        config: list[str] | None = None,
        cwd: Path | None = None,
    ) -> bytes:
        return self._execute(
            args,
            timeout=timeout,
            ok=ok,
            stream=stream,
            env=env,
            stdin=stdin,
            config=config,
            cwd=cwd,
        )[1]

    def _run_status(self, args: list[str], *, ok: tuple[int, ...] | None) -> int:
        return self._execute(args, timeout=None, ok=ok, stream=None)[0]

    def _execute(
        self,
        args: list[str],
        *,
        timeout: float | None,
        ok: tuple[int, ...] | None,
        stream: IO[bytes] | None,
        env: dict[str, str] | None = None,
        stdin: IO[bytes] | None = None,
        config: list[str] | None = None,
        cwd: Path | None = None,
    ) -> tuple[int, bytes]:
        argv = ["git", *_SAFE_CONFIG, *(config or []), *args]
        # GIT_DIR pins every command to this mirror, even if its directory vanished meanwhile
        # (GitPython would then fall back to the process cwd, possibly some other repository).
        base = _ENV if args[0] == "init" else {**_ENV, "GIT_DIR": str(self.path)}
        env = {**base, **(env or {})}
        started = time.monotonic()
        # GitPython is imported at the first git command, not with this module: reading a loose
        # ref (a rollback's repo head) needs none, and its import takes a rollback ~0.1-0.3 s.
        from git.cmd import Git
        from git.exc import GitCommandNotFound

        try:
            status, out, err = Git(cwd or self.path).execute(
                argv,
                with_extended_output=True,
                with_exceptions=False,
                stdout_as_string=False,
                strip_newline_in_stdout=False,
                kill_after_timeout=timeout,
                output_stream=cast(Any, stream),
                istream=cast(Any, stdin),
                env=env,
            )
        except GitCommandNotFound:
            raise GitStallingError("the git executable was not found on PATH") from None
        if ok is not None and status not in ok:
            # GitPython's watchdog kills git, then flags the kill: git can be reaped in between, and
            # the kill then reads as a plain signal death. A signal death at or past the timeout is
            # that kill, whatever stderr says.
            if timeout is not None and status < 0 and time.monotonic() - started >= timeout:
                err = "Timeout:"
            raise self._error(args[0], status, err, timeout)
        return status, out if isinstance(out, bytes) else b""

    def _error(self, op: str, status: int, stderr: str, timeout: float | None) -> GitError:
        where = f"of {self._name}" if op in ("ls-remote", "fetch") else f"in mirror {self.path}"
        if stderr.startswith("Timeout:"):
            return GitTransientError(f"git {op} {where} timed out after {timeout:g}s")
        if op == "checkout-index" and (files := lfs_objects_missing(stderr)):
            return _LfsObjectsMissing(files)
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        important = [ln for ln in lines if ln.startswith(("fatal:", "error:", "remote:"))]
        detail = self._scrub("; ".join(important or lines[-3:]))[:500] or "no output"
        kind: type[GitError] = GitStallingError if _STALLING.search(detail) else GitTransientError
        return kind(f"git {op} {where} failed (exit {status}): {detail}")


class _LfsObjectsMissing(GitStallingError):
    """A checkout stopped because the remote lacks the Git LFS object of `files`."""

    def __init__(self, files: list[str]) -> None:
        super().__init__(f"Git LFS object of {', '.join(files)} is not on the remote")
        self.files = files


def _module_lock(path: Path) -> threading.Lock:
    with _module_locks_guard:
        return _module_locks.setdefault(path, threading.Lock())
