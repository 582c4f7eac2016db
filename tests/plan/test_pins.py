"""The planner and pins, as a table: a service pinned by a rollback is left alone while its repo
is at the head it was pinned at, and released by any other commit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.config.load import parse
from pipeline.config.model import Config
from pipeline.plan.planner import (
    ImageRecord,
    RepoSnapshot,
    ServiceRecord,
    image_spec_hash,
    plan,
    service_spec_hash,
)
from pipeline.plan.rollback import PinRecord

OLD = "1" * 40  # built and deployed
HEAD = "2" * 40  # the head when the pin was made (its image was not rebuilt there)
NEW = "3" * 40  # a newer commit
PINNED_AT = "0" * 40  # the revision the rollback went back to
SINCE = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)

CONFIG = """
[hosts.h1]
docker = "unix:///var/run/docker.sock"
[repos.app]
url = "https://example.com/app.git"
[images.web]
repo = "app"
context = "web"
[images.api]
repo = "app"
context = "api"
[services.web]
image = "web"
hosts = ["h1"]
env = { GREETING = "%s" }
[services.api]
image = "api"
hosts = ["h1"]
"""
FILES = frozenset({"web/Dockerfile", "web/index.html", "api/Dockerfile", "api/main.py"})
NOTE = (
    f"pinned at {PINNED_AT[:12]} by rollback to r7 at 2026-03-01 12:30:05 UTC; a newer "
    "commit or `pipeline deploy web` releases it"
)


def _config(greeting: str) -> Config:
    return parse(CONFIG % greeting, Path("pipeline.toml")).model


def pin(head: str | None = HEAD) -> PinRecord:
    return PinRecord(PINNED_AT, 9, head, "rollback to r7", SINCE)


@dataclass(frozen=True)
class Case:
    id: str
    revision: str  # the snapshot of repo app
    changed: frozenset[str]  # OLD..revision
    pins: Mapping[str, PinRecord]
    rollouts: tuple[str, ...]
    unpin: tuple[str, ...] = ()
    problems: Mapping[str, str] = field(default_factory=dict)
    greeting: str = "three"  # the config now; "one" is what was deployed
    force: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None


CASES = [
    Case(
        "a pinned service is skipped although its definition changed",
        HEAD,
        frozenset(),
        {"web": pin()},
        (),
        problems={"services.web": NOTE},
    ),
    Case(
        "a pinned service is skipped when its image is rebuilt at the same head",
        HEAD,
        frozenset(),
        {"web": pin()},
        (),
        problems={"services.web": NOTE},
        force=("web",),
    ),
    Case(
        "the pin holds only its own service",
        HEAD,
        frozenset({"api/main.py"}),
        {"web": pin()},
        ("api",),
        problems={"services.web": NOTE},
    ),
    Case(
        "a newer commit changing its image releases the pin and rolls it out",
        NEW,
        frozenset({"web/index.html"}),
        {"web": pin()},
        ("web",),
        unpin=("web",),
    ),
    Case(
        "a newer commit that leaves its image alone still releases the pin",
        NEW,
        frozenset({"api/main.py"}),
        {"web": pin()},
        ("api", "web"),  # web: its definition changed while it was pinned
        unpin=("web",),
    ),
    Case(
        "released by a newer commit, an unchanged service is not rolled out",
        NEW,
        frozenset({"api/main.py"}),
        {"web": pin()},
        ("api",),
        unpin=("web",),
        greeting="one",
    ),
    Case(
        "a pin without a recorded head holds at its own revision",
        PINNED_AT,
        frozenset(),
        {"web": pin(head=None)},
        (),
        problems={"services.web": NOTE},
    ),
    Case(
        "a pass limited to other services leaves the pin in place",
        NEW,
        frozenset({"web/index.html", "api/main.py"}),
        {"web": pin()},
        ("api",),
        only=("api",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_pins(case: Case) -> None:
    """Each case plans exactly the expected rollouts, pin notes and released pins."""
    deployed, now = _config("one"), _config(case.greeting)
    images = {
        n: ImageRecord(OLD, f"sha256:{n}", image_spec_hash(i)) for n, i in deployed.images.items()
    }
    services = {
        n: ServiceRecord(OLD, f"sha256:{s.image}", service_spec_hash(s))
        for n, s in deployed.services.items()
    }
    snapshot = RepoSnapshot("app", case.revision, FILES, {OLD: case.changed}, {})
    result = plan(
        now,
        {"app": snapshot},
        images,
        services,
        pins=case.pins,
        force_images=case.force,
        only_services=case.only,
    )
    assert tuple(r.service for r in result.rollouts) == case.rollouts
    assert {p.subject: p.message for p in result.problems} == dict(case.problems)
    assert result.unpin == case.unpin
