"""The service's retry timers, on a real state with its clock injected and timers faked: which
services get one, when, and the one event each queues."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import msgspec
import pytest

from pipeline.config.load import parse
from pipeline.config.model import Config
from pipeline.service.retries import Retrier
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

A, B, C = "a" * 40, "b" * 40, "c" * 40
T0 = 1_000_000.0

CONFIG = """
[repos.shop]
url = "/srv/git/shop.git"

[repos.prod]
url = "/srv/git/shop.git"
tags = "v*"

[hosts.h1]
docker = "tcp://127.0.0.1:1"

[images.web]
repo = "shop"

[images.api]
repo = "shop"

[images.site]
repo = "prod"

[services.web]
image = "web"
hosts = ["h1"]

[services.api]
image = "api"
hosts = ["h1"]

[services.site]
image = "site"
hosts = ["h1"]
"""


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeTimers:
    """Timers that fire only when the test says so; `armed` counts every `retry_at`."""

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[float, Callable[[], None]]] = {}
        self.armed = 0

    def retry_at(self, key: str, when: float, fire: Callable[[], None]) -> None:
        self.waiting[key] = (when, fire)
        self.armed += 1

    def cancel_retry(self, key: str) -> None:
        self.waiting.pop(key, None)

    def retries(self) -> dict[str, float]:
        return {key: when for key, (when, _) in self.waiting.items()}

    def fire(self, key: str) -> None:
        _, fire = self.waiting.pop(key)
        fire()


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.state = State.in_dir(tmp_path, clock=self.clock)
        self.queue = EventQueue(self.state)
        self.timers = FakeTimers()
        self.config: Config = parse(CONFIG, tmp_path / "pipeline.toml").model
        self.woken = 0
        self.retrier = Retrier(
            state=self.state,
            queue=self.queue,
            timers=self.timers,
            config=lambda: self.config,
            wake=self._wake,
        )

    def _wake(self) -> None:
        self.woken += 1

    def release(self, service: str, revision: str, status: str, kind: str | None) -> None:
        rel = self.state.start_release(
            service, revision, "sha256:x", "r@sha256:x", "spec", kind="deploy",
            reason="test", run_id=None,
        )  # fmt: skip
        self.state.finish_release(rel, status, "it failed", failure_kind=kind)  # type: ignore[arg-type]

    def retry_events(self) -> list[dict[str, object]]:
        return [e for e in reversed(self.queue.recent(100)) if e["source"] == "retry"]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_an_infrastructure_failure_queues_one_retry_of_its_repo_at_until(setup: Setup) -> None:
    """A revision that failed for an infrastructure reason gets one timer at its `until`, kept
    (not re-armed) by later passes, whose firing queues exactly one push of its repo."""
    setup.release("web", A, "succeeded", None)
    setup.release("web", B, "rolled_back", "infrastructure")
    setup.clock.now += 5
    setup.retrier.sync()
    setup.retrier.sync()  # another pass before the backoff ends
    assert setup.timers.retries() == {"web": T0 + 30}
    assert setup.timers.armed == 1
    assert setup.retry_events() == []

    setup.clock.now = T0 + 30
    setup.timers.fire("web")
    (event,) = setup.retry_events()
    assert event["kind"] == "push" and event["repo"] == "shop" and event["sha"] == B
    assert event["ref"] == "refs/heads/main" and event["status"] == "queued"
    assert datetime.fromisoformat(str(event["received_at"])).timestamp() == T0 + 30
    assert setup.woken == 1

    # Passes after the retry was queued (before or without its rollout) arm nothing more.
    setup.retrier.sync()
    setup.retrier.sync()
    assert setup.timers.retries() == {} and len(setup.retry_events()) == 1


def test_a_timer_fired_twice_queues_its_retry_once(setup: Setup) -> None:
    """The same wait fired again (a timer re-armed by a racing pass, or after a restart) queues
    nothing more: the event's delivery id names the revision and its backoff."""
    setup.release("web", B, "rolled_back", "infrastructure")
    setup.retrier.sync()
    (_, fire) = setup.timers.waiting["web"]
    setup.clock.now = T0 + 30
    fire()
    fire()
    fresh = Retrier(
        state=setup.state,
        queue=setup.queue,
        timers=setup.timers,
        config=lambda: setup.config,
        wake=lambda: None,
    )  # a restarted service: its timer fires at once, since `until` has passed
    fresh.sync()
    setup.timers.fire("web")
    assert len(setup.retry_events()) == 1


def test_application_failures_get_no_retry(setup: Setup) -> None:
    """Unhealthy and crashed revisions wait for a newer commit: no timer, no event."""
    setup.release("web", B, "rolled_back", "unhealthy")
    setup.release("api", C, "failed", "crashed")
    setup.clock.now += 3600
    setup.retrier.sync()
    assert setup.timers.retries() == {}
    assert setup.retry_events() == []


def test_a_failed_retry_rearms_at_its_longer_backoff(setup: Setup) -> None:
    """When the retried rollout fails for an infrastructure reason again, the next timer waits
    60 s after that failure, and fires a second, distinct event."""
    setup.release("web", B, "rolled_back", "infrastructure")
    setup.retrier.sync()
    setup.clock.now = T0 + 30
    setup.timers.fire("web")
    setup.clock.now = T0 + 40
    setup.release("web", B, "rolled_back", "infrastructure")
    setup.retrier.sync()
    assert setup.timers.retries() == {"web": T0 + 100}
    setup.clock.now = T0 + 100
    setup.timers.fire("web")
    assert [e["sha"] for e in setup.retry_events()] == [B, B]


def test_timers_follow_the_services_that_still_wait(setup: Setup) -> None:
    """A tag-following repo's service is retried by a tag event; a timer whose service was
    deployed meanwhile, or left the config, is cancelled."""
    setup.release("web", B, "rolled_back", "infrastructure")
    setup.release("site", C, "failed", "infrastructure")
    setup.retrier.sync()
    assert setup.timers.retries() == {"web": T0 + 30, "site": T0 + 30}
    setup.release("web", A, "succeeded", None)  # a newer push landed before the backoff ended
    setup.config = msgspec.structs.replace(
        setup.config, services={k: v for k, v in setup.config.services.items() if k != "site"}
    )
    setup.retrier.sync()
    assert setup.timers.retries() == {}
    setup.config = parse(CONFIG, Path("pipeline.toml")).model
    setup.retrier.sync()
    setup.clock.now = T0 + 30
    setup.timers.fire("site")
    (event,) = setup.retry_events()
    assert event["kind"] == "tag" and event["repo"] == "prod" and event["ref"] is None


def test_a_queued_retry_is_not_a_newer_commit(setup: Setup) -> None:
    """The worker's "newer commit waiting" check leaves retry events out, so a retry queued
    during a rollout (a `pipeline deploy` of an older revision) does not supersede it."""
    running, _ = setup.queue.put(source="api", kind="deploy", repo="shop", subject="web", sha=A)
    setup.release("web", B, "rolled_back", "infrastructure")
    setup.retrier.sync()
    setup.clock.now = T0 + 30
    setup.timers.fire("web")
    assert setup.queue.waiting_shas("shop", running) == [B]
    assert setup.queue.waiting_shas("shop", running, ignore_source="retry") == []
