"""The worker of `pipeline serve`: the one thread that claims queued events and runs passes.

Triggers only queue events; this loop settles bursts, claims them (coalesced per repo), runs
one pass per claim and records how each event ended, so two deploys never race. A push whose
commit the remote does not show yet is deferred in the queue and fetched again with backoff
(`pipeline.plan.announced`) while other events go on; it fails when the commit never shows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from pipeline.config.load import LoadedConfig
from pipeline.deploy.connections import Connections
from pipeline.deploy.operations import rollback_service
from pipeline.deploy.recovery import fresh_attempt_due
from pipeline.deploy.runner import PassResult, Runner
from pipeline.errors import PipelineError
from pipeline.plan.announced import never_appeared, next_fetch
from pipeline.service import metrics
from pipeline.service.retries import SOURCE as RETRY_SOURCE
from pipeline.sources.refs import HEX_SHA, newest_tag
from pipeline.state.queue import EventQueue, QueuedEvent
from pipeline.state.store import State
from pipeline.timeutil import epoch, utc

log = structlog.get_logger(__name__)

# A burst of pushes (a script, a rebase pushed branch by branch) arrives tens of ms apart: work
# starts once the queue was quiet this long, so the burst builds once; a lone push pays it.
SETTLE = 0.075
MAX_SETTLE = 2.0

# How often the worker looks for work left by dead instances (between claims).
HOUSEKEEPING = 1.0

SCHEDULED_REBUILD = "scheduled rebuild (base image pulled fresh)"
REQUESTED_REBUILD = "rebuild requested"


@dataclass(frozen=True)
class _Outcome:
    status: str  # a final event status (done|failed|superseded|ignored), or "deferred"
    run_id: int | None = None
    note: str | None = None
    until: float | None = None  # deferred: when to fetch again (epoch seconds)


@dataclass(frozen=True)
class _Missing:
    """An announced commit a fetch did not bring; `moved`: that fetch moved the followed ref."""

    sha: str
    moved: bool


class Worker:
    """Claims events from `queue` and handles them one claim at a time until `stopping` is set.

    `loaded` and `observer` (the service's long-lived mirrors) are called each time, so a config
    reload is seen by the next event; `reload` re-reads the config file (for "config" events);
    `after_pass` is called after each claim it handles (the service re-arms its retry timers);
    `housekeeping` about once a second between claims (the service takes dead instances' work
    over).
    Each pass gets engines and mirrors of its own, closed when it ends.
    """

    def __init__(
        self,
        *,
        loaded: Callable[[], LoadedConfig],
        state: State,
        queue: EventQueue,
        owner: str,
        stopping: threading.Event,
        wake: threading.Event,
        reload: Callable[[], object],
        observer: Callable[[], Connections | None],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        idle_wait: float,
        report: Callable[[str], None] | None = None,
        after_pass: Callable[[], None] | None = None,
        housekeeping: Callable[[], None] | None = None,
    ) -> None:
        self.loaded, self.state, self.queue, self.owner = loaded, state, queue, owner
        self._stopping, self._wake = stopping, wake
        self._reload, self._observer = reload, observer
        self.clock, self.sleep = clock, sleep
        self.idle_wait = idle_wait
        self.report = report
        self._after_pass = after_pass
        self._housekeeping = housekeeping
        self._housekept = float("-inf")

    def run(self) -> None:
        """The worker thread's loop: settle, claim, handle; idle until woken or `idle_wait`."""
        while not self._stopping.is_set():
            self._wake.clear()
            self._housekeep()
            try:
                self._settle()
                events = self.queue.claim(self.owner)
            except Exception as exc:  # the database may be busy or gone for a moment
                log.error("worker.claim_failed", error=str(exc))
                events = []
            if not events:
                self._wake.wait(self._idle_for())
                continue
            self.handle(events)
            if self._after_pass is not None and not self._stopping.is_set():
                try:
                    self._after_pass()
                except Exception as exc:  # the next pass tries again
                    log.error("worker.after_pass_failed", error=str(exc))

    def _housekeep(self) -> None:
        """Call `housekeeping` (the service's look for dead instances' work) at most once per
        HOUSEKEEPING seconds, on this thread: a rollout it recovers never races our own."""
        if self._housekeeping is None or self.clock() - self._housekept < HOUSEKEEPING:
            return
        self._housekept = self.clock()
        try:
            self._housekeeping()
        except Exception as exc:  # the database may be busy or gone for a moment
            log.error("worker.housekeeping_failed", error=str(exc))

    def _idle_for(self) -> float:
        """How long to wait for a wake-up: `idle_wait`, less when a deferred event falls due."""
        try:
            due = self.queue.next_due_in()
        except Exception:  # the database may be busy or gone for a moment
            due = None
        return self.idle_wait if due is None else min(self.idle_wait, max(due, 0.05))

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

    def _record_superseded(self, events: Sequence[QueuedEvent], run_id: int | None) -> None:
        """Show the pushed commits the run went past (all of `events`' but the one it deployed:
        coalesced, or already behind the branch's head when fetched) in `history` of the
        services the run rolled out (or, when an earlier run of the burst already rolled the
        head out, of the services running it), as superseded: the others did not change."""
        newest, cfg = events[-1], self.loaded()
        if newest.kind not in ("push", "tag") or newest.repo not in cfg.model.repos:
            return
        run = self.state.run(run_id) if run_id is not None else None
        deployed = run.revision if run is not None else None
        if deployed is None:  # nothing fetched: no newer commit is known to have replaced them
            return
        assert run_id is not None
        services = self.state.services_released_by(run_id) or self._running(newest.repo, deployed)
        observer = self._observer()
        mirror = observer.mirror(newest.repo) if observer is not None else None
        seen = {deployed}
        for ev in events:
            if ev.source == RETRY_SOURCE:
                continue  # names a revision already rolled out once, not a commit gone past
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

    def _running(self, repo: str, revision: str) -> list[str]:
        """The services of `repo`'s images deployed at `revision` now: when a run found the
        head already deployed (an earlier run of the same burst fetched it), the commits this
        one went past were superseded in them."""
        model = self.loaded().model
        images = {name for name, image in model.images.items() if image.repo == repo}
        return sorted(
            {
                d.service
                for d in self.state.deployments()
                if d.revision == revision
                and d.service in model.services
                and model.services[d.service].image in images
            }
        )

    def handle(self, events: Sequence[QueuedEvent]) -> None:
        """Handle claimed `events` (coalesced; the newest is acted on) and finish them all;
        never raises. Events interrupted by a stop are left "working"."""
        newest = events[-1]
        structlog.contextvars.bind_contextvars(event_id=newest.id)
        try:
            outcome = self._dispatch(events)
        except Exception as exc:  # one event's failure must never kill the worker
            note = f"{type(exc).__name__}: {exc}"  # the log and the queue column mask it
            log.error("event.failed", kind=newest.kind, repo=newest.repo, error=note)
            metrics.observe_run("error")
            self.queue.finish([e.id for e in events], "failed", note=note)
            return
        finally:
            structlog.contextvars.unbind_contextvars("event_id")
        if outcome is None:
            return  # interrupted by stop(): left "working", requeued when the service stops
        if outcome.status == "deferred":
            assert outcome.until is not None
            self.queue.defer(newest.id, outcome.until, outcome.note or "")
        else:
            self.queue.finish([newest.id], outcome.status, run_id=outcome.run_id, note=outcome.note)
        if len(events) > 1:
            by = (newest.sha or "")[:12] or f"event {newest.id}"
            self.queue.finish(
                [e.id for e in events[:-1]],
                "superseded",
                run_id=outcome.run_id,
                note=f"superseded by {by}",
            )
        if outcome.status != "deferred":
            self._record_superseded(events, outcome.run_id)
        log.info(
            "event.finished",
            kind=newest.kind,
            repo=newest.repo,
            status=outcome.status,
            run_id=outcome.run_id,
            coalesced=len(events),
            error=outcome.note if outcome.status == "failed" and outcome.note else None,
        )

    def _dispatch(self, events: Sequence[QueuedEvent]) -> _Outcome | None:
        ev = events[-1]
        cfg = self.loaded().model
        if ev.kind == "config":
            self._reload()
            return self._pass(ev, None, trigger="config")
        if ev.kind in ("push", "tag"):
            if ev.repo not in cfg.repos:
                return _Outcome("ignored", note=f"repo {ev.repo!r} is not in the config")
            return self._push(ev, ev.repo)
        if ev.kind == "rebuild":
            image = cfg.images.get(ev.subject or "")
            if image is None:
                return _Outcome("ignored", note=f"image {ev.subject!r} is not in the config")
            # A scheduled rebuild pulls the base image fresh; an unchanged result restarts nothing.
            return self._pass(
                ev,
                image.repo,
                trigger=ev.source,
                force_images=[ev.subject or ""],
                force_reason=SCHEDULED_REBUILD if ev.source == "cron" else REQUESTED_REBUILD,
                pull_base=True,
            )
        svc = cfg.services.get(ev.subject or "")
        if svc is None:
            return _Outcome("ignored", note=f"service {ev.subject!r} is not in the config")
        name = ev.subject or ""
        if ev.kind == "deploy" and ev.source == "recover":
            # The requeued event that was interrupted usually redeploys the service first; a
            # second rollout of the same revision would only restart it on every host again.
            latest = self.state.releases(name, limit=100)
            if latest and latest[0].status == "succeeded" and latest[0].revision == ev.sha:
                return _Outcome(
                    "superseded",
                    latest[0].run_id,
                    f"{name} already redeployed at {latest[0].revision[:12]}",
                )
            # One fresh attempt per interruption: not when a pass already made it.
            interrupted = (ev.delivery_id or "").removeprefix("release-")
            if interrupted.isdigit() and not fresh_attempt_due(latest, int(interrupted)):
                return _Outcome(
                    "superseded",
                    latest[0].run_id if latest else None,
                    f"{name} at {(ev.sha or '')[:12]} was already tried again after its "
                    "interruption",
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
            runner = self.runner(self.loaded(), log_prefix=f"event {ev.id}")
            try:
                result = rollback_service(runner, name, ev.sha)
            finally:
                runner.connections.close()
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
        force_reason: str = REQUESTED_REBUILD,
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

        runner = self.runner(self.loaded(), should_stop=should_stop, log_prefix=f"event {ev.id}")
        try:
            result = runner.run_pass(
                repo,
                trigger=trigger,
                only_services=only_services,
                ignore_failed=ignore_failed,
                force_images=force_images,
                force_reason=force_reason,
                pinned=pinned,
                force_services=force_services,
                pull_base=pull_base,
            )
        finally:
            runner.connections.close()
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
            said = "a newer push is queued" + (f"; {note}" if note else "")
            return _Outcome("superseded", result.run_id, said)
        return _Outcome("done" if result.ok else "failed", result.run_id, note)

    def _push(self, ev: QueuedEvent, repo: str) -> _Outcome | None:
        """A push or tag of `repo`: a pass when the commit it names is on the remote (or it
        names none); else the event waits for it, deferred, and fails once it waited
        `[server] announced_commit_timeout` since it arrived. The ref's new head, when the
        fetch moved it, is rolled out meanwhile."""
        missing = self._fetch_announced(ev, repo)
        if missing is None:
            return self._pass(ev, repo, trigger=ev.source)
        if missing.moved:
            outcome = self._pass(ev, repo, trigger=ev.source)
            if outcome is None:
                return None  # interrupted by stop: requeued, it waits again after the restart
        received, now = epoch(ev.received_at), epoch(self.state.now())
        timeout = self.loaded().model.server.announced_commit_timeout
        until = next_fetch(received, now, timeout)
        if until is None:
            return self._never_appeared(ev, repo, missing.sha, timeout)
        deadline = utc(received + timeout).strftime("%H:%M:%S")
        log.info(
            "event.waiting_for_commit",
            repo=repo,
            revision=missing.sha,
            next_fetch_in=round(until - now, 1),
        )
        note = (
            f"waiting for announced commit {missing.sha[:12]} to appear on the remote "
            f"(until {deadline} UTC)"
        )
        return _Outcome("deferred", note=note, until=until)

    def _fetch_announced(self, ev: QueuedEvent, repo: str) -> _Missing | None:
        """Fetch `repo`; the commit `ev` names when it is not on the followed ref after the
        fetch, else None (also when `ev` names no commit, or the fetch failed: the pass fetches
        again and reports that). A retry event announces nothing: it names a revision that was
        fetched and failed before."""
        sha = (ev.sha or "").lower()
        observer, section = self._observer(), self.loaded().model.repos.get(repo)
        if ev.source == RETRY_SOURCE or not HEX_SHA.fullmatch(sha):
            return None
        if observer is None or section is None:
            return None
        branch, tags = (None, section.tags) if section.tags else (section.branch or "main", None)
        mirror = observer.mirror(repo)
        try:
            with observer.mirror_lock(repo):
                # Always fetch: a commit fetched before may have been force-pushed away since.
                # When nothing moved, a fetch costs what the pass's ls-remote would have.
                before = mirror.local_head(branch=branch, tags=tags)
                after = mirror.fetch(branch=branch, tags=tags)
                if mirror.has_fetched(sha, branch=branch, tags=tags):
                    return None
        except PipelineError as exc:
            log.warning("event.announced_fetch_failed", repo=repo, error=str(exc))
            return None
        return _Missing(sha, moved=before != after)

    def _never_appeared(self, ev: QueuedEvent, repo: str, sha: str, timeout: float) -> _Outcome:
        """Record a failed run of `repo`, and a failed release of `sha` in the history of each
        of its services, for an announced commit that did not show within `timeout` s."""
        message = never_appeared(sha)
        run_id = self.state.start_run(ev.source, repo, owner=self.owner)
        step = self.state.start_step(run_id, "fetch", repo, revision=sha)
        self.state.finish_step(step, "failed", error=f"{message} (waited {timeout:g}s)")
        loaded = self.loaded()
        images = set(loaded.images_of_repo(repo))
        for name, svc in loaded.model.services.items():
            if svc.image in images:
                self.state.record_never_appeared(name, sha, message, run_id, at=ev.received_at)
        self.state.finish_run(run_id, "failed", error=message)
        metrics.observe_run("failed")
        log.warning("event.commit_never_appeared", repo=repo, revision=sha, waited=timeout)
        return _Outcome("failed", run_id, message)

    def _newer_commit_waiting(
        self, repo: str, than_id: int, pinned: dict[str, str] | None, contained: set[str]
    ) -> bool:
        """True when a push/tag of `repo` queued after event `than_id` brings a commit that the
        one this pass rolls out (pinned, else the mirror's head) does not contain. Late
        deliveries of older commits (ten pushes in a second) must not undo a rollout of the
        newest; `contained` caches the commits (and refs) found to be included. A retry event
        brings no commit, it names one that failed before: it must not cut short a rollout (such
        as `pipeline deploy` of an older revision).

        A release event names a tag and often no commit (GitHub, Gitea, Forgejo): it counts by
        that tag's commit in the mirror, so a release of the tag being rolled out brings nothing;
        a tag the mirror does not have yet may be new. For a repo following tags, a tag no newer
        (by the version order the pass deploys by) than the one rolled out brings nothing."""
        waiting = [
            (sha, ref)
            for sha, ref in self.queue.waiting_revisions(repo, than_id, ignore_source=RETRY_SOURCE)
            if (sha or ref) not in contained
        ]
        if not waiting:
            return False
        observer, section = self._observer(), self.loaded().model.repos.get(repo)
        if observer is None or section is None:
            return True
        mirror = observer.mirror(repo)
        try:
            local_tag: str | None = None
            if pinned and repo in pinned:
                head: str | None = mirror.resolve(pinned[repo])
            else:
                branch = None if section.tags else (section.branch or "main")
                local = mirror.local_head(branch=branch, tags=section.tags)
                head, local_tag = (local.sha, local.tag) if local else (None, None)
            for sha, ref in waiting:
                tag = (
                    ref.removeprefix("refs/tags/") if ref and ref.startswith("refs/tags/") else None
                )
                if head is None or (sha is None and tag is None):
                    return True  # an event that names no commit may bring anything
                if (
                    tag is not None
                    and local_tag is not None
                    and section.tags
                    and newest_tag([local_tag, tag], section.tags) == local_tag
                ):
                    contained.add(sha or tag)  # the tag rolled out, or an older one
                    continue
                # A tag the mirror lacks raises (not fetched yet): it may be new.
                commit = sha if sha is not None else mirror.resolve(tag or "")
                if commit != head and not mirror.is_ancestor(commit, head):
                    return True
                contained.add(sha or ref or commit)
        except PipelineError:
            return True  # cannot tell: the newer event wins, as before
        return False

    # -- helpers ----------------------------------------------------------------------------
    def runner(
        self,
        loaded: LoadedConfig,
        *,
        should_stop: Callable[[], bool] | None = None,
        log_prefix: str = "",
    ) -> Runner:
        """A Runner over `loaded`, with engines and mirrors of its own (the caller closes them:
        `runner.connections.close()`), that logs its progress lines (and passes them to
        `report`)."""

        def report(line: str) -> None:
            log.info("run.progress", line=line, source=log_prefix or None)
            if self.report is not None:
                self.report(line)

        return Runner(
            loaded,
            self.state,
            Connections(loaded),
            owner=self.owner,
            report=report,
            sleep=self.sleep,
            clock=self.clock,
            should_stop=should_stop,
        )

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
