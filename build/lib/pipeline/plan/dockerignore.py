"""Docker's `.dockerignore` semantics (moby/patternmatcher, as `docker build` applies them).

One pattern a line; a line starting with `#` in column 1 is a comment; lines are trimmed and
cleaned like Go's `filepath.Clean`, a leading `/` dropped. Globs are Go's `filepath.Match`
(`*` and `?` stop at `/`, `[...]` classes negated by `^`, `\\` escapes) plus `**` for any number
of directories. A pattern matches a path when it matches the path or one of its parent
directories; `!` re-includes; the last matching line decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import StallingError

_BOM = "\ufeff"


class DockerIgnoreError(StallingError):
    """A `.dockerignore` line Docker itself would refuse (bad glob, a bare `!`)."""


def go_clean(path: str) -> str:
    """Go's `filepath.Clean` on a `/`-separated path (unlike `posixpath.normpath` for `//x`)."""
    if not path:
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    joined = "/".join(parts)
    if rooted:
        return "/" + joined
    return joined or "."


@dataclass(frozen=True)
class _Group:
    """Consecutive lines of one polarity, compiled to a single alternation."""

    exclusion: bool  # True for `!` lines: a match re-includes
    regex: re.Pattern[str]


class DockerIgnore:
    """A compiled `.dockerignore`; `excludes(path)` says whether `docker build` leaves it out."""

    __slots__ = ("_groups", "patterns")

    def __init__(self, patterns: list[str]) -> None:
        """Compile cleaned patterns (as `from_text` yields them, `!` prefix for exceptions)."""
        self.patterns = tuple(patterns)
        groups: list[tuple[bool, list[str]]] = []
        for pattern in patterns:
            exclusion = pattern.startswith("!")
            body = pattern[1:] if exclusion else pattern
            if not body:
                raise DockerIgnoreError(f'illegal exclusion pattern: "{pattern}"')
            regex = _translate(body)
            if groups and groups[-1][0] == exclusion:
                groups[-1][1].append(regex)
            else:
                groups.append((exclusion, [regex]))
        # Scanned last-to-first: the first group that matches is the last matching line.
        self._groups = tuple(
            _Group(exclusion, re.compile("|".join(f"(?:{r})" for r in regexes)))
            for exclusion, regexes in reversed(groups)
        )

    @classmethod
    def from_text(cls, text: str) -> DockerIgnore:
        """Parse `.dockerignore` text; raise DockerIgnoreError on a line Docker would refuse."""
        patterns: list[str] = []
        for number, raw in enumerate(text.removeprefix(_BOM).splitlines(), start=1):
            if raw.startswith("#"):
                continue
            line = raw.strip()
            if not line:
                continue
            invert = line.startswith("!")
            if invert:
                line = line[1:].strip()
            if line:
                line = go_clean(line)
                if len(line) > 1 and line.startswith("/"):
                    line = line[1:]
            pattern = "!" + line if invert else line
            try:
                cls([pattern])
            except DockerIgnoreError as exc:
                raise DockerIgnoreError(f"line {number}: {exc}") from None
            patterns.append(pattern)
        return cls(patterns)

    def excludes(self, path: str) -> bool:
        """Whether `path` (relative to the context root, `/`-separated) is left out."""
        if not self._groups:
            return False
        parts = path.split("/")
        if "" in parts or "." in parts or ".." in parts:
            path = go_clean(path).lstrip("/")
            parts = path.split("/")
        candidates = [path]
        prefix = ""
        for part in parts[:-1]:
            prefix = f"{prefix}/{part}" if prefix else part
            candidates.append(prefix)
        for group in self._groups:
            fullmatch = group.regex.fullmatch
            for candidate in candidates:
                if fullmatch(candidate):
                    return not group.exclusion
        return False

    def excludes_all_under(self, directory: str) -> bool:
        """Whether nothing at or below `directory` (context-relative) is sent: it is excluded and
        no `!` line could re-include a path under it (Docker walks into an excluded directory
        when one might). Used for a submodule, whose files the planner does not list."""
        if not self.excludes(directory):
            return False
        below = directory.rstrip("/") + "/"
        for pattern in self.patterns:
            if pattern.startswith("!"):
                literal = re.split(r"[*?\[\\]", pattern[1:], maxsplit=1)[0]
                if literal.startswith(below) or below.startswith(literal):
                    return False
        return True


def _translate(pattern: str) -> str:
    """A regex (for `fullmatch`) equivalent to one cleaned pattern, as moby compiles it."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1  # `**/` behaves as `**`
                # At the end `**` takes anything; elsewhere any run of whole directories.
                out.append(".*" if i >= n else "(?:.*/)?")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            if i + 1 >= n:
                raise DockerIgnoreError(f"bad pattern {pattern!r}: trailing backslash")
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch == "[":
            regex, i = _translate_class(pattern, i)
            out.append(regex)
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _translate_class(pattern: str, start: int) -> tuple[str, int]:
    """Translate the `[...]` class at `start`; return its regex and the index after `]`."""
    i, n = start + 1, len(pattern)
    negated = i < n and pattern[i] == "^"
    if negated:
        i += 1
    ranges: list[str] = []

    def char(at: int) -> tuple[str, int]:
        if at >= n:
            raise DockerIgnoreError(f"bad pattern {pattern!r}: unterminated '['")
        c = pattern[at]
        if c == "\\":
            if at + 1 >= n:
                raise DockerIgnoreError(f"bad pattern {pattern!r}: unterminated '['")
            return pattern[at + 1], at + 2
        if c in "-]":
            raise DockerIgnoreError(f"bad pattern {pattern!r}: misplaced {c!r} in class")
        return c, at + 1

    while True:
        if i >= n:
            raise DockerIgnoreError(f"bad pattern {pattern!r}: unterminated '['")
        if pattern[i] == "]" and ranges:
            break
        lo, i = char(i)
        if i < n and pattern[i] == "-":
            hi, i = char(i + 1)
            if hi < lo:
                raise DockerIgnoreError(f"bad pattern {pattern!r}: range {lo}-{hi} runs backwards")
            ranges.append(f"{re.escape(lo)}-{re.escape(hi)}")
        else:
            ranges.append(re.escape(lo))
    return "[" + ("^" if negated else "") + "".join(ranges) + "]", i + 1
