"""Choosing the release a rollback goes to, pure, over a service's release rows; and the pin
that holds a service there afterwards (the planner reads it).

The succeeded releases form a stack of states the service went through: a deploy pushes its
release; a rollback returns to the release it restored and drops what lay above it. The
release deployed now is a position in that stack, and a rollback goes one below it, so a
second rollback goes two back instead of returning to what the first one left. Positions are
release ids (a rollback counts as the release it restored), never digests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pipeline.errors import ConfigError, StallingError

_RELEASE_ID = re.compile(r"^r(\d+)$", re.IGNORECASE)


class NoRollbackTarget(StallingError):
    """No release fits the rollback asked for; the message names the service and why."""


def refused_as_bad_input(exc: BaseException, to: str | None) -> bool:
    """Whether the error a rollback stopped on is the user's input (README: exit 2): a bad
    config, or a `to` naming no release of the service. With no `to`, having nothing earlier
    to go back to is not the user's input. One rule for the command and for `pipeline serve`
    doing the rollback it was handed."""
    return isinstance(exc, ConfigError) or (to is not None and isinstance(exc, NoRollbackTarget))


@dataclass(frozen=True)
class PastRelease:
    """One release of a service as the chooser needs it (a row of `history`)."""

    id: int
    kind: str  # deploy|rollback
    status: str  # succeeded|failed|rolled_back|superseded|interrupted|running
    revision: str
    digest: str = ""
    ref: str = ""
    restores: int | None = None  # a rollback: the release it brought back


@dataclass(frozen=True)
class PinRecord:
    """A service held on a release after a rollback, until its repo's head is another commit
    than `head` (the head when the pin was made) or `pipeline deploy` removes it."""

    revision: str  # the revision it is pinned at
    release_id: int  # the release that put it there
    head: str | None  # head commit of the image's repo at pin time (None: unknown, `revision`)
    reason: str  # e.g. "rollback to r42"
    since: datetime


def choose_rollback(
    service: str,
    releases: Sequence[PastRelease],
    current: int | None,
    to: str | None = None,
) -> PastRelease:
    """The release `service` goes back to, from its `releases` (any order) and the id of the
    release deployed now (`current`, from the deployments; None: the newest state).

    Without `to`: the succeeded release below the current one in the stack of states. With
    `to`: `r42` is release 42; plain digits are a release id when the service has that
    release (an error when they also start a different release's revision); anything else is
    a revision prefix, the newest succeeded release at it. The result is never a rollback row
    but the release it restored. Raises NoRollbackTarget with a message naming the service.
    """
    by_id = {r.id: r for r in releases}
    origin = _origins(sorted(releases, key=lambda r: r.id))
    here = origin.get(current) if current is not None else None
    if current is not None and here is None and current in by_id:
        here = by_id[current]  # a release that did not succeed (cut short): itself
    if to:
        return _chosen(service, to, releases, by_id, origin, here)
    stack = _stack(sorted(releases, key=lambda r: r.id), origin)
    if here is None and stack:
        here = stack[-1]
    if here is not None and here in stack:
        below = stack[: stack.index(here)]
    else:
        below = [r for r in stack if here is None or r.id < here.id]
    if not below:
        at = f"; it runs r{here.id} at {here.revision[:12]}" if here is not None else ""
        raise NoRollbackTarget(f"service {service}: no earlier succeeded release to go back to{at}")
    return below[-1]


def _origins(releases: Sequence[PastRelease]) -> dict[int, PastRelease]:
    """Each succeeded release's origin: itself for a deploy, the restored release's origin for
    a rollback. A rollback recorded before rollbacks named what they restored is matched to the
    newest earlier deploy of the same revision and digest (the only trace it left)."""
    origin: dict[int, PastRelease] = {}
    for r in releases:  # oldest first: a rollback restores an older release
        if r.status != "succeeded":
            continue
        if r.kind != "rollback":
            origin[r.id] = r
        elif r.restores is not None and r.restores in origin:
            origin[r.id] = origin[r.restores]
        else:
            same = [
                o
                for i, o in origin.items()
                if i < r.id and o.revision == r.revision and o.digest == r.digest
            ]
            origin[r.id] = max(same, key=lambda o: o.id) if same else r
    return origin


def _stack(releases: Sequence[PastRelease], origin: dict[int, PastRelease]) -> list[PastRelease]:
    """The states the service went through that were not rolled back from, oldest first."""
    stack: list[PastRelease] = []
    for r in releases:
        if r.id not in origin:
            continue
        state = origin[r.id]
        if r.kind == "rollback" and state in stack:
            del stack[stack.index(state) + 1 :]
        else:
            stack.append(state)
    return stack


def _chosen(
    service: str,
    to: str,
    releases: Sequence[PastRelease],
    by_id: dict[int, PastRelease],
    origin: dict[int, PastRelease],
    here: PastRelease | None,
) -> PastRelease:
    """The release `--to` names (see `choose_rollback`)."""
    named = _RELEASE_ID.match(to)
    release_id = int(named.group(1)) if named else int(to) if to.isdigit() else None
    prefix = None if named else to.lower()
    newest_first = sorted({o.id: o for o in origin.values()}.values(), key=lambda o: -o.id)
    at_prefix = (
        [o for o in newest_first if o.revision.startswith(prefix)] if prefix is not None else []
    )
    if release_id is not None and release_id in by_id:
        row = by_id[release_id]
        if any(o.id != origin.get(row.id, row).id for o in at_prefix):
            raise NoRollbackTarget(
                f"service {service}: {to!r} is both release r{release_id} and a revision prefix; "
                f"write r{release_id} for the release or a longer revision prefix"
            )
        if row.id not in origin:
            raise NoRollbackTarget(
                f"service {service}: release r{row.id} did not succeed ({row.status}); "
                "only a succeeded release can be rolled back to"
            )
        chosen = origin[row.id]
        if here is not None and chosen.id == here.id:
            raise NoRollbackTarget(
                f"service {service}: release r{row.id} is what it runs now; nothing to roll back"
            )
        return chosen
    if named:
        raise NoRollbackTarget(f"service {service}: it has no release r{release_id}")
    others = [o for o in at_prefix if here is None or o.id != here.id]
    if others:
        return others[0]
    if at_prefix:
        raise NoRollbackTarget(
            f"service {service}: it runs revision {to!r} now (r{at_prefix[0].id}) and has no "
            "other succeeded release at it"
        )
    raise NoRollbackTarget(f"service {service}: no succeeded release at revision {to!r}")
