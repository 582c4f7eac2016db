"""`pipeline serve`: the long-running service around the runner.

Triggers (webhooks, polls, cron ticks, file events, git hooks) only put events in the durable
queue; ONE worker thread claims them and runs passes, so two deploys never race. On start it
recovers what a crash left behind: events still "working", runs and leases of dead owners, and
services whose rollout was interrupted midway.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from pipeline import config as config_mod
from pipeline import metrics
from pipeline import server as server_mod
from pipeline.config import LoadedConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.operations import rollback_service, status_rows
from pipeline.queue import EventQueue, QueuedEvent
from pipeline.redact import redact
from pipeline.runner import PassResult, Runner
from pipeline.scheduler import Scheduler
from pipeline.state import State, default_owner, owner_alive_local
from pipeline.watch import Watcher, git_dir_of, local_repo_path

log = structlog.get_logger(__name__)

IDLE_WAIT = 1.0  # also how soon events queued by another process (a git hook) are noticed
# A burst of pushes (a script, a rebase pushed branch by branch) arrives tens of ms apart: work
# starts once the queue was quiet this long, so the burst builds once; a lone push pays it.
SETTLE = 0.075
MAX_SETTLE = 2.0


@dataclass(frozen=True)
class _Outcome:
    status: str  # a final event status: done|failed|superseded|ignored
    run_id: int | None = None
    note: str | None = None


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
    ) -> None:
        self.config_path = config_path
        self.clock, self.sleep = clock, sleep
        self.owner = owner or default_owner()
        self.watch_repos = watch_repos
        self.idle_wait = idle_wait
        self.report = report
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._reload_lock = threading.Lock()
        self._scheduler = Scheduler()
        self._watcher = Watcher()
        self._watched: dict[str, Path] = {}
        self._worker: threading.Thread | None = None
        self._http: server_mod.RunningServer | None = None
        self._config_text = ""
        self._loaded: LoadedConfig | None = None
        self._state: State | None = None
        self._queue: EventQueue | None = None
        self._observer: Runner | None = None

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
    def url(self) -> str | None:
        """Where the HTTP server listens (the real port, when `listen` asked for port 0)."""
        return self._http.url if self._http else None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Load the config (ConfigError if invalid), recover from a crash, start everything."""
        self._open()
        ctx = server_mod.ServerContext(
            loaded=lambda: self.loaded,
            state=self.state,
            queue=self.queue,
            status=self._status,
            wake=self.wake,
            started_at=time.time(),
        )
        self._http = server_mod.start(server_mod.create_app(ctx), self.loaded.model.server.listen)
        try:
            self._scheduler.start()
            self._sync_jobs()
            self._watcher.watch_file("config", self.config_path, self._on_config_change)
            self._sync_repo_watches()
            self._watcher.start()
        except BaseException:
            self.stop()
            raise
        self._worker = threading.Thread(target=self._work, name="pipeline-worker", daemon=True)
        self._worker.start()
        log.info("service.started", owner=self.owner, url=self.url)

    def _open(self) -> None:
        self._config_text, self._loaded = self._read_config()
        self._state = State.in_dir(self.loaded.data_dir)
        self._queue = EventQueue(self.state)
        self._observer = self._runner(self.loaded)
        self.recover()

    def work_until(self, done: Callable[[], bool]) -> bool:
        """Be the worker in this process, without server, timers or watchers, until `done()`
        (a git hook's fallback when the service is down). False if the queue ran dry first:
        another worker claimed what was left."""
        self._open()
        try:
            while not done():
                events = self.queue.claim(self.owner)
                if not events:
                    return False
                self._handle(events)
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
        if self._http is not None:
            self._http.stop()
        self._scheduler.shutdown()
        self._watcher.stop()
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.warning("service.worker_still_busy", timeout=timeout)
        if self._queue is not None and not (self._worker and self._worker.is_alive()):
            # Ours and unfinished: queue them again for the next start (even in this process).
            self._queue.requeue_interrupted(lambda owner: owner != self.owner)
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

    # -- recovery ---------------------------------------------------------------------------
    def recover(self) -> None:
        """Requeue events and break runs/leases of dead owners; redeploy interrupted services."""
        requeued = self.queue.requeue_interrupted(owner_alive_local)
        runs = self.state.interrupt_stale_runs(owner_alive_local)
        locks = self.state.break_locks_of(owner_alive_local)
        if requeued or runs or locks:
            log.warning("service.recovered", events=requeued, runs=runs, locks=locks)
        cfg = self.loaded.model
        for name, svc in cfg.services.items():
            latest = self.state.releases(name, limit=1)
            if not latest or latest[0].status != "interrupted":
                continue
            rel = latest[0]
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
            previous, self._observer = self._observer, self._runner(loaded)
            if previous is not None:
                previous.close()
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
            log.warning("watch.check_failed", repo=repo, error=redact(str(exc)))

    def _on_cron(self, image: str) -> None:
        img = self.loaded.model.images.get(image)
        if img is None:
            return
        event_id, _ = self.queue.put(source="cron", kind="rebuild", repo=img.repo, subject=image)
        log.info("cron.rebuild_queued", image=image, event_id=event_id)
        self.wake()

    def poll(self, repo: str) -> None:
        """One poll tick of `repo` (errors propagate, so the scheduler backs the repo off)."""
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

    # -- the worker -------------------------------------------------------------------------
    def _settle(self) -> None:
        """Let a burst land before work starts: while events keep arriving less than SETTLE
        apart, wait (at most MAX_SETTLE), so ten pushes in a second build once, the newest.
        A lone push waits SETTLE at most."""
        started = self.clock()
        while not self._stopping.is_set():
            quiet = self.queue.quiet_for()
            if quiet is None or quiet >= SETTLE or self.clock() - started >= MAX_SETTLE:
                return
            self._stopping.wait(SETTLE - quiet)

    def _work(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self._settle()
                events = self.queue.claim(self.owner)
            except Exception as exc:  # the database may be busy or gone for a moment
                log.error("worker.claim_failed", error=redact(str(exc)))
                events = []
            if not events:
                self._wake.wait(self.idle_wait)
                continue
            self._handle(events)

    def _record_superseded(self, events: Sequence[QueuedEvent], run_id: int | None) -> None:
        """Show the pushed commits the run went past (all of `events`' but the one it deployed:
        coalesced, or already behind the branch's head when fetched) in `history` of the
        repo's services, as superseded."""
        newest, cfg = events[-1], self.loaded
        if newest.kind not in ("push", "tag") or newest.repo not in cfg.model.repos:
            return
        run = self.state.run(run_id) if run_id is not None else None
        deployed = run.revision if run is not None else None
        if deployed is None:  # nothing fetched: no newer commit is known to have replaced them
            return
        services = [s for i in cfg.images_of_repo(newest.repo) for s in cfg.services_of_image(i)]
        mirror = self._observer.mirror(newest.repo) if self._observer is not None else None
        seen = {deployed}
        for ev in events:
            commit = ev.sha
            if commit and mirror is not None:
                with contextlib.suppress(PipelineError):
                    commit = mirror.resolve(commit)  # an annotated tag's object -> its commit
            if commit and commit not in seen:
                seen.add(commit)
                for service in services:
                    self.state.record_superseded(
                        service,
                        commit,
                        f"superseded by {deployed[:12]} before it was built",
                        run_id,
                        at=ev.received_at,
                    )

    def _handle(self, events: Sequence[QueuedEvent]) -> None:
        newest = events[-1]
        structlog.contextvars.bind_contextvars(event_id=newest.id)
        try:
            outcome = self._dispatch(events)
        except Exception as exc:  # one event's failure must never kill the worker
            note = redact(f"{type(exc).__name__}: {exc}")
            log.error("event.failed", kind=newest.kind, repo=newest.repo, error=note)
            metrics.observe_run("error")
            self.queue.finish([e.id for e in events], "failed", note=note)
            return
        finally:
            structlog.contextvars.unbind_contextvars("event_id")
        if outcome is None:
            return  # interrupted by stop(): left "working", requeued when the service stops
        self.queue.finish([newest.id], outcome.status, run_id=outcome.run_id, note=outcome.note)
        if len(events) > 1:
            by = (newest.sha or "")[:12] or f"event {newest.id}"
            self.queue.finish(
                [e.id for e in events[:-1]],
                "superseded",
                run_id=outcome.run_id,
                note=f"superseded by {by}",
            )
        self._record_superseded(events, outcome.run_id)
        log.info(
            "event.finished",
            kind=newest.kind,
            repo=newest.repo,
            status=outcome.status,
            run_id=outcome.run_id,
            coalesced=len(events),
        )

    def _dispatch(self, events: Sequence[QueuedEvent]) -> _Outcome | None:
        ev = events[-1]
        cfg = self.loaded.model
        if ev.kind == "config":
            self.reload()
            return self._pass(ev, None, trigger="config")
        if ev.kind in ("push", "tag"):
            if ev.repo not in cfg.repos:
                return _Outcome("ignored", note=f"repo {ev.repo!r} is not in the config")
            return self._pass(ev, ev.repo, trigger=ev.source)
        if ev.kind == "rebuild":
            image = cfg.images.get(ev.subject or "")
            if image is None:
                return _Outcome("ignored", note=f"image {ev.subject!r} is not in the config")
            # A scheduled rebuild pulls the base image fresh; an unchanged result restarts nothing.
            return self._pass(
                ev, image.repo, trigger=ev.source, force_images=[ev.subject or ""], pull_base=True
            )
        svc = cfg.services.get(ev.subject or "")
        if svc is None:
            return _Outcome("ignored", note=f"service {ev.subject!r} is not in the config")
        name = ev.subject or ""
        if ev.kind == "deploy" and ev.source == "recover":
            # The requeued event that was interrupted usually redeploys the service first; a
            # second rollout of the same revision would only restart it on every host again.
            latest = self.state.releases(name, limit=1)
            if latest and latest[0].status == "succeeded" and latest[0].revision == ev.sha:
                return _Outcome(
                    "superseded",
                    latest[0].run_id,
                    f"{name} already redeployed at {latest[0].revision[:12]}",
                )
        if ev.kind == "deploy":
            repo = cfg.images[svc.image].repo
            return self._pass(
                ev,
                repo,
                trigger=ev.source,
                only_services=[name],
                ignore_failed=True,
                force_services=[name],
                pinned={repo: ev.sha} if ev.sha else None,
            )
        if ev.kind == "rollback":
            runner = self._runner(self.loaded, log_prefix=f"event {ev.id}")
            try:
                result = rollback_service(runner, name, ev.sha)
            finally:
                runner.close()
            run_id = self._latest_run_id()
            metrics.observe_run("succeeded" if result.ok else "failed")
            return _Outcome("done" if result.ok else "failed", run_id, result.error)
        return _Outcome("ignored", note=f"unknown event kind {ev.kind!r}")

    def _pass(
        self,
        ev: QueuedEvent,
        repo: str | None,
        *,
        trigger: str,
        only_services: list[str] | None = None,
        ignore_failed: bool = False,
        force_images: Sequence[str] = (),
        force_services: Sequence[str] = (),
        pinned: dict[str, str] | None = None,
        pull_base: bool = False,
    ) -> _Outcome | None:
        contained: set[str] = set()

        def should_stop() -> bool:
            # A newer commit of the same repo supersedes a rollout still waiting for health.
            return self._stopping.is_set() or (
                repo is not None and self._newer_commit_waiting(repo, ev.id, pinned, contained)
            )

        runner = self._runner(self.loaded, should_stop=should_stop, log_prefix=f"event {ev.id}")
        try:
            result = runner.run_pass(
                repo,
                trigger=trigger,
                only_services=only_services,
                ignore_failed=ignore_failed,
                force_images=force_images,
                pinned=pinned,
                force_services=force_services,
                pull_base=pull_base,
            )
        finally:
            runner.close()
        outcome = (
            "noop" if result.ok and result.plan.empty else ("succeeded" if result.ok else "failed")
        )
        metrics.observe_run(outcome)
        self._observe_durations(result)
        if not result.ok and self._stopping.is_set():
            log.warning("event.interrupted_by_stop", run_id=result.run_id)
            return None
        note = "; ".join(result.errors)[:2000] or None
        if (
            not result.ok
            and repo is not None
            and self._newer_commit_waiting(repo, ev.id, pinned, contained)
        ):
            # Its rollout gave way to a newer commit (recorded as superseded, not as broken).
            return _Outcome("superseded", result.run_id, f"a newer push is queued; {note}")
        return _Outcome("done" if result.ok else "failed", result.run_id, note)

    def _newer_commit_waiting(
        self, repo: str, than_id: int, pinned: dict[str, str] | None, contained: set[str]
    ) -> bool:
        """True when a push/tag of `repo` queued after event `than_id` brings a commit that the
        one this pass rolls out (pinned, else the mirror's head) does not contain. Late
        deliveries of older commits (ten pushes in a second) must not undo a rollout of the
        newest; `contained` caches the commits found to be included."""
        waiting = [sha for sha in self.queue.waiting_shas(repo, than_id) if sha not in contained]
        if not waiting:
            return False
        observer, section = self._observer, self.loaded.model.repos.get(repo)
        if observer is None or section is None:
            return True
        mirror = observer.mirror(repo)
        try:
            if pinned and repo in pinned:
                head: str | None = mirror.resolve(pinned[repo])
            else:
                branch = None if section.tags else (section.branch or "main")
                local = mirror.local_head(branch=branch, tags=section.tags)
                head = local.sha if local else None
            for sha in waiting:
                if sha is None or head is None:
                    return True  # an event that names no commit may bring anything
                if sha != head and not mirror.is_ancestor(sha, head):
                    return True
                contained.add(sha)
        except PipelineError:
            return True  # cannot tell: the newer event wins, as before
        return False

    # -- helpers ----------------------------------------------------------------------------
    def _runner(
        self,
        loaded: LoadedConfig,
        *,
        should_stop: Callable[[], bool] | None = None,
        log_prefix: str = "",
    ) -> Runner:
        def report(line: str) -> None:
            log.info("run.progress", line=redact(line), source=log_prefix or None)
            if self.report is not None:
                self.report(line)

        return Runner(
            loaded,
            self.state,
            owner=self.owner,
            report=report,
            sleep=self.sleep,
            clock=self.clock,
            should_stop=should_stop,
        )

    def _status(self) -> list[dict[str, Any]]:
        observer = self._observer
        return status_rows(observer) if observer is not None else []

    def _latest_run_id(self) -> int | None:
        runs = self.state.runs(limit=1)
        return runs[0].id if runs else None

    def _observe_durations(self, result: PassResult) -> None:
        for step in self.state.steps(result.run_id):
            if step.kind == "build" and step.status == "succeeded" and step.finished_at:
                metrics.observe_build((step.finished_at - step.started_at).total_seconds())
        for rel in self.state.releases(limit=50):
            if rel.run_id == result.run_id and rel.finished_at:
                metrics.observe_rollout((rel.finished_at - rel.started_at).total_seconds())
