"""Rollouts as tables: the pure step plan, and the rollout against an engine double with a
fault at every step on either host, of every kind, including a crash (kill -9) followed by
recovery from the records. Fast: no Docker, no sleeping (the clock moves when code sleeps)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rollout_double import KINDS, Clock, Crash, Fault, World, probe_for, spec_of

from pipeline.config.model import HealthSection, HostSection, ServiceSection
from pipeline.deploy.failures import HostFailed, Interrupted, RolloutFailed, failure_of
from pipeline.deploy.recovery import fresh_attempt_due, recover_interrupted
from pipeline.deploy.rollout import Rollout, Target
from pipeline.deploy.steps import (
    HostSteps,
    plan_rollout,
    reached_by_phase,
    recovery_action,
    undo_for,
)
from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.engine import EngineError
from pipeline.state.leases import LeaseLost
from pipeline.state.store import State

HOSTS = ("h1", "h2")
OLD, NEW = "a" * 40, "b" * 40
OLD_IMAGE, NEW_IMAGE = f"reg/web@sha256:{'a' * 64}", f"reg/web@sha256:{'b' * 64}"
DEAD = "crashed-host:1"  # the owner of the runs in these tests: dead once it crashed
TERMINAL = {"succeeded", "rolled_back", "failed", "superseded", "interrupted"}


# -- the pure plan ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "max_parallel", "pull", "running", "batches"),
    [
        ("stop-first", 1, True, {"h1": True, "h2": True},
         [[("h1", "pull stop start health switch")], [("h2", "pull stop start health switch")]]),
        ("stop-first", 1, False, {"h1": True, "h2": False},
         [[("h1", "stop start health switch")], [("h2", "start health switch")]]),
        ("start-first", 1, True, {"h1": True, "h2": True},
         [[("h1", "pull start health switch")], [("h2", "pull start health switch")]]),
        ("stop-first", 2, True, {"h1": True, "h2": True},
         [[("h1", "pull stop start health switch"), ("h2", "pull stop start health switch")]]),
        ("stop-first", 5, False, {},
         [[("h1", "start health switch"), ("h2", "start health switch")]]),
    ],
)  # fmt: skip
def test_plan_lists_each_hosts_steps_in_batches(
    strategy: str, max_parallel: int, pull: bool, running: dict[str, bool], batches: Any
) -> None:
    """The plan is data: per host pull (with a registry), stop (stop-first with a running
    container), start, health, switch; hosts in batches of max_parallel; retire on all."""
    plan = plan_rollout(
        HOSTS, strategy=strategy, max_parallel=max_parallel, pull=pull, previous_running=running
    )
    assert plan.batches == tuple(
        tuple(HostSteps(h, tuple(steps.split())) for h, steps in batch) for batch in batches
    )
    assert plan.retire == HOSTS


def test_a_proxied_service_never_stops_the_old_container_before_its_route_moves() -> None:
    """A proxied service's hosts start the new container beside the old one, check it, route
    the proxy to it and only then record it; no step stops the old one."""
    plan = plan_rollout(HOSTS, strategy="stop-first", max_parallel=1, pull=True,
                        previous_running={"h1": True, "h2": True}, proxied=True)  # fmt: skip
    assert [hs.steps for batch in plan.batches for hs in batch] == [
        ("pull", "start", "health", "route", "switch")
    ] * 2
    assert undo_for(("pull", "start", "health", "route")) == ("route_back", "remove_new")


@pytest.mark.parametrize("switch_back", [False, True])
def test_a_rollback_to_retained_containers_moves_every_host_at_once(switch_back: bool) -> None:
    """A proxied rollback that only switches back to retained containers is one batch of every
    host whatever max_parallel says; any other rollout keeps its batches of max_parallel."""
    plan = plan_rollout(HOSTS, strategy="stop-first", max_parallel=1, pull=False,
                        previous_running={"h1": True, "h2": True}, proxied=True,
                        switch_back=switch_back)  # fmt: skip
    assert [[hs.host for hs in batch] for batch in plan.batches] == (
        [["h1", "h2"]] if switch_back else [["h1"], ["h2"]]
    )


@pytest.mark.parametrize(
    ("reached", "undos"),
    [
        ("pull", ""),
        ("pull stop", "start_previous"),
        ("pull stop start", "remove_new start_previous"),
        ("pull stop start health switch", "restore_record remove_new start_previous"),
        ("start health", "remove_new"),
    ],
)
def test_undo_reverses_the_steps_reached(reached: str, undos: str) -> None:
    """A host's undo is the undo of each step it reached, last step first."""
    assert undo_for(tuple(reached.split())) == tuple(undos.split())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("phase", "reached"),
    [
        ("planned", "pull stop start"),
        ("pulled", "pull stop start"),
        ("stopped_old", "pull stop start"),
        ("started", "pull stop start health"),
        ("checked", "pull stop start health route switch"),
        ("routed", "pull stop start health route switch"),
        ("switched", "pull stop start health route switch"),
        ("retired", ""),
        ("undone", ""),
    ],
)
def test_recovery_assumes_the_next_step_may_have_run(phase: str, reached: str) -> None:
    """After a crash, a host at a phase may also have done the next steps up to the next one
    every plan has (pull, stop and route are optional), so recovery undoes those too."""
    assert reached_by_phase(phase) == tuple(reached.split())


@pytest.mark.parametrize(
    ("phases", "action"),
    [
        ({"h1": "checked", "h2": "switched"}, "finish"),
        ({"h1": "retired", "h2": "switched"}, "finish"),
        ({"h1": "switched", "h2": "started"}, "undo"),
        ({"h1": "switched", "h2": "planned"}, "undo"),
        ({"h1": "undone", "h2": "switched"}, "undo"),
        ({}, "undo"),
    ],
)
def test_recovery_finishes_only_when_every_host_passed(phases: dict[str, str], action: str) -> None:
    """A crashed rollout is finished only when every host had passed its check."""
    assert recovery_action(phases) == action


@pytest.mark.parametrize(
    ("exc", "kind", "status"),
    [
        (HostFailed("h1", "pull", EngineError("registry down")), "infrastructure", "rolled_back"),
        (HostFailed("h1", "stop", StallingError("refused")), "infrastructure", "rolled_back"),
        (HostFailed("h1", "health", RolloutFailed("404", "unhealthy")), "unhealthy",
         "rolled_back"),
        (HostFailed("h1", "health", RolloutFailed("exit 3", "crashed")), "crashed",
         "rolled_back"),
        (HostFailed("h2", "start", RuntimeError("bug")), "infrastructure", "rolled_back"),
        (HostFailed("h2", "pull", Interrupted("stop"), before=True), "interrupted",
         "superseded"),
        (HostFailed("h2", "pull", LeaseLost("lost"), before=True), "infrastructure",
         "rolled_back"),
        (KeyboardInterrupt(), "interrupted", "interrupted"),
        (PipelineError("host h2 unreachable"), "infrastructure", "rolled_back"),
    ],
)  # fmt: skip
def test_failure_kind_is_decided_from_the_errors_declared_kind(
    exc: BaseException, kind: str, status: str
) -> None:
    """One function decides what a failed rollout records, from the error's declared kind."""
    failure = failure_of(exc)
    assert (failure.kind, failure.status) == (kind, status)
    assert failure.message


@dataclass
class _Rel:
    id: int
    service: str
    revision: str
    status: str
    kind: str = "deploy"
    digest: str = ""
    spec_hash: str = ""
    failure_kind: str | None = None
    started_at: datetime = datetime(2026, 11, 29, tzinfo=UTC)
    finished_at: datetime | None = None


@pytest.mark.parametrize(
    ("releases", "interrupted", "due"),
    [
        ([_Rel(2, "web", NEW, "interrupted"), _Rel(1, "web", OLD, "succeeded")], 2, True),
        ([_Rel(3, "web", NEW, "rolled_back"), _Rel(2, "web", NEW, "interrupted")], 2, False),
        ([_Rel(3, "web", NEW, "interrupted"), _Rel(2, "web", NEW, "interrupted")], 3, False),
        ([_Rel(3, "api", NEW, "succeeded"), _Rel(2, "web", NEW, "interrupted")], 2, True),
        ([_Rel(2, "web", NEW, "succeeded")], 2, False),
    ],
)
def test_an_interrupted_revision_gets_one_fresh_attempt(
    releases: list[Any], interrupted: int, due: bool
) -> None:
    """An interruption earns one fresh attempt: none when one was already made since, none
    for a revision interrupted twice."""
    assert fresh_attempt_due(releases, interrupted) is due


# -- the rollout against the engine double ------------------------------------------------


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated state database, copied for each test (migrating costs more than a test)."""
    folder = tmp_path_factory.mktemp("template")
    State.in_dir(folder).engine.dispose()  # closing checkpoints the WAL into the file
    return folder / "state.db"


class FaultyState(State):
    """The state, with `set_deployment` (the switch step) going through the world's faults."""

    world: World

    def set_deployment(self, service: str, host: str, **kwargs: Any) -> None:
        def perform() -> None:
            State.set_deployment(self, service, host, **kwargs)

        self.world.call(host, "set_deployment", perform)


@dataclass
class Bed:
    """One test's world: doubles of two hosts, a state database, the old revision running."""

    world: World
    clock: Clock
    path: Path
    state: FaultyState
    before: dict[str, str]
    run_id: int

    def open_state(self) -> FaultyState:
        state = FaultyState(f"sqlite:///{self.path}")
        state.world = self.world
        return state

    def rollout(self, state: State | None = None, **spec: Any) -> Rollout:
        spec.setdefault("ports", ["18080:8080"])
        service = ServiceSection(
            image="web",
            hosts=list(HOSTS),
            stop_timeout=1,
            health=HealthSection(http="/health", interval=0.5, timeout=3),
            **spec,
        )
        return Rollout(
            state=state or self.state,
            service="web",
            spec=service,
            hosts={h: HostSection(docker=f"tcp://{h}:2375") for h in HOSTS},
            engines={h: self.world.engine(h) for h in HOSTS},  # type: ignore[misc]
            sleep=self.clock.sleep,
            clock=self.clock,
            should_stop=lambda: self.world.stop_requested,
            probe_for=probe_for(self.world),
        )

    def roll(self, rollout: Rollout | None = None) -> Any:
        target = Target(NEW, "sha256:new", dict.fromkeys(HOSTS, NEW_IMAGE), "spec-new", pull=True)
        return (rollout or self.rollout()).run(
            target,
            run_id=self.run_id,
            lease=self.world.lease,  # type: ignore[arg-type]
        )


@pytest.fixture
def bed(tmp_path: Path, template_db: Path) -> Iterator[Bed]:
    path = tmp_path / "state.db"
    shutil.copy(template_db, path)
    world, clock = World(), Clock()
    state = FaultyState(f"sqlite:///{path}")
    state.world = world
    old_release = state.start_release("web", OLD, "sha256:old", OLD_IMAGE, "spec-old",
                                      kind="deploy", reason="first", run_id=None)  # fmt: skip
    state.finish_release(old_release, "succeeded")
    before = {}
    for h in HOSTS:
        info = world.engine(h).add(spec_of("web", OLD, old_release, OLD_IMAGE))
        State.set_deployment(state, "web", h, revision=OLD, digest="sha256:old", ref=OLD_IMAGE,
                             spec_hash="spec-old", container_id=info.id,
                             release_id=old_release)  # fmt: skip
        before[h] = info.id
    run_id = state.start_run("cli", owner=DEAD)
    yield Bed(world, clock, path, state, before, run_id)
    state.engine.dispose()


class _Runner:
    """What `recover_interrupted` needs of a Runner, over a fresh state (the restarted process)."""

    def __init__(self, bed: Bed) -> None:
        self.state = bed.open_state()
        self.owner = "restarted-host:2"
        self.bed = bed
        self.cfg = type("Cfg", (), {"services": {"web": None}})()

    def rollout_executor(self, service: str) -> Rollout:
        return self.bed.rollout(self.state)


def recover(bed: Bed) -> State:
    """Restart after a crash: recovery runs on a fresh state, as the next process would."""
    bed.world.restart()
    runner = _Runner(bed)
    recover_interrupted(runner, lambda owner: owner != DEAD)  # type: ignore[arg-type]
    return runner.state


def assert_invariants(bed: Bed, state: State, allowed_kinds: set[str]) -> str:
    """One revision everywhere; every host back on its running old container, or all on the
    new one; no new container left after a failure; release and run terminal; nothing retried
    in a loop. Returns the release's status."""
    releases = state.releases("web")
    assert len(releases) == 2, [(r.id, r.status) for r in releases]  # one attempt, no loop
    rel = releases[0]
    assert rel.status in TERMINAL, rel.status
    running = bed.world.running("web")
    deployed = {d.host: d.container_id for d in state.deployments()}
    if rel.status == "succeeded":
        for h in HOSTS:
            assert [c.image for c in running[h]] == [NEW_IMAGE], (h, running[h])
            assert deployed[h] == running[h][0].id
        assert rel.failure_kind is None
    else:
        for h in HOSTS:
            assert [c.id for c in running[h]] == [bed.before[h]], (h, running[h], rel.error)
            assert deployed[h] == bed.before[h]
            left = [c for c in bed.world.hosts[h].boxes.values() if c.image == NEW_IMAGE]
            assert not left, (h, left)
        assert rel.error, rel
        assert rel.failure_kind in allowed_kinds, (rel.failure_kind, rel.error)
    steps = state.steps(bed.run_id)
    assert not [s for s in steps if s.status == "running"], [(s.kind, s.host) for s in steps]
    for h in HOSTS:
        assert bed.world.count(h, "run") <= 3 and bed.world.count(h, "pull") <= 1
    return rel.status


# (step, scenario, engine method, fires after a call of, the hosts where it applies)
POINTS = [
    ("observe", "healthy", "managed_containers", None, HOSTS),
    ("pull", "healthy", "has_image", None, HOSTS),
    ("pull", "healthy", "pull", None, HOSTS),
    ("stop", "healthy", "stop", None, HOSTS),
    ("start", "healthy", "run", None, HOSTS),
    ("check", "healthy", "inspect", None, HOSTS),
    ("check", "healthy", "probe_build", None, HOSTS),
    ("check", "healthy", "probe", None, HOSTS),
    ("switch", "healthy", "set_deployment", None, HOSTS),
    ("retire", "healthy", "managed_containers", "set_deployment", HOSTS),
    ("retire", "healthy", "remove", None, HOSTS),
    ("retire", "healthy", "images_labelled", None, HOSTS),
    # h2's new revision answers 404: h2 fails its check after h1 moved; both are undone
    ("logs", "unhealthy", "logs_tail", None, ("h2",)),
    ("undo", "unhealthy", "remove", "logs_tail", HOSTS),
    ("undo", "unhealthy", "inspect", "logs_tail", HOSTS),
    ("undo", "unhealthy", "start", "logs_tail", HOSTS),
    ("undo", "unhealthy", "set_deployment", "logs_tail", ("h1",)),
]
CASES = [
    pytest.param(step, scenario, method, after, host, kind,
                 id=f"{step}-{method}-{scenario}-{host}-{kind}")
    for step, scenario, method, after, hosts in POINTS
    for host in hosts
    for kind in KINDS
]  # fmt: skip
FAILURE_KINDS = {
    "transient": {"infrastructure"},
    "stalling": {"infrastructure"},
    "unexpected": {"infrastructure"},
    "stop": {"interrupted"},
    "lease_lost": {"infrastructure"},
    "crash_before": {"interrupted"},
    "crash_after": {"interrupted"},
}


@pytest.mark.parametrize(("step", "scenario", "method", "after", "host", "kind"), CASES)
def test_a_fault_at_any_step_leaves_one_revision_everywhere(
    bed: Bed, step: str, scenario: str, method: str, after: str | None, host: str, kind: str
) -> None:
    """Whatever fails wherever (an error of any kind, a bug, a stop, a lost lease, or a crash
    then recovery), the service ends on one revision on every host: the new one everywhere, or
    every host back on its old container running, no new container left; release and run end
    terminal with the reason; nothing is retried in a loop."""
    fault = Fault(host, method, kind, after=after)
    bed.world.faults.append(fault)
    allowed = set(FAILURE_KINDS[kind])
    if scenario == "unhealthy":
        bed.world.bad_images.add(NEW_IMAGE)
        bed.world.bad_hosts.add("h2")
        allowed.add("unhealthy")
    undo_refused = step == "undo" and kind in ("stalling", "unexpected")
    try:
        result = bed.roll()
    except Crash:
        assert kind.startswith("crash"), kind
        assert bed.state.releases("web")[0].status == "running"  # what a kill -9 leaves
        state = recover(bed)
        assert_invariants(bed, state, allowed)
        assert state.run(bed.run_id).status == "interrupted"  # type: ignore[union-attr]
    else:
        assert not kind.startswith("crash") or not fault.fired
        if undo_refused:
            # The engine refused to undo (once): the host is named, and the next recovery
            # (the next command, serve's start, the service's next rollout) puts it back.
            rel = bed.state.releases("web")[0]
            assert rel.status == "failed" and "not put back" in (rel.error or ""), rel.error
            assert f"host {host}" in (rel.error or "")
            state = recover(bed)
            assert assert_invariants(bed, state, allowed) == "rolled_back"
            assert "put back by a later recovery" in (state.releases("web")[0].error or "")
        else:
            status = assert_invariants(bed, bed.state, allowed)
            assert result.ok is (status == "succeeded")
            if scenario == "unhealthy":  # the check failed first: a later fault changes nothing
                assert status == "rolled_back"
            elif status != "succeeded" and kind == "stop":
                assert status == "superseded" and result.superseded
    assert fault.fired, f"the table's fault never fired: {fault}"


def test_a_revision_that_exits_at_once_is_a_crash_rolled_back(bed: Bed) -> None:
    """A new container that exits at once (so no probe can be built) fails its check as
    crashed, with its exit code and logs; the host goes back to its old container."""
    bed.world.exiting_images.add(NEW_IMAGE)
    result = bed.roll()
    assert not result.ok and "exited (exit code 3)" in (result.error or ""), result.error
    assert "GET /health 404" in (result.error or "")  # the container's last log lines
    assert assert_invariants(bed, bed.state, {"crashed"}) == "rolled_back"
    assert bed.world.count("h2", "stop") == 0  # the second host was never touched


def test_a_failure_in_a_parallel_batch_undoes_every_host_of_it(bed: Bed) -> None:
    """With max_parallel 2, one host failing its check undoes both hosts of the batch."""
    bed.world.bad_images.add(NEW_IMAGE)
    bed.world.bad_hosts.add("h2")
    result = bed.roll(bed.rollout(max_parallel=2))
    assert not result.ok and "h2" in (result.error or "")
    assert assert_invariants(bed, bed.state, {"unhealthy"}) == "rolled_back"


def test_start_first_never_stops_the_old_container(bed: Bed) -> None:
    """start-first keeps the old container serving: undo only removes the new one."""
    bed.world.bad_images.add(NEW_IMAGE)
    result = bed.roll(bed.rollout(strategy="start-first", ports=["8080"]))
    assert not result.ok
    assert bed.world.count("h1", "stop") == 0 and bed.world.count("h1", "start") == 0
    assert assert_invariants(bed, bed.state, {"unhealthy"}) == "rolled_back"


def test_an_undo_the_engine_keeps_refusing_is_reported_then_retried(bed: Bed) -> None:
    """When a host's old container cannot be started again, the release ends failed, naming
    the host and why, the other host is still put back, and recovery keeps trying the refused
    host until it is back (then the release is rolled back)."""
    bed.world.bad_images.add(NEW_IMAGE)
    bed.world.bad_hosts.add("h2")
    bed.world.faults += [Fault("h1", "start", "stalling", after="logs_tail") for _ in range(5)]
    result = bed.roll()
    rel = bed.state.releases("web")[0]
    assert rel.status == "failed" and "not put back: host h1" in (rel.error or ""), rel.error
    assert rel.failure_kind == "unhealthy"
    assert not result.ok
    assert [c.id for c in bed.world.running("web")["h2"]] == [bed.before["h2"]]
    runner = _Runner(bed)
    recover_interrupted(runner, lambda owner: owner != DEAD)  # type: ignore[arg-type]
    assert runner.state.releases("web")[0].status == "failed"  # refused again: still said
    state = recover(bed)  # the engine accepts now
    assert assert_invariants(bed, state, {"unhealthy"}) == "rolled_back"


def test_ctrl_c_undoes_then_stops(bed: Bed) -> None:
    """Ctrl-C (KeyboardInterrupt) in the middle of a host undoes the rollout, records it as
    interrupted, then ends the command."""
    original = bed.world.engine("h2").run

    def interrupted(spec: Any) -> Any:
        raise KeyboardInterrupt

    bed.world.engine("h2").run = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        bed.roll()
    bed.world.engine("h2").run = original  # type: ignore[method-assign]
    assert assert_invariants(bed, bed.state, {"interrupted"}) == "interrupted"


def test_a_crash_after_every_host_passed_is_finished_by_recovery(bed: Bed) -> None:
    """Killed while retiring (every host had passed its check), the rollout is finished by
    recovery: the new revision everywhere, the old containers removed, the release succeeded."""
    bed.world.faults.append(Fault("h1", "remove", "crash_before"))
    with pytest.raises(Crash):
        bed.roll()
    state = recover(bed)
    assert assert_invariants(bed, state, set()) == "succeeded"
    for h in HOSTS:
        assert [c.image for c in bed.world.hosts[h].boxes.values()] == [NEW_IMAGE]


def test_a_revision_interrupted_twice_is_not_tried_again(bed: Bed) -> None:
    """A revision whose rollout is killed, put back, tried afresh and killed again is not due
    another attempt: the release rows say it was interrupted twice."""
    bed.world.faults.append(Fault("h2", "run", "crash_after"))
    with pytest.raises(Crash):
        bed.roll()
    state = recover(bed)
    first = state.releases("web")[0]
    assert first.status == "interrupted"
    assert fresh_attempt_due(state.releases("web"), first.id)
    bed.world.faults.append(Fault("h1", "probe", "crash_before"))
    bed.state = state  # type: ignore[assignment]
    with pytest.raises(Crash):
        bed.roll()
    state = recover(bed)
    second = state.releases("web")[0]
    assert second.status == "interrupted" and second.id != first.id
    assert not fresh_attempt_due(state.releases("web"), second.id)
    running = bed.world.running("web")
    assert all([c.id for c in running[h]] == [bed.before[h]] for h in HOSTS), running
