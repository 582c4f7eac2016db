"""Which repository a delivery is about, compared with the repository a repo section follows.

Organisation webhooks (GitHub), system hooks (GitLab) and system webhooks (Gitea) send the
pushes of every repository to one URL, so a delivery must name this repo's repository to be
acted on. Pure functions over strings: the names a delivery gives (`PushEvent.repository`:
clone URLs, `owner/name`), the section's `url` and its optional `webhook_repository`.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

# scp-like ssh, as git reads it: [user@]host:path, where the host part has no slash.
_SCP = re.compile(r"^(?:[^@/\s]+@)?(?P<host>[^:/\s]+):(?P<path>(?!/).+)$")


@dataclass(frozen=True)
class RepositoryName:
    """A repository as a comparable key: `host` (lowercase, no port or credentials; None for a
    bare `owner/name` or a local path) and `path` (lowercase, no slashes at the ends, no
    `.git`). `local` is True for a local path or `file://` URL, which names no hosted repo."""

    host: str | None
    path: str
    local: bool = False


def repository_name(text: str) -> RepositoryName | None:
    """Read a clone URL (`https://`, `ssh://`, `git://`, scp-like `git@host:owner/name.git`), a
    local path, or a full name (`owner/name`, `group/sub/name`) as a RepositoryName; None when
    the text names nothing (empty). Scheme, credentials, port, `.git` and case are dropped,
    as hosting services treat them (GitHub, GitLab and Gitea names are case-insensitive)."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("/"):
        return RepositoryName(None, _path(text), local=True)
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme.lower() == "file" or not parts.hostname:
            return RepositoryName(None, _path(parts.path), local=True)
        return RepositoryName(parts.hostname.lower(), _path(parts.path))
    scp = _SCP.match(text)
    if scp:
        return RepositoryName(scp["host"].lower(), _path(scp["path"]))
    return RepositoryName(None, _path(text))


def _path(path: str) -> str:
    path = urllib.parse.unquote(path).strip().strip("/").lower()
    path = path.removesuffix(".git").rstrip("/")
    return path


def same_repository(url: str, webhook_repository: str | None, names: Sequence[str]) -> bool | None:
    """Whether a delivery naming `names` is about the repository of a repo section (its `url`
    and optional `webhook_repository`); None when they cannot be compared.

    - With `webhook_repository` ("owner/name"), it decides: True when it equals one of the
      names (a full name, a path with namespace, or the path of a clone URL).
    - Else the `url` is compared with the names' URLs on the same host: True when one has the
      same path. When none is on that host (a mirror, an ssh host alias) or the url is a local
      path, they cannot be compared: None (the caller accepts, as before names were read).
    - A delivery that names no repository (a ping, pipeline's generic form): None.
    """
    given = [n for n in (repository_name(t) for t in names) if n is not None and n.path]
    if not given:
        return None
    if webhook_repository:
        wanted = repository_name(webhook_repository)
        return wanted is not None and any(n.path == wanted.path for n in given)
    own = repository_name(url)
    if own is None or own.local or own.host is None:
        return None
    on_host = [n.path for n in given if n.host == own.host]
    if not on_host:
        return None
    return own.path in on_host
