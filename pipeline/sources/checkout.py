"""The rules of a faithful build context that need no git: submodule URLs, Git LFS pointers,
and the confinement of every write to the export directory.

`pipeline.sources.git.Mirror.export` checks a commit out with git itself and uses these to fetch
submodules (`.gitmodules` as `git config -z --list` prints it), to refuse LFS pointer text, and
to place a submodule's tree without ever writing through a symlink. No GitPython here.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.redact import redact_url
from pipeline.sources.refs import GitStallingError, validate_url

# https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md: a pointer is UTF-8 text under
# 1024 bytes whose first line is this version line, followed by `oid sha256:…` and `size …`.
LFS_POINTER_MAX = 1024
_LFS_VERSION = b"version https://git-lfs.github.com/spec/v1\n"
_LFS_REQUIRED = (b"\noid sha256:", b"\nsize ")

# What git and git-lfs 3.x print when the smudge filter cannot fetch an object: git names the
# file it stopped at (`fatal: PATH: smudge filter lfs failed`), git-lfs each file it tried
# (`Error downloading object: PATH (OID): ...`) and, when the remote has no such object,
# "remote missing object" (a file:// or ssh remote) or "Object does not exist on the server"
# (the HTTP batch API's 404, git-lfs docs/api/batch.md).
_LFS_FAILED = re.compile(r"^fatal: (.+): smudge filter lfs failed$", re.MULTILINE)
_LFS_DOWNLOADING = re.compile(r"^Error downloading object: (.+?) \([0-9a-f]+\):", re.MULTILINE)
_LFS_MISSING = re.compile(r"remote missing object|object does not exist on the server", re.I)

@dataclass(frozen=True)
class Submodule:
    """One `[submodule "NAME"]` of a `.gitmodules`: its name, tree path and URL as written."""

    name: str
    path: str
    url: str


def parse_gitmodules(listing: str) -> dict[str, Submodule]:
    """Submodules by path from `git config -z --list` output of a `.gitmodules` blob
    (entries `key\\nvalue\\0`); entries without both `path` and `url` are left out, as
    `git submodule update` skips them."""
    fields: dict[str, dict[str, str]] = {}
    for entry in listing.split("\0"):
        key, _, value = entry.partition("\n")
        if not key.startswith("submodule."):
            continue
        name, dot, var = key.removeprefix("submodule.").rpartition(".")
        if dot and var in ("path", "url"):
            fields.setdefault(name, {})[var] = value
    return {
        f["path"].strip("/"): Submodule(name, f["path"].strip("/"), f["url"])
        for name, f in fields.items()
        if f.get("path") and f.get("url")
    }


def _is_local(url: str) -> bool:
    return url.startswith(("/", "file://"))


def submodule_url(parent: str, url: str, *, where: str) -> str:
    """The URL to fetch a submodule from, as `git submodule update` resolves it (git-submodule(1)).

    `./x` and `../x` are relative to the parent's URL (each `../` drops one path component); a
    local path or `file://` URL is allowed only when the parent is itself local (git refuses
    `file` for submodules by default since 2.38.1, CVE-2022-39253); a URL on the parent's
    scheme, host and port without credentials of its own gets the parent's, so a token that
    reads the parent reads its submodules. Raise GitStallingError naming `where` (the
    `.gitmodules` key) when the URL cannot be resolved or is refused.
    """
    resolved = url
    if url.startswith(("./", "../")):
        prefix, sep, parts = _split_url(parent.rstrip("/"))
        rest = url
        while rest.startswith(("./", "../")):
            if rest.startswith("../"):
                if not parts:
                    raise GitStallingError(f"{where}: {url!r} climbs above {redact_url(parent)!r}")
                parts.pop()
            rest = rest.partition("/")[2]
        resolved = prefix + sep + "/".join([*parts, *([rest] if rest else [])])
    elif url.startswith("/"):
        resolved = f"file://{url}"
    if _is_local(resolved) and not _is_local(parent):
        raise GitStallingError(
            f"{where}: a local submodule URL {url!r} is allowed only for a local repository"
        )
    try:
        validate_url(resolved)
    except GitStallingError as exc:
        raise GitStallingError(f"{where}: {exc}") from None
    return _with_parent_credentials(parent, resolved)


def _split_url(url: str) -> tuple[str, str, list[str]]:
    # "https://host/a/b" -> ("https://host", "/", ["a", "b"]); "git@h:a/b" -> ("git@h:", "", …)
    if "://" in url:
        scheme, _, rest = url.partition("://")
        authority, _, path = rest.partition("/")
        return f"{scheme}://{authority}", "/", [p for p in path.split("/") if p]
    host, colon, path = url.partition(":")
    if colon and "/" not in host:
        return host + ":", "", [p for p in path.split("/") if p]
    return "", "/" if url.startswith("/") else "", [p for p in url.split("/") if p]


def _with_parent_credentials(parent: str, url: str) -> str:
    if "://" not in parent or "://" not in url:
        return url
    p, u = urlsplit(parent), urlsplit(url)
    if not (p.username or p.password) or u.username or u.password:
        return url
    if (p.scheme, p.hostname, p.port) != (u.scheme, u.hostname, u.port):
        return url
    userinfo = p.netloc.rpartition("@")[0]
    return urlunsplit((u.scheme, f"{userinfo}@{u.netloc}", u.path, u.query, u.fragment))


def lfs_pointers(root: Path, files: Iterable[str]) -> list[str]:
    """The `files` (paths relative to `root`) whose content is a Git LFS pointer, sorted; a
    symlink is never followed and only regular files under `LFS_POINTER_MAX` bytes are read."""
    found = []
    for name in files:
        path = root / name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_size >= LFS_POINTER_MAX:
            continue
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            head = f.read(LFS_POINTER_MAX)
        if head.startswith(_LFS_VERSION) and all(part in head for part in _LFS_REQUIRED):
            found.append(name)
    return sorted(found)


def confined(root: Path, relative: str) -> Path:
    """`root / relative` after checking that no existing component below `root` is a symlink
    or a non-directory (so a write there cannot land outside `root`); raise GitStallingError
    naming the path otherwise."""
    current = root
    parts = relative.split("/")
    for i, part in enumerate(parts):
        if part in ("", ".", ".."):
            raise GitStallingError(f"refused path {relative!r}: not a plain relative path")
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or (i < len(parts) - 1 and not stat.S_ISDIR(mode)):
            raise GitStallingError(f"refused to write {relative!r}: {part!r} is not a directory")
    return current


def lfs_objects_missing(stderr: str) -> list[str]:
    """The files (sorted) whose Git LFS object the remote does not have, read from the stderr
    of a checkout that failed in the LFS smudge filter; [] when it failed otherwise (also when
    git-lfs could not reach the remote: that is not a missing object)."""
    if not _LFS_MISSING.search(stderr):
        return []
    files = set(_LFS_FAILED.findall(stderr)) | set(_LFS_DOWNLOADING.findall(stderr))
    return sorted(files)
