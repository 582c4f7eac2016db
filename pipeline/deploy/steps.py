"""The steps of a rollout, decided up front as plain data (no I/O), each with its undo.

A rollout is an ordered list of per-host steps: pull, stop the old container (stop-first),
start the new one, check it, route the host's proxy to it (a proxied service: the old one
keeps serving until then), switch the deployment record to it; then, once every host passed
its check, retire the old containers (a proxied service's old one is drained, paused or
stopped, and kept for an instant rollback). Hosts move in batches of `max_parallel`. Any
failure before every host passed undoes, in reverse, the steps each touched host reached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

StepKind = Literal["pull", "stop", "start", "health", "route", "switch", "retire"]
UndoKind = Literal["remove_new", "start_previous", "route_back", "restore_record"]

# The order of a host's steps, as recorded in `steps.kind` of a run: every step a plan may have.
HOST_STEPS: tuple[StepKind, ...] = ("pull", "stop", "start", "health", "route", "switch")

# What each step's undo is; None where the step changes nothing a user would see (a pulled
# image stays for a later prune; a check changes nothing). "retire" has no undo: it runs only
# once every host passed its check, when the rollout can no longer fail.
UNDO: Mapping[StepKind, UndoKind | None] = {
    "pull": None,
    "stop": "start_previous",
    "start": "remove_new",
    "health": None,
    "route": "route_back",
    "switch": "restore_record",
    "retire": None,
}

# `release_hosts.phase` once a step has completed.
PHASE_AFTER: Mapping[StepKind, str] = {
    "pull": "pulled",
    "stop": "stopped_old",
    "start": "started",
    "health": "checked",
    "route": "routed",
    "switch": "switched",
    "retire": "retired",
}
# Phases of a host that passed its check: recovery may finish such a rollout.
PASSED_CHECK = frozenset({"checked", "routed", "switched", "retired"})


@dataclass(frozen=True)
class HostSteps:
    """One host's steps, in order."""

    host: str
    steps: tuple[StepKind, ...]


@dataclass(frozen=True)
class RolloutPlan:
    """Batches of hosts moved together, in order; then the hosts retired once all passed."""

    batches: tuple[tuple[HostSteps, ...], ...]
    retire: tuple[str, ...]

    def steps_of(self, host: str) -> tuple[StepKind, ...]:
        for batch in self.batches:
            for hs in batch:
                if hs.host == host:
                    return hs.steps
        return ()


def plan_rollout(
    hosts: Sequence[str],
    *,
    strategy: str,
    max_parallel: int,
    pull: bool,
    previous_running: Mapping[str, bool],
    proxied: bool = False,
    switch_back: bool = False,
) -> RolloutPlan:
    """The steps of a rollout: per host `pull` (when images come from a registry), `stop` (when
    stop-first and the host runs a previous container; never when `proxied`: the old container
    serves until the route moves), `start`, `health`, `route` (when `proxied`), `switch`;
    batches of `max_parallel` hosts in config order; `retire` on every host at the end.

    `switch_back`: every host goes back to a container it retained (a proxied service's
    rollback), already checked when it was first deployed and resumed in milliseconds; all
    hosts then move in one batch, so the service spends no time split between two releases."""
    per_host = []
    for host in hosts:
        steps: list[StepKind] = []
        if pull:
            steps.append("pull")
        if strategy == "stop-first" and previous_running.get(host, False) and not proxied:
            steps.append("stop")
        steps += ["start", "health"]
        if proxied:
            steps.append("route")
        steps.append("switch")
        per_host.append(HostSteps(host, tuple(steps)))
    size = len(per_host) if switch_back else max(1, max_parallel)
    batches = tuple(tuple(per_host[i : i + size]) for i in range(0, len(per_host), size))
    return RolloutPlan(batches, tuple(hosts))


def undo_for(reached: Sequence[StepKind]) -> tuple[UndoKind, ...]:
    """The undo of the steps a host reached (the one that failed included), last step first."""
    undos: list[UndoKind] = []
    for step in reversed(reached):
        undo = UNDO[step]
        if undo is not None and undo not in undos:
            undos.append(undo)
    return tuple(undos)


def reached_by_phase(phase: str) -> tuple[StepKind, ...]:
    """The steps a host may have reached when a crash left it at `phase`: every step up to the
    phase, and those that may have been in progress when the process died (the next ones, up
    to the next step every plan has: `pull`, `stop` and `route` are optional). Taken from the
    full order of every step, so whatever ran, recovery undoes at least what could have been done;
    each undo is a no-op where its step never happened."""
    if phase == "planned":
        done = -1
    else:
        found = [i for i, s in enumerate(HOST_STEPS) if PHASE_AFTER[s] == phase]
        if not found:  # undone, retired: nothing left to undo
            return ()
        done = found[0]
    reached = list(HOST_STEPS[: done + 1])
    for step in HOST_STEPS[done + 1 :]:
        reached.append(step)
        if step not in _OPTIONAL:
            break
    return tuple(reached)


_OPTIONAL = frozenset({"pull", "stop", "route"})


RecoveryAction = Literal["finish", "undo"]


def recovery_action(phases: Mapping[str, str]) -> RecoveryAction:
    """What recovery does with a release a crash left running: finish it only when every one
    of its hosts had passed its check, else undo every host."""
    if phases and all(p in PASSED_CHECK for p in phases.values()):
        return "finish"
    return "undo"
