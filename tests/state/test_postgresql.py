"""The state database on a real PostgreSQL server (a throwaway cluster, `pg` fixture): the
migration chain, claims, leases, instances and schedule slots shared by several instances."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pg_helpers import PASSWORD, PgServer
from sqlalchemy import inspect

from pipeline.config.load import parse
from pipeline.state import migrate
from pipeline.state.cluster import INSTANCE_TTL
from pipeline.state.database import DatabaseError, database_url, open_state
from pipeline.state.queue import EventQueue
from pipeline.state.store import State


def test_migrations_build_the_schema_on_postgresql(pg_url: str) -> None:
    """The whole Alembic chain runs on PostgreSQL: a new database ends at the newest revision
    with every table, and opening it again migrates nothing."""
    state = State(pg_url)
    with state.engine.connect() as conn:
        assert migrate.current(conn) == migrate.HEAD
        tables = set(inspect(conn).get_table_names())
    assert {"runs", "releases", "release_hosts", "events", "locks", "instances"} <= tables
    assert {"schedule_slots", "pins", "release_settings"} <= tables
    state.engine.dispose()
    State(pg_url).engine.dispose()


def test_two_instances_claim_each_event_once_and_one_pass_per_repo(pg_url: str) -> None:
    """Two instances claiming from one PostgreSQL queue at once get every event exactly once,
    and never work on one repo at the same time."""
    writer = EventQueue(State(pg_url))
    for i in range(40):
        writer.put(source="webhook", kind="push", repo=f"repo{i % 4}", delivery_id=f"d{i}")
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    overlaps: list[str] = []
    working: dict[str, str] = {}
    lock = threading.Lock()

    def work(owner: str) -> None:
        queue = EventQueue(State(pg_url))
        while batch := queue.claim(owner):
            repo = batch[-1].repo or ""
            with lock:
                if repo in working:
                    overlaps.append(repo)
                working[repo] = owner
            claimed[owner] += [e.id for e in batch]
            with lock:
                del working[repo]
            queue.finish([e.id for e in batch], "done")

    threads = [threading.Thread(target=work, args=(o,)) for o in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed["a"] + claimed["b"]) == list(range(1, 41))
    assert not set(claimed["a"]) & set(claimed["b"])
    assert overlaps == []
    # A redelivery to the other instance is recognised: nothing new is queued.
    assert writer.put(source="webhook", kind="push", repo="repo0", delivery_id="d0")[1] is False


def test_a_lease_has_one_holder_across_instances(pg_url: str) -> None:
    """A service's lease is held by one instance at a time; another takes it once it expires."""
    now = [1000.0]
    first, second = State(pg_url, clock=lambda: now[0]), State(pg_url, clock=lambda: now[0])
    assert first.leases.acquire("service:web", "a:1", ttl=9)
    assert not second.leases.acquire("service:web", "b:1", ttl=9)
    now[0] += 9.5
    assert second.leases.acquire("service:web", "b:1", ttl=9)


def test_a_schedule_slot_fires_on_one_instance_per_interval(pg_url: str) -> None:
    """Each interval's slot of a poll is claimed by exactly one of three instances, however
    many ticks they make in it; the next interval's slot is free again."""
    now = [10_000.0]
    states = [State(pg_url, clock=lambda: now[0]) for _ in range(3)]
    wins = [s.cluster.claim_slot("poll:shop", 5, f"i:{n}") for n, s in enumerate(states)]
    wins += [s.cluster.claim_slot("poll:shop", 5, f"i:{n}") for n, s in enumerate(states)]
    assert wins.count(True) == 1
    now[0] += 5
    assert [s.cluster.claim_slot("poll:shop", 5, "i:x") for s in states].count(True) == 1


def test_an_instance_silent_too_long_is_dead(pg_url: str) -> None:
    """Instances are listed with their last heartbeat; one silent for longer than INSTANCE_TTL
    counts as dead (its work is taken over), a beating one as alive."""
    now = [50_000.0]
    state = State(pg_url, clock=lambda: now[0])
    state.cluster.heartbeat("far-away:1", "http://10.0.0.1:8700")
    state.cluster.heartbeat("far-away:2", None)
    now[0] += INSTANCE_TTL - 1
    state.cluster.heartbeat("far-away:2", None)
    now[0] += 2
    alive = state.cluster.owner_alive()
    assert (alive("far-away:1"), alive("far-away:2")) == (False, True)
    listed = {i["owner"]: i for i in state.cluster.instances()}
    assert listed["far-away:1"]["alive"] is False
    assert (listed["far-away:2"]["heartbeat_age"], listed["far-away:2"]["alive"]) == (2, True)


def test_database_url_takes_its_password_from_the_environment(
    pg: PgServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`[pipeline] database` with `database_password_env` opens PostgreSQL with that password;
    a wrong one fails with the URL shown, its password masked."""
    name = pg.create_database()
    text = (
        f'[pipeline]\ndatabase = "{pg.url(name, password=False).replace("+psycopg", "")}"\n'
        'database_password_env = "PIPELINE_TEST_PG_PASSWORD"\n'
    )
    loaded = parse(text, tmp_path / "pipeline.toml")
    monkeypatch.setenv("PIPELINE_TEST_PG_PASSWORD", PASSWORD)
    assert database_url(loaded).drivername == "postgresql+psycopg"
    state = open_state(loaded)
    with state.engine.connect() as conn:
        assert migrate.current(conn) == migrate.HEAD
    state.engine.dispose()
    monkeypatch.setenv("PIPELINE_TEST_PG_PASSWORD", "wrong-password-123")
    with pytest.raises(DatabaseError) as err:
        open_state(loaded)
    assert "postgresql+psycopg://pipeline:***@127.0.0.1" in str(err.value)
    assert "wrong-password-123" not in str(err.value)
