"""Pure checks and orderings for git inputs: URLs, ref names, shas, paths and tag versions.

No GitPython here (only `pipeline.sources.git` talks to git); every refusal is a `GitStallingError`
whose message names the offending value, with any credentials in a URL redacted.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pipeline.errors import PipelineError, StallingError, TransientError
from pipeline.redact import redact_url

ALLOWED_SCHEMES = frozenset({"https", "http", "ssh", "git", "file"})
_SCP_LIKE = re.compile(r"(?:[A-Za-z0-9._~+-]+@)?(?P<host>\[[^\]/]+\]|[A-Za-z0-9._-]+):(?P<path>.+)")
HEX_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a full SHA-1 or SHA-256 object name
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


class GitError(PipelineError):
    """A git operation failed; the message names the (redacted) URL or mirror, never credentials."""


class GitTransientError(GitError, TransientError):
    """Network or remote trouble (refused, timed out, 5xx): worth retrying later."""


class GitStallingError(GitError, StallingError):
    """Bad URL, ref, path or credentials, or a missing object: retrying will not help."""


def validate_ref_name(name: str) -> str:
    """Return a branch name that satisfies `git check-ref-format --branch`, else raise GitError."""
    problem = _ref_problem(name, glob=False)
    if problem:
        raise GitStallingError(f"invalid branch name {name[:200]!r}: {problem}")
    return name


def validate_sha(sha: str) -> str:
    """Return a full SHA-1 (40) or SHA-256 (64) hex object name, lowercased, else raise GitError."""
    lowered = sha.strip().lower() if isinstance(sha, str) else ""
    if not HEX_SHA.fullmatch(lowered):
        raise GitStallingError(f"invalid commit sha {str(sha)[:100]!r}: want 40 or 64 hex digits")
    return lowered


def _ref_problem(name: str, *, glob: bool) -> str | None:
    # Rules from git-check-ref-format(1); globs may additionally use *, ? and [].
    checked = re.sub(r"[*?\[\]]", "x", name) if glob else name
    if not checked:
        return "empty"
    if checked.startswith("-"):
        return "starts with '-'"
    if checked == "@" or checked == "HEAD":
        return f"{checked!r} is reserved"
    if m := _REF_FORBIDDEN.search(checked):
        return f"contains forbidden character {m.group()!r}"
    if ".." in checked or "@{" in checked:
        return "contains '..' or '@{'"
    if checked.startswith("/") or checked.endswith("/") or "//" in checked:
        return "empty path component"
    if checked.endswith("."):
        return "ends with '.'"
    for part in checked.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return f"component {part!r} starts with '.' or ends with '.lock'"
    return None


def validate_url(url: str) -> str:
    """Return `url` when git may fetch it: an allowed scheme with a host, or scp-like
    `user@host:path`; no option-like parts, no transport helpers. Else raise GitStallingError
    naming the (redacted) URL."""

    def refuse(why: str) -> GitStallingError:
        return GitStallingError(f"refused git URL {redact_url(url)[:200]!r}: {why}")

    if not url or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        raise refuse("empty or contains whitespace/control characters")
    if url.startswith("-"):
        raise refuse("starts with '-'")
    if m := re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url):
        scheme = m.group(1).lower()
        if scheme not in ALLOWED_SCHEMES:
            raise refuse(f"scheme {scheme!r} is not one of {sorted(ALLOWED_SCHEMES)}")
        authority = url[m.end() :].split("/", 1)[0]
        host = authority.rpartition("@")[2]
        if authority.startswith("-") or host.startswith("-") or (scheme != "file" and not host):
            raise refuse("missing or invalid host")
        return url
    if "::" in url:
        raise refuse("transport helpers ('<helper>::') are not allowed")
    scp = _SCP_LIKE.fullmatch(url)
    if scp and not scp.group("host").startswith("-") and not scp.group("path").startswith("-"):
        return url
    raise refuse("want https://, http://, ssh://, git://, file:// or user@host:path")


def clean_path(path: str, what: str) -> str:
    """`path` relative to the repository root, without leading/trailing slashes or "./"; raise
    GitStallingError naming `what` when it is empty or holds "..", "." or a NUL."""
    cleaned = path.strip("/")
    while cleaned.startswith("./"):
        cleaned = cleaned[2:]
    parts = cleaned.split("/")
    if not cleaned or any(p in ("", ".", "..") for p in parts) or "\x00" in cleaned:
        raise GitStallingError(
            f"invalid {what} {path[:200]!r}: want a relative path inside the repo"
        )
    return cleaned


def tag_version(tag: str) -> str:
    """The version a release tag names: "v1.2.0" -> "1.2.0"; other tags unchanged."""
    return tag[1:] if tag[:1] in ("v", "V") and tag[1:2].isdigit() else tag


def _version_key(tag: str) -> tuple[Any, ...]:
    """Order tags like versions: 1.10.0 > 1.9.0 > 1.9.0-rc1; the name breaks ties."""

    def parts(text: str) -> tuple[tuple[int, int, str], ...]:
        # Numbers compare numerically; words sort after numbers, as in semver pre-releases.
        return tuple(
            (0, int(p), "") if p.isdigit() else (1, 0, p)
            for p in re.findall(r"\d+|[^\W\d_]+", text)
        )

    core, _, pre = tag_version(tag).split("+", 1)[0].partition("-")
    return (parts(core), (1, ()) if not pre else (0, parts(pre)), tag)


def newest_tag(names: list[str], pattern: str) -> str | None:
    """The highest version among the tag `names` matching the glob `pattern`; None if none."""
    matching = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return max(matching, key=_version_key) if matching else None


def check_target(branch: str | None, tags: str | None) -> tuple[str | None, str | None]:
    """(branch, None) or (None, tags glob), each checked; raise GitStallingError unless exactly
    one is given and it is a valid ref name or glob."""
    if (branch is None) == (tags is None):
        raise GitStallingError("follow exactly one of a branch or a tags glob")
    if branch is not None:
        return validate_ref_name(branch), None
    assert tags is not None
    problem = _ref_problem(tags, glob=True)
    if problem:
        raise GitStallingError(f"invalid tags glob {tags[:200]!r}: {problem}")
    return None, tags
