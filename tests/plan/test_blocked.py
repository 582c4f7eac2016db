"""Which revision a service keeps out, why and until when, as a table over release rows; and
how the planner reports it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.config.load import parse
from pipeline.plan.blocked import Blocked, ReleaseFact, blocked_revision, infrastructure_backoff
from pipeline.plan.planner import ImageRecord, RepoSnapshot, ServiceRecord, plan, service_spec_hash

T0 = datetime(2026, 11, 29, 21, 2, 35, tzinfo=UTC).timestamp()
A, B, C = "a" * 40, "b" * 40, "c" * 40
UNTIL_NEWER = "waiting for a newer commit or `pipeline deploy`"


def rel(
    revision: str,
    status: str,
    failure_kind: str | None = None,
    *,
    at: float = T0,
    kind: str = "deploy",
) -> ReleaseFact:
    return ReleaseFact(revision, f"sha256:{revision[:4]}", "spec", kind, status, failure_kind, at)


def infra(revision: str, at: float = T0) -> ReleaseFact:
    return rel(revision, "rolled_back", "infrastructure", at=at)


@dataclass(frozen=True)
class Case:
    name: str
    releases: list[ReleaseFact]  # newest first
    now: float
    blocked: str | None  # the revision kept out, or None
    until: float | None = None
    why: str | None = None  # a part of Blocked.why


CASES = [
    Case("a service never released keeps nothing out", [], T0, None),
    Case("a revision that succeeded last keeps nothing out", [rel(B, "succeeded")], T0, None),
    Case(
        "an unhealthy revision waits for a newer commit",
        [rel(B, "rolled_back", "unhealthy"), rel(A, "succeeded")],
        T0 + 86400,
        B,
        why=f"failed its health check; {UNTIL_NEWER}",
    ),
    Case(
        "a crashed revision waits for a newer commit",
        [rel(B, "rolled_back", "crashed")],
        T0 + 86400,
        B,
        why=f"crashed (its container exited); {UNTIL_NEWER}",
    ),
    Case(
        "a rollback recorded before failure kinds (NULL) is an application failure",
        [rel(B, "rolled_back")],
        T0 + 86400,
        B,
        why=f"failed before; {UNTIL_NEWER}",
    ),
    Case(
        "a failure recorded before failure kinds (NULL) is an application failure",
        [rel(B, "failed")],
        T0 + 86400,
        B,
        why=f"failed before; {UNTIL_NEWER}",
    ),
    Case(
        "an infrastructure failure waits 30 s, and says until when",
        [infra(B), rel(A, "succeeded", at=T0 - 600)],
        T0 + 10,
        B,
        until=T0 + 30,
        why="failed for an infrastructure reason at 21:02:35 UTC (1 in a row); "
        "retrying after 21:03:05 UTC",
    ),
    Case(
        "an infrastructure failure is retried once its 30 s are over",
        [infra(B)],
        T0 + 30,
        None,
    ),
    Case(
        "a second infrastructure failure in a row waits 60 s",
        [infra(B), infra(B, at=T0 - 40)],
        T0 + 59,
        B,
        until=T0 + 60,
        why="(2 in a row)",
    ),
    Case(
        "a second infrastructure failure in a row is retried after 60 s",
        [infra(B), infra(B, at=T0 - 40)],
        T0 + 60,
        None,
    ),
    Case(
        "the backoff is capped at 10 minutes",
        [infra(B, at=T0 - i) for i in range(9)],
        T0 + 599,
        B,
        until=T0 + 600,
        why="(9 in a row)",
    ),
    Case(
        "failures of another revision do not count toward the backoff",
        [infra(C), infra(B), infra(B)],
        T0 + 31,
        None,
    ),
    Case(
        "an earlier application failure of the revision does not lengthen the backoff",
        [infra(B), rel(B, "rolled_back", "unhealthy")],
        T0 + 20,
        B,
        until=T0 + 30,
    ),
    Case(
        "an interrupted rollout (recorded by a restart, kind NULL) gets a fresh attempt",
        [rel(B, "interrupted"), rel(A, "succeeded")],
        T0,
        None,
    ),
    Case(
        "an interrupted rollout (kind recorded) gets a fresh attempt",
        [rel(B, "rolled_back", "interrupted")],
        T0,
        None,
    ),
    Case(
        "a second interrupted attempt in a row is an application failure",
        [rel(B, "interrupted"), rel(B, "rolled_back", "interrupted")],
        T0 + 86400,
        B,
        why=f"was interrupted 2 times in a row; {UNTIL_NEWER}",
    ),
    Case(
        "interrupted attempts of two revisions are one each",
        [rel(C, "interrupted"), rel(B, "interrupted")],
        T0,
        None,
    ),
    Case(
        "a manual rollback keeps the revision it left out",
        [rel(A, "succeeded", kind="rollback"), rel(B, "succeeded"), rel(A, "succeeded")],
        T0 + 86400,
        B,
        why=f"was rolled back by hand; {UNTIL_NEWER}",
    ),
    Case(
        "a rollback with no deploy before it keeps nothing out",
        [rel(A, "succeeded", kind="rollback")],
        T0,
        None,
    ),
    Case(
        "running and superseded releases are not attempts",
        [rel(C, "running"), rel(C, "superseded"), rel(B, "rolled_back", "unhealthy")],
        T0,
        B,
        why="failed its health check",
    ),
    Case(
        "a commit that never appeared on the remote keeps nothing out",
        [rel(C, "failed", "never_appeared"), rel(B, "succeeded")],
        T0,
        None,
    ),
    Case(
        "a commit that never appeared hides no failure before it",
        [rel(C, "failed", "never_appeared"), rel(B, "rolled_back", "unhealthy")],
        T0,
        B,
        why="failed its health check",
    ),
    Case(
        "a newer success after failures keeps nothing out",
        [rel(C, "succeeded"), rel(B, "rolled_back", "unhealthy")],
        T0,
        None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_blocked_revision(case: Case) -> None:
    """Each case's releases keep the expected revision out, until the expected time, saying why."""
    got = blocked_revision(case.releases, case.now)
    if case.blocked is None:
        assert got is None
        return
    assert got is not None
    assert got.revision == case.blocked
    assert got.until == case.until
    assert case.why is None or case.why in got.why, got.why


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(1, 30), (2, 60), (3, 120), (4, 240), (5, 480), (6, 600), (50, 600)],
)
def test_infrastructure_backoff_doubles_to_ten_minutes(failures: int, seconds: float) -> None:
    """30 s after the first infrastructure failure in a row, doubling, capped at 10 minutes."""
    assert infrastructure_backoff(failures) == seconds


CONFIG = """
[hosts.h1]
docker = "unix:///var/run/docker.sock"
[repos.app]
url = "https://example.com/app.git"
[images.web]
repo = "app"
context = "web"
[services.web]
image = "web"
hosts = ["h1"]
"""


def _plan(blocked: Blocked | None) -> tuple[list[str], list[str]]:
    """Plan converging `web` (deployed at A) on its image's current build at B."""
    cfg = parse(CONFIG, Path("pipeline.toml")).model
    spec = service_spec_hash(cfg.services["web"])
    snapshot = RepoSnapshot("app", B, frozenset({"web/Dockerfile"}), {B: frozenset()}, {})
    result = plan(
        cfg,
        {"app": snapshot},
        {"web": ImageRecord(B, "sha256:b", "x")},
        {"web": ServiceRecord(A, "sha256:a", spec)},
        failed={"web": blocked} if blocked else {},
    )
    return [r.revision for r in result.rollouts], [p.message for p in result.problems]


def test_planner_says_why_a_revision_waits() -> None:
    """A blocked revision is not rolled out and the plan's note says why and until when."""
    cfg = parse(CONFIG, Path("pipeline.toml")).model
    spec = service_spec_hash(cfg.services["web"])
    waiting = blocked_revision([infra(B)], T0 + 5)
    assert waiting is not None
    waiting = Blocked(B, "sha256:b", spec, waiting.why, waiting.until, "infrastructure")
    assert _plan(waiting) == (
        [],
        [f"revision {B[:12]} failed for an infrastructure reason at 21:02:35 UTC (1 in a row); "
         "retrying after 21:03:05 UTC (`pipeline deploy` retries now)"],
    )
    unhealthy = Blocked(B, "sha256:b", spec, f"failed its health check; {UNTIL_NEWER}")
    assert _plan(unhealthy) == ([], [f"revision {B[:12]} failed its health check; {UNTIL_NEWER}"])
    assert _plan(None) == ([B], [])
