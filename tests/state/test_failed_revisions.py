"""`State.failed_revisions` reads the release rows and decides with the state's own clock."""

from __future__ import annotations

from pathlib import Path

from pipeline.state.store import State

A, B = "a" * 40, "b" * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _release(state: State, revision: str, status: str, kind: str | None) -> None:
    rel = state.start_release("web", revision, "sha256:x", "r@sha256:x", "spec", kind="deploy",
                              reason="test", run_id=None)
    state.finish_release(rel, status, "it failed", failure_kind=kind)  # type: ignore[arg-type]


def test_infrastructure_failure_waits_out_its_backoff_on_the_state_clock(tmp_path: Path) -> None:
    """After an infrastructure failure the revision waits 30 s of the state's clock, then not."""
    clock = Clock()
    state = State.in_dir(tmp_path, clock=clock)
    _release(state, A, "succeeded", None)
    _release(state, B, "rolled_back", "infrastructure")
    clock.now += 29
    blocked = state.failed_revisions(["web"])["web"]
    assert blocked.revision == B and blocked.until == 1_000_030.0
    assert blocked.failure_kind == "infrastructure" and "retrying after" in blocked.why
    clock.now += 1
    assert state.failed_revisions(["web"]) == {}
    _release(state, B, "rolled_back", "infrastructure")  # the retry failed too: 60 s now
    clock.now += 59
    assert state.failed_revisions(["web"])["web"].until == clock.now + 1


def test_rows_without_a_kind_are_application_failures(tmp_path: Path) -> None:
    """A rolled-back release written before failure kinds (NULL) keeps its revision out."""
    clock = Clock()
    state = State.in_dir(tmp_path, clock=clock)
    _release(state, B, "rolled_back", None)
    clock.now += 86400
    blocked = state.failed_revisions(["web", "api"])
    assert list(blocked) == ["web"] and blocked["web"].until is None
    assert blocked["web"].spec_hash == "spec"


def test_infrastructure_retries_keep_their_until_once_it_has_passed(tmp_path: Path) -> None:
    """`infrastructure_retries` names an infrastructure-failed revision and its `until` before
    and after that time, and leaves out application failures and retried revisions."""
    clock = Clock()
    state = State.in_dir(tmp_path, clock=clock)
    _release(state, B, "rolled_back", "infrastructure")
    assert state.infrastructure_retries(["web"])["web"].until == 1_000_030.0
    clock.now += 3600
    retry = state.infrastructure_retries(["web"])["web"]
    assert retry.revision == B and retry.until == 1_000_030.0
    _release(state, B, "succeeded", None)
    assert state.infrastructure_retries(["web"]) == {}
    _release(state, A, "rolled_back", "unhealthy")
    assert state.infrastructure_retries(["web"]) == {}
