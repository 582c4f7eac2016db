"""Rolling a cluster service out on its Swarm, behind pipeline's own health check.

The rollout is the ordered steps of `pipeline.plan.cluster.CLUSTER_STEPS`: make the overlay
networks, update the Swarm service to the image by digest, follow Swarm's update until every
task runs it, probe every new task (http/tcp at its node's address and host-mode port, cmd in its
container), record the deployment. Swarm places, replaces and heals tasks; pipeline does not
schedule. Any failure after the update is undone by Swarm's own rollback (a service that did not
exist before is removed), and the release ends `rolled_back` with the failing task, its node, the
check's last result and the task's log lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from pipeline.config.envfile import env_values
from pipeline.config.model import ClusterSection, ServiceSection, parse_port
from pipeline.deploy.failures import Interrupted, RolloutFailed, failure_of
from pipeline.deploy.health import (
    LOG_LINES,
    Probe,
    ProbeTargetError,
    cmd_probe,
    docker_probe,
    failure_text,
    network_probe,
    wait_healthy,
)
from pipeline.deploy.rollout import RolloutResult, Target
from pipeline.errors import PipelineError, StallingError
from pipeline.hosts.engine import LABEL_PREFIX, Engine
from pipeline.hosts.swarm import NodeInfo, TaskInfo
from pipeline.plan.cluster import CLUSTER_STEPS, ClusterStep, swarm_service_spec, undo_of
from pipeline.redact import redact
from pipeline.state.leases import HeldLease
from pipeline.state.steps import StepLog
from pipeline.state.store import State

log = structlog.get_logger(__name__)

POLL = 0.5  # seconds between looks at a Swarm update
CONVERGE_TIMEOUT = 120.0  # seconds Swarm gets to run the new tasks (pulls included)
_FAILED_STATES = ("failed", "rejected", "orphaned")


def _short(text: str) -> str:
    return text[:12]


@dataclass
class ClusterRollout:
    """Executes one cluster service's rollouts on the Swarm managed by `manager`; `nodes`
    maps a node address to a `[hosts.*]` engine there (for cmd and docker checks, which run in
    the task's container). Time is injected."""

    state: State
    service: str
    spec: ServiceSection
    cluster: str
    section: ClusterSection
    manager: Engine
    nodes: Mapping[str, Engine] = field(default_factory=dict)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    should_stop: Callable[[], bool] | None = None
    report: Callable[[str], None] = lambda _line: None
    converge_timeout: float = CONVERGE_TIMEOUT

    def __post_init__(self) -> None:
        self.swarm = self.manager.swarm
        self.steps = StepLog(self.state, self.service)

    # -- the rollout ------------------------------------------------------------------------
    def run(
        self,
        target: Target,
        *,
        run_id: int | None,
        kind: str = "deploy",
        reason: str | None = None,
        lease: HeldLease | None = None,
    ) -> RolloutResult:
        """Roll `target` out on the cluster; on any failure, roll the service back."""
        ref = target.refs[self.cluster]
        release_id = self.state.start_release(
            self.service,
            target.revision,
            target.digest,
            ref,
            target.spec_hash,
            kind=kind,
            reason=reason,
            run_id=run_id,
            settings=target.settings,
            restores=target.restores,
        )
        bound = log.bind(
            service=self.service, cluster=self.cluster, revision=_short(target.revision)
        )
        done: ClusterStep | None = None
        self._existed = False
        try:
            for step in CLUSTER_STEPS:
                self._boundary(lease)
                record = self.steps.start(run_id, step, self.cluster, target.revision, None)
                try:
                    detail = self._do(step, target, ref, release_id)
                except BaseException as exc:
                    self.steps.end(record, "failed", error=str(exc) or type(exc).__name__)
                    raise
                self.steps.end(record, "succeeded", detail=detail)
                done = step
        except (Exception, KeyboardInterrupt) as exc:
            failure = failure_of(exc)
            how = undo_of(done, self._existed)
            problems = self._undo(how, ref)
            status, message = failure.status, failure.message
            if how == "none":
                status = "failed"  # nothing had been changed yet
            if problems:
                status, message = "failed", f"{message}\nnot put back: {problems}"
            self.state.finish_release(release_id, status, message, failure_kind=failure.kind)
            bound.error("cluster rollout failed", error=message, undo=how)
            if isinstance(exc, KeyboardInterrupt):
                raise
            return RolloutResult(
                self.service, False, release_id, message, [self.cluster],
                failure.status == "superseded", failure.kind,
            )  # fmt: skip
        self.state.finish_release(release_id, "succeeded")
        bound.info("cluster rollout succeeded")
        return RolloutResult(self.service, True, release_id, None, [self.cluster])

    def _boundary(self, lease: HeldLease | None) -> None:
        if lease is not None:
            lease.check()
        if self.should_stop is not None and self.should_stop():
            raise Interrupted(f"{self.service}: asked to stop")

    def _do(self, step: ClusterStep, target: Target, ref: str, release_id: int) -> str | None:
        if step == "networks":
            made = [n for n in self.spec.networks if self.swarm.ensure_overlay(n)]
            return f"created {', '.join(made)}" if made else None
        if step == "update":
            return self._update(target, ref, release_id)
        if step == "converge":
            tasks = self._converge(ref, target.revision)
            return f"{len(tasks)} task(s) run {ref}"
        if step == "health":
            return self._check(ref, target.revision)
        if step == "record":
            self.state.set_deployment(
                self.service,
                self.cluster,
                revision=target.revision,
                digest=target.digest,
                ref=ref,
                spec_hash=target.spec_hash,
                container_id=None,
                release_id=release_id,
            )
            return None
        raise AssertionError(f"unknown step {step}")

    def _update(self, target: Target, ref: str, release_id: int) -> str:
        member = self.swarm.membership()
        if not (member.active and member.manager):
            raise StallingError(
                f"clusters.{self.cluster}.docker: {self.section.docker} is not a Swarm manager "
                f"(swarm state: {member.state})"
            )
        env = env_values(target.env_file) if target.env_file is not None else {}
        env.update(self.spec.env)
        labels = {
            **self.spec.labels,
            f"{LABEL_PREFIX}managed": "true",
            f"{LABEL_PREFIX}service": self.service,
            f"{LABEL_PREFIX}revision": target.revision,
            f"{LABEL_PREFIX}digest": target.digest,
            f"{LABEL_PREFIX}release": str(release_id),
            f"{LABEL_PREFIX}spec": target.spec_hash,
        }
        spec = swarm_service_spec(self.service, self.spec, ref, env=env, labels=labels)
        current = self.swarm.service(self.service)
        self._existed = current is not None
        if current is None:
            self.swarm.create(spec, auth=target.auth)
            self.report(f"{self.service}: {self.cluster}: created the Swarm service at {ref}")
            return "created"
        self.swarm.update(current, spec, auth=target.auth)
        self.report(f"{self.service}: {self.cluster}: updating the Swarm service to {ref}")
        return f"updated from {current.image}"

    # -- following Swarm --------------------------------------------------------------------
    def _running(self, ref: str) -> tuple[list[TaskInfo], list[TaskInfo]]:
        """(tasks meant to run, the failed ones) of `ref`, newest first."""
        tasks = self.swarm.tasks(self.service)
        wanted = [t for t in tasks if t.desired_state == "running"]
        failed = [t for t in tasks if t.image == ref and t.state in _FAILED_STATES]
        return wanted, failed

    def _converge(self, ref: str, revision: str) -> list[TaskInfo]:
        """Wait until Swarm runs every replica on `ref`; RolloutFailed when Swarm rolled back
        or paused the update (a task failed by its measure), or it takes too long."""
        replicas = 1 if self.spec.replicas is None else self.spec.replicas
        deadline = self.clock() + self.converge_timeout
        while True:
            info = self.swarm.service(self.service)
            wanted, failed = self._running(ref)
            if info is not None and info.update_state.startswith(("rollback", "paused")):
                raise RolloutFailed(self._swarm_failure(revision, info.update_message, failed),
                                    "crashed")  # fmt: skip
            new = [t for t in wanted if t.image == ref]
            settled = info is None or info.update_state in ("", "completed")
            up = all(t.state == "running" for t in new)
            if settled and up and len(new) == len(wanted) == replicas:
                return new
            if self.clock() >= deadline:
                states = ", ".join(f"{_short(t.id)} {t.state}" for t in wanted) or "no task"
                raise RolloutFailed(
                    self._swarm_failure(
                        revision,
                        f"not every task ran {ref} within {self.converge_timeout:g}s ({states})",
                        failed,
                    ),
                    "unhealthy",
                )
            self.sleep(POLL)

    def _swarm_failure(self, revision: str, why: str, failed: list[TaskInfo]) -> str:
        text = f"cluster {self.cluster}: {self.service} at {_short(revision)}: Swarm: {why}"
        if failed:
            task = failed[0]
            node = self._node(task.node_id)
            text += (
                f"; task {_short(task.id)} on node {node.hostname} ({node.address}) "
                f"{task.state}: {task.error or task.message}"
            )
            text += self._logs(task)
        return text

    def _node(self, node_id: str) -> NodeInfo:
        nodes = self.swarm.nodes()
        return nodes.get(node_id) or NodeInfo(node_id, "?", self.section.reach_address)

    def _logs(self, task: TaskInfo) -> str:
        try:
            logs = redact(self.swarm.task_logs(task.id, LOG_LINES).rstrip())
        except PipelineError as exc:
            logs = f"(logs unavailable: {exc})"
        return f"\n--- last {LOG_LINES} log lines of task {_short(task.id)} ---\n{logs}"

    # -- pipeline's own check ---------------------------------------------------------------
    def _probe(self, task: TaskInfo, address: str) -> Probe | None:
        """The service's check aimed at one task: its node's address and host-mode port."""
        health = self.spec.health

        def port(container_port: int | None) -> int:
            if container_port is None:
                if not self.spec.ports:
                    raise ProbeTargetError(
                        f"services.{self.service}.health: the check needs a port "
                        "(set health.port or publish one in 'ports')"
                    )
                container_port = parse_port(self.spec.ports[0]).container_port
            for key in (f"{container_port}/tcp", f"{container_port}/udp"):
                if key in task.ports:
                    return task.ports[key]
            raise ProbeTargetError(
                f"task {_short(task.id)}: container port {container_port} is not published "
                f"(published: {', '.join(task.ports) or 'none'})"
            )

        probe = network_probe(self.spec, address, port)
        if probe is not None or (health.cmd is None and not health.docker):
            return probe
        engine = self.nodes.get(address)
        if engine is None or task.container_id is None:
            raise ProbeTargetError(
                f"services.{self.service}.health: a cmd or docker check runs in the task's "
                f"container, so node {address} needs a [hosts.*] table"
            )
        if health.cmd is not None:
            return cmd_probe(engine, task.container_id, health.cmd)
        return docker_probe(engine, task.container_id)

    def _check(self, ref: str, revision: str) -> str:
        """Probe every new task at once (each through its whole gate); RolloutFailed naming the
        first task that failed, its node, the check's last result and its log lines."""
        wanted, _failed = self._running(ref)
        tasks = [t for t in wanted if t.image == ref]
        nodes = self.swarm.nodes()
        h = self.spec.health

        def gate(task: TaskInfo) -> tuple[TaskInfo, NodeInfo, str | None]:
            node = nodes.get(task.node_id) or NodeInfo(task.node_id, "?", "")
            address = node.address or self.section.reach_address
            try:
                probe = self._probe(task, address)
            except ProbeTargetError as exc:
                return task, node, str(exc)
            if probe is None:
                return task, node, None  # no check configured: Swarm's own monitor decided
            result = wait_healthy(
                probe,
                interval=h.interval,
                timeout=h.timeout,
                threshold=h.healthy_threshold,
                monitor=h.monitor,
                clock=self.clock,
                sleep=self.sleep,
                should_stop=self.should_stop,
            )
            if result.healthy:
                return task, node, None
            return task, node, failure_text(result, f"task {_short(task.id)}", "")

        with ThreadPoolExecutor(max_workers=max(1, len(tasks))) as pool:
            results = list(pool.map(gate, tasks))
        for task, node, problem in results:
            if problem is not None:
                raise RolloutFailed(
                    f"cluster {self.cluster}: {self.service} at {_short(revision)}: task "
                    f"{_short(task.id)} on node {node.hostname} ({node.address}) {problem}"
                    + self._logs(task),
                    "unhealthy",
                )
        self.report(f"{self.service}: {self.cluster}: {len(tasks)} task(s) healthy")
        where = ", ".join(sorted({nodes[t.node_id].address for t in tasks if t.node_id in nodes}))
        return f"{len(tasks)} task(s) healthy on {where}"

    # -- undo -------------------------------------------------------------------------------
    def _undo(self, how: str, ref: str) -> str | None:
        """Put the service back (`plan.cluster.undo_of`); what could not be, or None."""
        if how == "none":
            return None
        try:
            if how == "remove":
                self.swarm.remove(self.service)
                self.report(f"{self.service}: {self.cluster}: removed the new Swarm service")
                return None
            info = self.swarm.service(self.service)
            if info is not None and not info.update_state.startswith("rollback"):
                self.swarm.rollback(self.service)
            self.report(f"{self.service}: {self.cluster}: Swarm rolls the service back")
            self._wait_rolled_back(ref)
        except PipelineError as exc:
            return str(exc)
        return None

    def _wait_rolled_back(self, ref: str) -> None:
        """Wait until Swarm's rollback completed and no task meant to run runs `ref`."""
        deadline = self.clock() + self.converge_timeout
        while True:
            info = self.swarm.service(self.service)
            wanted, _failed = self._running(ref)
            back = all(t.image != ref and t.state == "running" for t in wanted)
            if info is not None and info.update_state in ("rollback_completed", "") and back:
                return
            if info is not None and info.update_state in ("rollback_paused", "paused"):
                raise PipelineError(
                    f"Swarm's rollback of {self.service} paused: {info.update_message}"
                )
            if self.clock() >= deadline:
                state = info.update_state if info else "?"
                raise PipelineError(
                    f"Swarm's rollback of {self.service} did not finish within "
                    f"{self.converge_timeout:g}s (update state {state})"
                )
            self.sleep(POLL)
