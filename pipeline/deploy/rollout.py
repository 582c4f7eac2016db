"""Rolling a service out to its hosts, behind health checks, rolling back everywhere on failure.

Per host: pull (before anything stops), start the new container (stopping the old one first
for `stop-first`), wait until it is healthy. The old container is kept, stopped, until every
host is healthy: rolling back is restarting it, with no registry and no rebuild. When one host
fails, that host and every host already moved in this rollout go back, so the service ends on
one revision everywhere.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
from dotenv import dotenv_values

from pipeline.config.model import HostSection, ServiceSection
from pipeline.deploy.health import (
    HealthResult,
    check_container,
    container_logs,
    failure_text,
)
from pipeline.errors import FailureKind, PipelineError
from pipeline.hosts.engine import LABEL_PREFIX, ContainerInfo, ContainerSpec, Engine
from pipeline.state.rollbacks import ServiceSettings
from pipeline.state.store import State

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Target:
    """What a service is rolled out to: one image revision, addressed per host."""

    revision: str
    digest: str
    refs: Mapping[str, str]  # host -> image reference to run (registry@digest, or a local tag)
    spec_hash: str
    pull: bool  # False when the image was built on the host itself
    auth: Mapping[str, str] | None = None
    env_file: str | None = None  # the text of the service's env_file that spec_hash covers
    settings: ServiceSettings | None = None  # recorded with the release, for a later rollback
    restores: int | None = None  # a rollback: the release it brings back


@dataclass
class _Move:
    host: str
    engine: Engine
    old: ContainerInfo | None
    new: ContainerInfo | None = None
    restarted_old: bool = False
    failure_kind: FailureKind | None = None  # why the new container failed its health gate


@dataclass
class RolloutResult:
    service: str
    ok: bool
    release_id: int
    error: str | None = None
    hosts: list[str] = field(default_factory=list)
    superseded: bool = False  # gave way to a newer commit at a safe point; not a failure
    failure_kind: FailureKind | None = None  # why it failed (see `pipeline.errors.FailureKind`)


def container_name(service: str, revision: str, release_id: int) -> str:
    return f"{service}-{revision[:12]}-r{release_id}"


def env_values(text: str) -> dict[str, str]:
    """The variables of env_file text, as python-dotenv reads a .env file (quotes, `export`,
    comments), without expanding `${VAR}`: a container gets the file's values, never pipeline's
    own environment. A name without "=" is left out."""
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {key: value for key, value in values.items() if value is not None}


@dataclass
class Rollout:
    """Executes one service's rollout; engines, health timing and the clock are injected."""

    state: State
    service: str
    spec: ServiceSection
    hosts: Mapping[str, HostSection]
    engines: Mapping[str, Engine]
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    should_stop: Callable[[], bool] | None = None
    report: Callable[[str], None] = lambda _line: None
    keep_images: int = 3  # images of the service kept on each host for an instant rollback

    def run(
        self, target: Target, *, run_id: int | None, kind: str = "deploy", reason: str | None = None
    ) -> RolloutResult:
        """Roll `target` out to every host of the service; on any failure, roll all back."""
        release_id = self.state.start_release(
            self.service,
            target.revision,
            target.digest,
            target.refs.get(self.spec.hosts[0], ""),
            target.spec_hash,
            kind=kind,
            reason=reason,
            run_id=run_id,
            settings=target.settings,
            restores=target.restores,
        )
        bound = log.bind(service=self.service, revision=target.revision[:12], run_id=run_id)
        bound.info("rollout started", hosts=self.spec.hosts, strategy=self.spec.strategy)
        moved: list[_Move] = []
        hosts = list(self.spec.hosts)
        batches = [
            hosts[i : i + self.spec.max_parallel]
            for i in range(0, len(hosts), self.spec.max_parallel)
        ]
        failure: str | None = None
        why: FailureKind | None = None
        with ThreadPoolExecutor(max_workers=self.spec.max_parallel) as pool:
            for batch in batches:
                futures = [
                    pool.submit(self._move_host, h, target, release_id, run_id) for h in batch
                ]
                for fut in futures:
                    move, error = fut.result()
                    if move is not None and move.new is not None and error is None:
                        moved.append(move)
                    elif error is not None:
                        if failure is None:
                            # The health gate's verdict (crashed, unhealthy); with none the host
                            # failed before it (pull, start): the engine or the registry.
                            why = (move.failure_kind if move else None) or "infrastructure"
                        failure = failure or error
                if failure:
                    break
        if failure:
            self._roll_back(moved, release_id, run_id)
            # Interrupted at a safe point (a newer commit waits, or the service stops): not a
            # failure of this revision, so it stays eligible and is not reported as broken.
            superseded = self.should_stop is not None and self.should_stop()
            if superseded:
                failure = f"superseded before it was healthy; rolled back ({failure})"
            self.state.finish_release(
                release_id,
                "superseded" if superseded else "rolled_back",
                failure,
                failure_kind=None if superseded else why,
            )
            bound.error(
                "rollout failed, rolled back",
                error=failure,
                hosts_rolled_back=[m.host for m in moved],
            )
            return RolloutResult(
                self.service,
                False,
                release_id,
                failure,
                [m.host for m in moved],
                superseded,
                None if superseded else why,
            )
        for move in moved:
            self._retire_old(move, run_id)
            self._prune_images(move, self.spec.image, self.keep_images)
        self.state.finish_release(release_id, "succeeded")
        bound.info("rollout succeeded", hosts=hosts)
        return RolloutResult(self.service, True, release_id, None, hosts)

    # -- one host -------------------------------------------------------------------------
    def _move_host(
        self, host: str, target: Target, release_id: int, run_id: int | None
    ) -> tuple[_Move | None, str | None]:
        engine = self.engines[host]
        ref = target.refs[host]
        hlog = log.bind(
            service=self.service, host=host, revision=target.revision[:12], run_id=run_id
        )
        step = self._step(run_id, "pull", host, target.revision, ref)
        try:
            if target.pull and not engine.has_image(ref):
                engine.pull(ref, auth=target.auth)
            self._end(step, "succeeded")
        except PipelineError as exc:
            self._end(step, "failed", error=str(exc))
            hlog.error("pull failed", error=str(exc))
            return None, f"host {host}: pull of {ref} failed: {exc}"
        old = self._current(engine)
        move = _Move(host, engine, old)
        step = self._step(
            run_id,
            "start",
            host,
            target.revision,
            f"strategy {self.spec.strategy}; replacing {old.name if old else 'nothing'}",
        )
        try:
            if self.spec.network not in ("bridge", "host", "none"):
                engine.containers.ensure_network(self.spec.network)
            if old is not None and self.spec.strategy == "stop-first":
                engine.containers.stop(old.id, timeout=max(0, round(self.spec.stop_timeout)))
            move.new = engine.containers.run(self._container_spec(target, ref, release_id))
            self._end(step, "succeeded", detail=f"container {move.new.name}")
        except PipelineError as exc:
            self._end(step, "failed", error=str(exc))
            self._undo_host(move, run_id)
            return move, f"host {host}: could not start the new container: {exc}"
        self.report(f"{self.service}: {host}: started {move.new.name}, checking health")
        result = self._check(engine, move.new, host, run_id, target.revision)
        if not result.healthy:
            logs = container_logs(engine, move.new.id)
            error = f"host {host}: {self.service} at {target.revision[:12]} " + failure_text(
                result, move.new.name, logs
            )
            move.failure_kind = result.failure_kind
            hlog.error("health check failed", detail=result.detail, kind=result.failure_kind)
            self._undo_host(move, run_id)
            return move, error
        self.state.set_deployment(
            self.service,
            host,
            revision=target.revision,
            digest=target.digest,
            ref=ref,
            spec_hash=target.spec_hash,
            container_id=move.new.id,
            release_id=release_id,
        )
        self.report(f"{self.service}: {host}: healthy ({result.detail})")
        hlog.info("host healthy", container=move.new.name, detail=result.detail)
        return move, None

    def _check(
        self, engine: Engine, container: ContainerInfo, host: str, run_id: int | None, revision: str
    ) -> HealthResult:
        step = self._step(run_id, "health", host, revision, container.name)
        result = check_container(
            self.spec,
            engine,
            container,
            self.hosts[host].reach_address,
            clock=self.clock,
            sleep=self.sleep,
            should_stop=self.should_stop,
        )
        self._end(
            step,
            "succeeded" if result.healthy else "failed",
            detail=result.detail,
            error=None if result.healthy else result.detail,
        )
        return result

    def _current(self, engine: Engine) -> ContainerInfo | None:
        """The running container of this service on the host (the newest if several)."""
        mine = engine.containers.managed_containers(self.service)
        running = [c for c in mine if c.status == "running"]
        running.sort(key=lambda c: c.started_at or "", reverse=True)
        return running[0] if running else None

    def _container_spec(self, target: Target, ref: str, release_id: int) -> ContainerSpec:
        env = env_values(target.env_file) if target.env_file is not None else {}
        env.update(self.spec.env)
        labels = dict(self.spec.labels)
        labels.update(
            {
                f"{LABEL_PREFIX}managed": "true",
                f"{LABEL_PREFIX}service": self.service,
                f"{LABEL_PREFIX}revision": target.revision,
                f"{LABEL_PREFIX}digest": target.digest,
                f"{LABEL_PREFIX}release": str(release_id),
                f"{LABEL_PREFIX}spec": target.spec_hash,
            }
        )
        return ContainerSpec(
            name=container_name(self.service, target.revision, release_id),
            image=ref,
            labels=labels,
            env=env,
            command=self.spec.command,
            ports=self.spec.ports,
            volumes=self.spec.volumes,
            cpus=self.spec.cpus,
            memory=self.spec.memory,
            network=self.spec.network,
            restart=self.spec.restart,
        )

    # -- undo and cleanup -------------------------------------------------------------------
    def _undo_host(self, move: _Move, run_id: int | None) -> None:
        """Put one host back as it was before this rollout touched it."""
        step = self._step(
            run_id,
            "rollback",
            move.host,
            None,
            f"back to {move.old.name if move.old else 'nothing'}",
        )
        try:
            if move.new is not None:
                move.engine.containers.remove(move.new.id)
            if move.old is not None:
                prev = move.engine.containers.inspect(move.old.id)
                if prev is not None and prev.status != "running":
                    move.engine.containers.start(move.old.id)
                    move.restarted_old = True
                self._restore_record(move)
            else:
                self.state.forget_deployment(self.service, move.host)
            self._end(step, "succeeded")
            back_to = move.old.labels.get(f"{LABEL_PREFIX}revision", "?")[:12] if move.old else None
            self.report(f"{self.service}: {move.host}: rolled back to {back_to or 'nothing'}")
        except PipelineError as exc:
            self._end(step, "failed", error=str(exc))
            log.error(
                "rollback of host failed", service=self.service, host=move.host, error=str(exc)
            )

    def _restore_record(self, move: _Move) -> None:
        assert move.old is not None
        labels = move.old.labels
        self.state.set_deployment(
            self.service,
            move.host,
            revision=labels.get(f"{LABEL_PREFIX}revision", ""),
            digest=labels.get(f"{LABEL_PREFIX}digest", ""),
            ref=move.old.image,
            spec_hash=labels.get(f"{LABEL_PREFIX}spec", ""),
            container_id=move.old.id,
            release_id=int(labels.get(f"{LABEL_PREFIX}release", "0") or 0) or None,
        )

    def _roll_back(self, moved: Sequence[_Move], release_id: int, run_id: int | None) -> None:
        with ThreadPoolExecutor(max_workers=max(1, self.spec.max_parallel)) as pool:
            list(pool.map(lambda m: self._undo_host(m, run_id), moved))

    def _prune_images(self, move: _Move, image: str, keep: int) -> None:
        """Keep the newest `keep` images of this service's image on the host (for rollback)."""
        for image_id, _created in move.engine.images_labelled("dev.pipeline.image", image)[keep:]:
            try:
                move.engine.remove_image(image_id)  # one still in use is left alone
            except PipelineError as exc:
                log.warning("could not prune image", host=move.host, image=image_id, error=str(exc))

    def _retire_old(self, move: _Move, run_id: int | None) -> None:
        """Remove replaced (and stale) containers of the service once every host is healthy."""
        assert move.new is not None
        for c in move.engine.containers.managed_containers(self.service):
            if c.id != move.new.id:
                try:
                    move.engine.containers.remove(c.id)
                except PipelineError as exc:
                    log.warning(
                        "could not remove old container",
                        host=move.host,
                        container=c.name,
                        error=str(exc),
                    )

    # -- step records -----------------------------------------------------------------------
    def _step(
        self, run_id: int | None, kind: str, host: str, revision: str | None, detail: str | None
    ) -> int | None:
        if run_id is None:
            return None
        return self.state.start_step(
            run_id, kind, self.service, host=host, revision=revision, detail=detail
        )

    def _end(
        self, step: int | None, status: str, *, detail: str | None = None, error: str | None = None
    ) -> None:
        if step is not None:
            self.state.finish_step(step, status, detail=detail, error=error)
