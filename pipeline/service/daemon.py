"""`pipeline serve`: the long-running service around the runner.

Triggers (webhooks, polls, cron ticks, file events, git hooks, and the timers that retry a
revision after an infrastructure failure) only put events in the durable queue; ONE worker
thread (`pipeline.service.worker`) claims them and runs passes, so two deploys never race. On
start it recovers what a crash left behind: events still "working", runs and leases of dead
owners, and services whose rollout was interrupted midway.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from pipeline.config import load as config_mod
from pipeline.config.load import LoadedConfig
from pipeline.deploy.connections import Connections
from pipeline.deploy.operations import (
    commit_subject,
    is_ancestor,
    repo_heads,
    rollback_service,
    status_rows,
)
from pipeline.deploy.recovery import fresh_attempt_due, recover_interrupted
from pipeline.deploy.runner import Runner
from pipeline.errors import ConfigError, LockedError, PipelineError
from pipeline.plan.rollback import refused_as_bad_input
from pipeline.service import handoff as handoff_mod
from pipeline.service import metrics
from pipeline.service import server as server_mod
from pipeline.service.retries import Retrier
from pipeline.service.worker import Worker
from pipeline.sources.schedule import Scheduler
from pipeline.sources.watch import Watcher, git_dir_of, local_repo_path
from pipeline.state.cluster import HEARTBEAT
from pipeline.state.database import open_state
from pipeline.state.queue import EventQueue
from pipeline.state.store import State, default_owner, owner_alive_local, release_json

log = structlog.get_logger(__name__)

IDLE_WAIT = 1.0  # also how soon events queued by another process (a git hook) are noticed
# Seconds between pings of the service hosts' engines (`Service._warm`): idle connections are
# kept up, or made again, before a rollback needs them.
KEEP_WARM = 30.0


class Service:
    """The service: HTTP server, scheduler, watchers and one worker over the durable queue."""

    def __init__(
        self,
        config_path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        owner: str | None = None,
        watch_repos: bool = True,
        idle_wait: float = IDLE_WAIT,
        report: Callable[[str], None] | None = None,
        keep_warm: float = KEEP_WARM,
    ) -> None:
        self.config_path = config_path
        self.keep_warm = keep_warm
        self.clock, self.sleep = clock, sleep
        self.owner = owner or default_owner()
        self.watch_repos = watch_repos
        self.idle_wait = idle_wait
        self.report = report
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._reload_lock = threading.Lock()
        self._scheduler = Scheduler()
        self._watcher = Watcher()
        self._watched: dict[str, Path] = {}
        self._worker: Worker | None = None
        self._worker_thread: threading.Thread | None = None
        self._http: server_mod.RunningServer | None = None
        self._config_text = ""
        self._loaded: LoadedConfig | None = None
        self._state: State | None = None
        self._queue: EventQueue | None = None
        self._observer: Connections | None = None
        self._retrier: Retrier | None = None
        self._handoff: handoff_mod.Handoff | None = None
        self._handed = itertools.count(1)  # numbers the owners of handed rollbacks
        self._warmer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="warm")

    # -- what the rest of the service reads -------------------------------------------------
    @property
    def loaded(self) -> LoadedConfig:
        assert self._loaded is not None, "Service.start() first"
        return self._loaded

    @property
    def state(self) -> State:
        assert self._state is not None, "Service.start() first"
        return self._state

    @property
    def queue(self) -> EventQueue:
        assert self._queue is not None, "Service.start() first"
        return self._queue

    @property
    def worker(self) -> Worker:
        assert self._worker is not None, "Service.start() first"
        return self._worker

    @property
    def url(self) -> str | None:
        """Where the HTTP server listens (the real port, when `listen` asked for port 0)."""
        return self._http.url if self._http else None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Load the config (ConfigError if invalid), recover from a crash, start everything."""
        self._open()
        assert self._observer is not None
        self._warm(self._observer)
        threading.Thread(target=self._keep_warm, name="keep-warm", daemon=True).start()
        ctx = server_mod.ServerContext(
            loaded=lambda: self.loaded,
            state=self.state,
            queue=self.queue,
            status=self._status,
            wake=self.wake,
            started_at=time.time(),
            listen=self.loaded.model.server.listen,
            repos=self._repo_heads,
            subject=self._commit_subject,
            plan=self._plan,
            ancestor=self._is_ancestor,
            rollback_now=self.rollback_now,
        )
        self._http = server_mod.start(server_mod.create_app(ctx), self.loaded.model.server.listen)
        try:
            # Published once the server answers, so a command that finds it can hand over.
            self._handoff = handoff_mod.describe(self._http.host, self._http.port, self.config_path)
            ctx.local_token = self._handoff.token
            handoff_mod.publish(self.loaded.data_dir, self._handoff)
            self._start_heartbeat()
            self._scheduler.start()
            self._sync_jobs()
            self._retrier = Retrier(
                state=self.state,
                queue=self.queue,
                timers=self._scheduler,
                config=lambda: self.loaded.model,
                wake=self.wake,
            )
            self._retrier.sync()  # waits left by the last run of the service, or by the CLI
            self._watcher.watch_file("config", self.config_path, self._on_config_change)
            self._sync_repo_watches()
            self._watcher.start()
        except BaseException:
            self.stop()
            raise
        self._worker_thread = threading.Thread(
            target=self.worker.run, name="pipeline-worker", daemon=True
        )
        self._worker_thread.start()
        log.info("service.started", owner=self.owner, url=self.url)

    def _open(self) -> None:
        self._config_text, self._loaded = self._read_config()
        self._state = open_state(self.loaded)
        self._queue = EventQueue(self.state)
        self._worker = Worker(
            loaded=lambda: self.loaded,
            state=self.state,
            queue=self.queue,
            owner=self.owner,
            stopping=self._stopping,
            wake=self._wake,
            reload=self.reload,
            observer=lambda: self._observer,
            clock=self.clock,
            sleep=self.sleep,
            idle_wait=self.idle_wait,
            report=self.report,
            after_pass=self._sync_retries,
            housekeeping=self.take_over,
        )
        self._observer = Connections(self.loaded)
        self.recover()

    def work_until(self, done: Callable[[], bool]) -> bool:
        """Be the worker in this process, without server, timers or watchers, until `done()`
        (a git hook's fallback when the service is down). False if the queue ran dry first:
        another worker claimed what was left. An event waiting for its commit is waited for."""
        self._open()
        try:
            while not done():
                events = self.queue.claim(self.owner)
                if not events:
                    due = self.queue.next_due_in()
                    if due is None:
                        return False
                    self.sleep(max(due, 0.05))
                    continue
                self.worker.handle(events)
            return True
        finally:
            self.close()

    def close(self) -> None:
        if self._observer is not None:
            self._observer.close()

    def request_stop(self) -> None:
        """Ask everything to stop (safe from a signal handler); `serve_forever` then returns."""
        self._stopping.set()
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, stop the timers and watchers, let the worker finish or interrupt its
        step (health waits return), and join it; events it leaves go back to the queue."""
        self.request_stop()
        if self._handoff is not None:
            with contextlib.suppress(OSError):  # a leftover names a dead pid: it is ignored
                handoff_mod.withdraw(self.loaded.data_dir, self._handoff)
            self._handoff = None
        if self._http is not None:
            self._http.stop()
        self._scheduler.shutdown()
        self._watcher.stop()
        thread = self._worker_thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("service.worker_still_busy", timeout=timeout)
        if self._queue is not None and not (thread and thread.is_alive()):
            # Ours and unfinished: queue them again for the next start (even in this process).
            self._queue.requeue_interrupted(lambda owner: owner != self.owner)
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(HEARTBEAT + 5)
            with contextlib.suppress(Exception):  # its row only ages out then
                self.state.cluster.leave(self.owner)
        # No ping starts once the connections close (one under way may open one again: it is
        # not waited for, an unreachable engine would hold the stop for its whole timeout).
        self._warmer.shutdown(wait=False, cancel_futures=True)
        self.close()
        log.info("service.stopped")

    def serve_forever(self, on_started: Callable[[Service], None] | None = None) -> None:
        """Start, call `on_started`, block until `request_stop` (SIGTERM/SIGINT), then stop."""
        self.start()
        try:
            if on_started is not None:
                on_started(self)
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    def wake(self) -> None:
        """Make the worker look at the queue now instead of at its next idle tick."""
        self._wake.set()

    # -- instances and recovery -------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        """Record this instance in `instances` now and every HEARTBEAT seconds until stopped."""
        self.state.cluster.heartbeat(self.owner, self.url)

        def beat() -> None:
            while not self._stopping.wait(HEARTBEAT):
                try:
                    self.state.cluster.heartbeat(self.owner, self.url)
                except Exception as exc:  # the next beat may reach the database again
                    log.warning("instance.heartbeat_failed", error=str(exc))

        self._heartbeat_thread = threading.Thread(target=beat, name="pipeline-heartbeat",
                                                  daemon=True)  # fmt: skip
        self._heartbeat_thread.start()

    def take_over(self) -> None:
        """The worker's look for work of dead instances (about once a second, between claims):
        when an instance's process is gone or its heartbeat is older than INSTANCE_TTL, its
        events, runs, leases and interrupted rollouts are recovered here (see `recover`)."""
        alive = self.state.cluster.owner_alive()
        if self.state.leases.break_locks_of(alive) or (
            self.queue.requeue_interrupted(alive)
            or self.state.rollouts.abandoned_releases(alive)
            or self.state.stale_runs(alive)
        ):
            log.warning("instance.taking_over", owner=self.owner)
            self.recover(alive)
            self.wake()

    def recover(self, owner_alive: Callable[[str], bool] = owner_alive_local) -> None:
        """Requeue events of dead owners; put back (or finish) the rollouts they left running,
        from what was recorded before each host was touched; mark their runs interrupted and
        free their leases; give each interrupted revision one fresh attempt. At start, and
        when the worker finds a dead instance's work (`take_over`)."""
        requeued = self.queue.requeue_interrupted(owner_alive)
        assert self._observer is not None
        recovery = Runner(self.loaded, self.state, self._observer, owner=self.owner)
        recovered = recover_interrupted(recovery, owner_alive)
        runs = self.state.interrupt_stale_runs(owner_alive)
        locks = self.state.leases.break_locks_of(owner_alive)
        if requeued or recovered or runs or locks:
            log.warning(
                "service.recovered",
                events=requeued,
                releases=[r.release_id for r in recovered],
                runs=runs,
                locks=locks,
            )
        cfg = self.loaded.model
        for name, svc in cfg.services.items():
            releases = self.state.releases(name, limit=100)
            if not releases or releases[0].status != "interrupted":
                continue
            rel = releases[0]
            if not fresh_attempt_due(releases, rel.id):
                log.warning(
                    "service.interrupted_not_retried",
                    service=name,
                    revision=rel.revision[:12],
                    reason="interrupted before; waiting for a newer commit or pipeline deploy",
                )
                continue
            # The delivery id makes this idempotent: two quick restarts queue it once.
            event_id, created = self.queue.put(
                source="recover",
                kind="deploy",
                repo=cfg.images[svc.image].repo,
                subject=name,
                sha=rel.revision,
                delivery_id=f"release-{rel.id}",
            )
            if created:
                log.warning(
                    "service.redeploy_interrupted",
                    service=name,
                    revision=rel.revision[:12],
                    event_id=event_id,
                )

    # -- config -----------------------------------------------------------------------------
    def _read_config(self) -> tuple[str, LoadedConfig]:
        try:
            text = self.config_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{self.config_path}: cannot read: {exc.strerror or exc}"]) from None
        return text, config_mod.parse(text, self.config_path)

    def reload(self) -> bool:
        """Reload the config file: True if a valid, changed config is now in use; an invalid one
        is logged problem by problem and the running config kept."""
        with self._reload_lock:
            try:
                text, loaded = self._read_config()
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("config.problem", problem=problem)
                log.error(
                    "config.invalid_kept_running",
                    path=str(self.config_path),
                    problems=len(exc.problems),
                )
                return False
            if text == self._config_text:
                return False
            old = self.loaded
            for what, before, after in (
                ("data_dir", old.data_dir, loaded.data_dir),
                ("server.listen", old.model.server.listen, loaded.model.server.listen),
            ):
                if before != after:
                    log.warning("config.needs_restart", key=what, running=str(before))
            self._config_text, self._loaded = text, loaded
            previous, self._observer = self._observer, Connections(loaded)
            if previous is not None:
                previous.close()
            self._warm(self._observer)
            self._sync_jobs()
            self._sync_repo_watches()
            log.info(
                "config.reloaded",
                repos=sorted(loaded.model.repos),
                services=sorted(loaded.model.services),
            )
            return True

    def _on_config_change(self) -> None:
        if self._stopping.is_set() or not self.reload():
            return
        event_id, _ = self.queue.put(source="watch", kind="config")
        log.info("config.event_queued", event_id=event_id)
        self.wake()

    # -- triggers ---------------------------------------------------------------------------
    def _sync_jobs(self) -> None:
        cfg = self.loaded.model
        polls = {name: repo.poll for name, repo in cfg.repos.items() if repo.poll}
        self._scheduler.sync_polls(polls, self.poll)
        crons = {name: img.rebuild for name, img in cfg.images.items() if img.rebuild}
        self._scheduler.sync_crons(crons, self._on_cron)

    def _sync_retries(self) -> None:
        """Re-arm the retry timers after a pass (none in `work_until`, which has no timers)."""
        if self._retrier is not None:
            self._retrier.sync()

    def _sync_repo_watches(self) -> None:
        wanted: dict[str, Path] = {}
        if self.watch_repos:
            for name, repo in self.loaded.model.repos.items():
                path = local_repo_path(repo.url)
                git_dir = git_dir_of(path) if path else None
                if git_dir is not None:
                    wanted[name] = git_dir.resolve()
                elif path is not None:
                    log.warning("watch.not_a_repo", repo=name, path=str(path))
        for name, path in list(self._watched.items()):
            if wanted.get(name) != path:
                self._watcher.unwatch(f"repo:{name}")
                del self._watched[name]
        for name, path in wanted.items():
            if name in self._watched:
                continue
            try:
                self._watcher.watch_git_refs(
                    f"repo:{name}", path, functools.partial(self._on_refs_change, name)
                )
            except OSError as exc:
                log.warning("watch.failed", repo=name, path=str(path), error=str(exc))
                continue
            self._watched[name] = path
            # Catch up with pushes made while nobody watched (before start, or before the
            # config named this repo).
            self._on_refs_change(name)

    def _on_refs_change(self, repo: str) -> None:
        try:
            self.check_repo(repo, source="watch")
        except Exception as exc:  # a trigger that fails is logged; the next change retries
            log.warning("watch.check_failed", repo=repo, error=str(exc))

    def _on_cron(self, image: str) -> None:
        img = self.loaded.model.images.get(image)
        # A cron tick fires on every instance; the minute's slot goes to one of them.
        if img is None or not self.state.cluster.claim_slot(f"cron:{image}", 60, self.owner):
            return
        event_id, _ = self.queue.put(source="cron", kind="rebuild", repo=img.repo, subject=image)
        log.info("cron.rebuild_queued", image=image, event_id=event_id)
        self.wake()

    def poll(self, repo: str) -> None:
        """One poll tick of `repo` (errors propagate, so the scheduler backs the repo off): run
        by the instance that claims this interval's slot, skipped on the others."""
        section = self.loaded.model.repos.get(repo)
        if section is None or not section.poll:
            return
        if not self.state.cluster.claim_slot(f"poll:{repo}", section.poll, self.owner):
            return
        metrics.observe_poll(repo)
        self.check_repo(repo, source="poll")

    def check_repo(self, repo: str, *, source: str) -> int | None:
        """Queue a push/tag event if the followed ref of `repo` moved past the mirror (one cheap
        ls-remote, no fetch); return its id, or None when nothing moved or an event waits."""
        observer = self._observer
        section = self.loaded.model.repos.get(repo)
        if section is None or observer is None or self.queue.newer_waiting(repo, 0):
            return None
        branch, tags = (None, section.tags) if section.tags else (section.branch or "main", None)
        mirror = observer.mirror(repo)
        ref, sha = None, None
        # A mirror is only ever created by the worker's fetch, never by this concurrent check.
        if (mirror.path / "HEAD").is_file():
            remote = mirror.remote_head(branch=branch, tags=tags)
            if remote is None:
                return None
            local = mirror.local_head(branch=branch, tags=tags)
            if local is not None and local.sha == remote.sha:
                return None
            ref, sha = remote.ref, remote.sha
        event_id, _ = self.queue.put(
            source=source, kind="tag" if tags else "push", repo=repo, ref=ref, sha=sha
        )
        log.info("repo.moved", repo=repo, source=source, revision=sha, event_id=event_id)
        self.wake()
        return event_id

    # -- helpers ----------------------------------------------------------------------------
    def _repo_heads(self) -> list[dict[str, Any]]:
        observer = self._observer
        return repo_heads(observer) if observer is not None else []

    def _commit_subject(self, repo: str, sha: str) -> str | None:
        observer = self._observer
        return commit_subject(observer, repo, sha) if observer is not None else None

    def _is_ancestor(self, repo: str, old: str, new: str) -> bool | None:
        observer = self._observer
        return is_ancestor(observer, repo, old, new) if observer is not None else None

    def _plan(self) -> dict[str, Any]:
        """What a pass would do now (`pipeline plan --json`): fetches, changes nothing."""
        assert self._observer is not None
        runner = Runner(self.loaded, self.state, self._observer, owner=self.owner)
        return runner.preview().to_json()

    def _warm(self, observer: Connections) -> None:
        """Ask the engine of every host a service runs on for a ping, in the background: a
        rollback handed over later (`rollback_now`) then pays no connection set-up, which on an
        ssh:// host is an ssh handshake (~0.45 s in the lab). At start, after a config reload,
        and every `keep_warm` seconds (KEEP_WARM; a connection that went away meanwhile is made
        again before a rollback needs it). An engine that does not answer is left to the
        rollout that needs it to report."""
        cfg = observer.loaded.model
        hosts = sorted({h for svc in cfg.services.values() if not svc.cluster for h in svc.hosts})

        def ping(host: str) -> None:
            with contextlib.suppress(Exception):  # a courtesy: nothing depends on it
                observer.engine(host).ping()

        for host in hosts:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: stopping
                self._warmer.submit(ping, host)

    def _keep_warm(self) -> None:
        while not self._stopping.wait(self.keep_warm):
            if self._observer is not None:
                self._warm(self._observer)

    def rollback_now(
        self, service: str, to: str | None, on_line: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Roll `service` back now, as `pipeline rollback SERVICE [--to TO]` does in a process of
        its own, with the service's warm engine and ssh connections; blocks until done.

        It runs on the caller's thread, beside the worker's pass if one runs (an urgent
        rollback never waits for another service's build), under an owner of its own
        ("HOST:PID/rollback-N", see `leases.process_of`): a pass rolling the same service out
        holds its lease, and the rollback then ends locked, as a command's would.

        Returns {"service", "ok", "locked", "bad_input" (the `to` or the service named nothing
        to go back to), "refused" (an error stopped it before any rollout: `error` says which),
        "error", "releases" (`release_json` of the release made)}; each progress line is passed
        to `on_line` as it comes. Raises `handoff.Stopping` when the service is stopping
        (nothing was done)."""
        if self._stopping.is_set():
            raise handoff_mod.Stopping("pipeline serve is stopping")

        def report(line: str) -> None:
            if on_line is not None:
                on_line(line)
            log.info("run.progress", line=line, source="rollback")
            if self.report is not None:
                self.report(line)

        assert self._observer is not None
        runner = Runner(
            self.loaded, self.state, self._observer, report=report, sleep=self.sleep,
            clock=self.clock, owner=f"{self.owner}/rollback-{next(self._handed)}",
        )  # fmt: skip
        answer: dict[str, Any] = {
            "service": service, "ok": False, "locked": False, "bad_input": False,
            "refused": False, "error": None, "releases": [],
        }  # fmt: skip
        try:
            outcome = rollback_service(runner, service, to)
        except PipelineError as exc:
            metrics.observe_run("failed")
            return answer | {
                "refused": True,
                "error": str(exc),
                "locked": isinstance(exc, LockedError),
                "bad_input": refused_as_bad_input(exc, to),
            }
        metrics.observe_run("succeeded" if outcome.ok else "failed")
        releases = [release_json(r) for r in self.state.releases(service, 1)
                    if outcome.release_id and r.id == outcome.release_id]  # fmt: skip
        return answer | {"ok": outcome.ok, "locked": outcome.locked, "error": outcome.error,
                         "releases": releases}  # fmt: skip

    def _status(self) -> list[dict[str, Any]]:
        observer = self._observer
        return status_rows(self.state, observer) if observer is not None else []
