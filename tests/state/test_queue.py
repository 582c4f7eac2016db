"""The durable event queue on a real SQLite state database."""

from __future__ import annotations

import threading
from datetime import UTC
from pathlib import Path

import pytest

from pipeline.state.queue import EventQueue
from pipeline.state.store import State


@pytest.fixture
def state(tmp_path: Path) -> State:
    """A fresh state database in tmp_path."""
    return State.in_dir(tmp_path / "data")


@pytest.fixture
def queue(state: State) -> EventQueue:
    return EventQueue(state)


def test_put_commits_before_returning(tmp_path: Path, queue: EventQueue) -> None:
    """An event put is visible to another connection (another process) as soon as put returns."""
    event_id, created = queue.put(source="webhook", kind="push", repo="app", sha="a" * 40)
    other = EventQueue(State.in_dir(tmp_path / "data"))
    assert created
    assert [e["id"] for e in other.recent()] == [event_id]
    assert other.depth() == 1


def test_put_refuses_an_unknown_kind(queue: EventQueue) -> None:
    """A kind outside push/tag/rebuild/deploy/rollback/config is a programming error."""
    with pytest.raises(ValueError, match="unknown event kind"):
        queue.put(source="api", kind="explode")


def test_duplicate_delivery_returns_the_existing_event(queue: EventQueue) -> None:
    """The same (source, delivery id) twice queues once and returns the first event's id."""
    first = queue.put(source="webhook", kind="push", repo="app", delivery_id="d-1")
    again = queue.put(source="webhook", kind="push", repo="app", delivery_id="d-1")
    other_source = queue.put(source="poll", kind="push", repo="app", delivery_id="d-1")
    assert again == (first[0], False)
    assert other_source[1] is True
    assert queue.depth() == 2


def test_dedupe_under_a_race_stores_one_row(tmp_path: Path) -> None:
    """Threads on separate connections putting one delivery id store one row and agree on its id."""
    queues = [EventQueue(State.in_dir(tmp_path / "data")) for _ in range(4)]
    results: list[tuple[int, bool]] = []
    barrier = threading.Barrier(16)

    def send(q: EventQueue) -> None:
        barrier.wait()
        results.append(q.put(source="webhook", kind="push", repo="app", delivery_id="same"))

    threads = [threading.Thread(target=send, args=(queues[i % 4],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    assert len({event_id for event_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert queues[0].depth() == 1


def test_claim_coalesces_pushes_of_one_repo(queue: EventQueue) -> None:
    """Ten pushes of one repo come back from one claim, oldest first, all marked working."""
    ids = [
        queue.put(source="webhook", kind="push", repo="app", sha=f"{i:040x}")[0] for i in range(10)
    ]
    other = queue.put(source="webhook", kind="push", repo="other")[0]
    claimed = queue.claim("host:1")
    assert [e.id for e in claimed] == ids
    assert claimed[-1].sha == f"{9:040x}"
    assert claimed[0].received_at.tzinfo == UTC
    assert queue.depth() == 1
    assert [e.id for e in queue.claim("host:1")] == [other]
    assert queue.claim("host:1") == []


def test_claim_takes_deploys_one_at_a_time(queue: EventQueue) -> None:
    """Deploy, rollback and rebuild events do not coalesce with pushes or with each other."""
    deploy = queue.put(source="api", kind="deploy", repo="app", subject="web")[0]
    push = queue.put(source="webhook", kind="push", repo="app")[0]
    rollback = queue.put(source="api", kind="rollback", repo="app", subject="web")[0]
    push2 = queue.put(source="poll", kind="push", repo="app")[0]
    assert [e.id for e in queue.claim("w")] == [deploy]
    queue.finish([deploy], "done")
    assert [e.id for e in queue.claim("w")] == [push, push2]
    queue.finish([push, push2], "done")
    assert [(e.id, e.kind) for e in queue.claim("w")] == [(rollback, "rollback")]


def test_claim_skips_a_repo_another_worker_is_working_on(queue: EventQueue) -> None:
    """While one instance works on a repo's event, another instance's claim takes the next
    repo's event instead, so a repo never has two passes (two builds of one commit) at once."""
    first = queue.put(source="webhook", kind="push", repo="app", sha="1" * 40)[0]
    assert [e.id for e in queue.claim("host:1")] == [first]
    later = queue.put(source="webhook", kind="push", repo="app", sha="2" * 40)[0]
    other = queue.put(source="webhook", kind="push", repo="other")[0]
    assert [e.id for e in queue.claim("host:2")] == [other]
    assert queue.claim("host:2") == []
    queue.finish([first], "done")
    assert [e.id for e in queue.claim("host:2")] == [later]
    config = queue.put(source="watch", kind="config")[0]
    assert queue.claim("host:1") == []  # a config pass covers every repo: it waits for later
    queue.finish([later, other], "done")
    assert [e.id for e in queue.claim("host:1")] == [config]
    queue.put(source="webhook", kind="push", repo="app")
    assert queue.claim("host:2") == []  # and every repo's pass waits for it


def test_concurrent_claims_never_share_an_event(tmp_path: Path) -> None:
    """Two workers on separate connections claiming at once never both get the same event."""
    first = EventQueue(State.in_dir(tmp_path / "data"))
    for i in range(40):
        first.put(source="api", kind="deploy", repo=f"r{i}", subject=f"s{i}")
    workers = [EventQueue(State.in_dir(tmp_path / "data")) for _ in range(2)]
    got: list[int] = []
    lock = threading.Lock()

    def work(q: EventQueue, owner: str) -> None:
        while batch := q.claim(owner):
            with lock:
                got.extend(e.id for e in batch)
            q.finish([e.id for e in batch], "done")

    threads = [threading.Thread(target=work, args=(q, f"h:{n}")) for n, q in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 41))


def test_finish_records_status_run_and_note(queue: EventQueue) -> None:
    """finish closes events with a final status, the run id and a note, and frees the owner."""
    ids = [queue.put(source="webhook", kind="push", repo="app")[0] for _ in range(2)]
    queue.claim("w")
    queue.finish(ids[:1], "superseded", run_id=7, note="a newer push")
    queue.finish(ids[1:], "done", run_id=7)
    rows = {e["id"]: e for e in queue.recent()}
    assert rows[ids[0]]["status"] == "superseded"
    assert rows[ids[0]]["note"] == "a newer push"
    assert rows[ids[1]]["status"] == "done"
    assert rows[ids[1]]["run_id"] == 7
    assert rows[ids[1]]["owner"] is None
    assert rows[ids[1]]["finished_at"] is not None
    with pytest.raises(ValueError, match="final status"):
        queue.finish(ids, "queued")


def test_requeue_interrupted_returns_a_dead_owners_events(queue: EventQueue) -> None:
    """Events left working by a dead owner go back to queued; a live owner's stay working."""
    dead = queue.put(source="webhook", kind="push", repo="app")[0]
    queue.claim("host:111")
    live = queue.put(source="webhook", kind="push", repo="other")[0]
    queue.claim("host:222")
    assert queue.depth() == 0
    assert queue.requeue_interrupted(lambda owner: owner == "host:222") == 1
    assert queue.depth() == 1
    assert [e.id for e in queue.claim("host:333")] == [dead]
    statuses = {e["id"]: (e["status"], e["owner"]) for e in queue.recent()}
    assert statuses[live] == ("working", "host:222")


def test_newer_waiting_sees_only_later_pushes_of_the_repo(queue: EventQueue) -> None:
    """newer_waiting is true only for a queued push/tag of the same repo with a higher id."""
    first = queue.put(source="webhook", kind="push", repo="app")[0]
    queue.claim("w")
    assert not queue.newer_waiting("app", first)
    queue.put(source="api", kind="deploy", repo="app", subject="web")
    queue.put(source="webhook", kind="push", repo="other")
    assert not queue.newer_waiting("app", first)
    second = queue.put(source="webhook", kind="tag", repo="app", ref="refs/tags/v2")[0]
    assert queue.newer_waiting("app", first)
    assert not queue.newer_waiting("app", second)


def test_a_deferred_event_is_claimed_only_when_due(tmp_path: Path) -> None:
    """An event put off until a time is not claimed before it (nor does it hold back events
    queued after it), and is claimed again, as it was, from then on."""
    now = [1_800_000_000.0]
    queue = EventQueue(State.in_dir(tmp_path / "data", clock=lambda: now[0]))
    waiting = queue.put(source="webhook", kind="push", repo="app", sha="c" * 40)[0]
    assert [e.id for e in queue.claim("w")] == [waiting]
    queue.defer(waiting, now[0] + 4.0, "waiting for announced commit cccccccccccc")
    assert queue.next_due_in() == pytest.approx(4.0)
    other = queue.put(source="webhook", kind="push", repo="other")[0]
    assert [e.id for e in queue.claim("w")] == [other]
    assert queue.claim("w") == []
    row = queue.recent()[1]
    assert (row["id"], row["status"], row["owner"]) == (waiting, "queued", None)
    assert row["note"] == "waiting for announced commit cccccccccccc" and row["not_before"]
    now[0] += 4.0
    assert queue.next_due_in() == 0.0
    claimed = queue.claim("w")
    assert [(e.id, e.sha) for e in claimed] == [(waiting, "c" * 40)]
    assert queue.next_due_in() is None and queue.recent()[1]["not_before"] is None


def test_a_newer_push_claims_the_deferred_one_with_it(queue: EventQueue) -> None:
    """A newer push of the repo is claimed at once together with the deferred push before it,
    so the newest one supersedes the wait, as coalescing does."""
    waiting = queue.put(source="webhook", kind="push", repo="app", sha="c" * 40)[0]
    queue.claim("w")
    queue.defer(waiting, 4_000_000_000.0, "waiting")
    newer = queue.put(source="webhook", kind="push", repo="app", sha="d" * 40)[0]
    assert [e.id for e in queue.claim("w")] == [waiting, newer]
