"""One pass of work: observe the repos, plan, build and push, roll out. Recorded step by step.

`pipeline run` calls `Runner.run_pass`; the service calls the same code for every event.
Stages are visible (observe, plan, apply) so `pipeline plan` stops after the plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import structlog

from pipeline.build.builder import Artifact, Builder
from pipeline.config.envfile import EnvFileError
from pipeline.config.load import LoadedConfig
from pipeline.config.model import ServiceSection
from pipeline.deploy.cluster import ClusterRollout
from pipeline.deploy.connections import Connections
from pipeline.deploy.placement import check_rollouts, overlay_manager
from pipeline.deploy.recovery import recover_service
from pipeline.deploy.rollout import Rollout as RolloutExecutor
from pipeline.deploy.rollout import RolloutResult, Target
from pipeline.errors import LockedError, PipelineError
from pipeline.plan.planner import (
    Build,
    Plan,
    Problem,
    RepoSnapshot,
    Rollout,
    plan,
    service_spec_hash,
)
from pipeline.redact import redact, redact_url
from pipeline.retry import RetryPolicy
from pipeline.sources.git import Mirror, Revision
from pipeline.state.rollbacks import ServiceSettings
from pipeline.state.store import State, default_owner

log = structlog.get_logger(__name__)

Report = Callable[[str], None]


@dataclass(frozen=True)
class EnvFiles:
    """The services' env files as one pass read them: the text of each that reads (service name
    -> text) and the problem of each that does not (service name -> `FILE:LINE:
    services.NAME.env_file: ...`); both read-only."""

    texts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    errors: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def read_env_files(loaded: LoadedConfig) -> EnvFiles:
    """Read and check every service's `env_file` (relative to the config's directory), its
    values registered as secrets; a file that cannot be used fails only its own service."""
    texts, errors = {}, {}
    for name in loaded.model.services:
        try:
            env_file = loaded.read_env_file(name)
        except EnvFileError as exc:
            errors[name] = str(exc)
            continue
        if env_file is not None:
            texts[name] = env_file.text
    return EnvFiles(MappingProxyType(texts), MappingProxyType(errors))


@dataclass
class Observed:
    """What the observe stage read: per repo its new revision and the planner's snapshot, and
    the services' env files, read once so that what is hashed for the plan is what is deployed."""

    revisions: dict[str, Revision] = field(default_factory=dict)
    snapshots: dict[str, RepoSnapshot] = field(default_factory=dict)
    env: EnvFiles = field(default_factory=EnvFiles)
    # Repo name -> why it has nothing to deploy (its followed branch or tag is not there)
    absent: dict[str, str] = field(default_factory=dict)

    @property
    def env_files(self) -> Mapping[str, str]:
        """Service name -> the text of its env_file, for the services whose file reads."""
        return self.env.texts


@dataclass
class PassResult:
    """One pass's outcome; `errors` are not reported by the runner: its caller shows them."""

    run_id: int
    plan: Plan
    ok: bool
    errors: list[str] = field(default_factory=list)
    rollouts: list[RolloutResult] = field(default_factory=list)
    superseded: bool = False  # a rollout gave way to a newer commit (the next pass deploys it)

    @property
    def locked(self) -> bool:
        """True when a rollout did not start because another owner held its service's lease."""
        return any(r.locked for r in self.rollouts)


class Runner:
    """Drives observe → plan → build → roll out for one config; collaborators are injected:
    the state, the engines and mirrors (`connections`, closed by whoever made them), the clock."""

    def __init__(
        self,
        loaded: LoadedConfig,
        state: State,
        connections: Connections,
        *,
        owner: str | None = None,
        report: Report = lambda _line: None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        should_stop: Callable[[], bool] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.loaded = loaded
        self.cfg = loaded.model
        self.state = state
        self.owner = owner or default_owner()
        # Every line a pass prints (CLI, git hook, service log) goes through here: mask secrets
        # once, whoever the caller is (an app's log lines end up in health-check messages).
        self.report: Report = lambda line: report(redact(line))
        self.sleep = sleep
        self.clock = clock
        self.should_stop = should_stop
        self.connections = connections
        # One policy for pushes, pulls and inspections: the one the engines were made with,
        # unless the caller injects another (tests: one that does not sleep).
        self.retry = retry or connections.retry
        self.builder = Builder(loaded, state, connections, report=self.report, retry=self.retry)

    # -- observe ----------------------------------------------------------------------------
    def observe(
        self,
        repos: Iterable[str],
        *,
        pinned: dict[str, str] | None = None,
        run_id: int | None = None,
    ) -> Observed:
        """Read the env files, then fetch each repo (after a cheap ls-remote says it moved) and
        snapshot its new revision."""
        observed = Observed(env=read_env_files(self.loaded))
        for name in repos:
            repo = self.cfg.repos[name]
            branch, tags = (None, repo.tags) if repo.tags else (repo.branch or "main", None)
            mirror = self.connections.mirror(name)
            step = run_id and self.state.start_step(run_id, "fetch", name)
            try:
                with self.connections.mirror_lock(name):
                    remote = mirror.remote_head(branch=branch, tags=tags)
                    local = mirror.local_head(branch=branch, tags=tags)
                    rev = (
                        local
                        if (remote and local and remote.sha == local.sha)
                        else mirror.fetch(branch=branch, tags=tags)
                    )
                    if pinned and name in pinned:
                        sha = mirror.resolve(pinned[name])
                        rev = Revision(sha=sha, ref=rev.ref if rev else "", tag=None, version=None)
                    if rev is None:
                        # Silence here read as "up to date" to someone whose branch is named
                        # `master` where the config says `main`: say what is missing, and where.
                        what = (
                            f"no tag matches {repo.tags!r}"
                            if repo.tags
                            else (f"branch {branch!r} is not")
                        )
                        observed.absent[name] = (
                            f"{what} on {redact_url(repo.url)}: nothing to deploy from it yet"
                        )
                        if step:
                            self.state.finish_step(
                                step, "skipped", detail=f"{repo.follows}: nothing to deploy yet"
                            )
                        continue
                    observed.revisions[name] = rev
                    observed.snapshots[name] = self._snapshot(name, mirror, rev.sha)
                if step:
                    self.state.finish_step(step, "succeeded", detail=rev.sha)
            except PipelineError as exc:
                if step:
                    self.state.finish_step(step, "failed", error=str(exc))
                raise
        return observed

    def _snapshot(self, name: str, mirror: Mirror, sha: str) -> RepoSnapshot:
        images = self.loaded.images_of_repo(name)
        records = self.state.image_records(images)
        changes = {r.revision: mirror.changed_paths(r.revision, sha) for r in records.values()}
        contexts = {self.cfg.images[i].context for i in images}
        ignores: dict[str, str] = {}
        for ctx in contexts:
            text = mirror.read_file(sha, ".dockerignore" if ctx == "." else f"{ctx}/.dockerignore")
            if text is not None:
                ignores[ctx] = text.decode("utf-8", "replace")
        return RepoSnapshot(
            repo=name,
            revision=sha,
            files=frozenset(mirror.list_files(sha)),
            changes=changes,
            dockerignores=ignores,
            submodules=frozenset(mirror.submodule_paths(sha)),
        )

    # -- plan -------------------------------------------------------------------------------
    def make_plan(
        self,
        observed: Observed,
        *,
        only_services: Iterable[str] | None = None,
        ignore_failed: bool = False,
        force_images: Iterable[str] = (),
        force_reason: str = "requested",
    ) -> Plan:
        images = list(self.cfg.images)
        services = list(self.cfg.services)
        the_plan = plan(
            self.cfg,
            observed.snapshots,
            self.state.image_records(images),
            self.state.service_records(services),
            env_files=observed.env_files,
            env_file_errors=observed.env.errors,
            failed={} if ignore_failed else self.state.failed_revisions(services),
            force_images=force_images,
            force_reason=force_reason,
            only_services=only_services,
            pins=self.state.rollbacks.pins(),
        )
        if observed.absent:
            notes = tuple(Problem(f"repos.{n}", m) for n, m in sorted(observed.absent.items()))
            the_plan = replace(the_plan, problems=the_plan.problems + notes)
        # What the builder cannot do (a BuildKit-only key on the legacy builder, a secret that
        # is not there) is an error now, located in the config, before anything is built.
        self.builder.check(the_plan.builds)
        # What only the engines know: a cluster that is a Swarm manager, an overlay network's
        # hosts in one Swarm (a ConfigError at the key, before anything moves).
        check_rollouts(self.loaded, self.connections, [r.service for r in the_plan.rollouts])
        return the_plan

    def preview(self, repo: str | None = None) -> Plan:
        """Observe and plan, change nothing on any host (what `pipeline plan` prints); raises
        ConfigError when a planned build cannot be done (`Builder.check`)."""
        return self.make_plan(self.observe(self._repos(repo)))

    def _repos(self, repo: str | None) -> list[str]:
        if repo is not None and repo not in self.cfg.repos:
            raise PipelineError(f"unknown repo {repo!r} (known: {', '.join(self.cfg.repos)})")
        return [repo] if repo else list(self.cfg.repos)

    # -- apply ------------------------------------------------------------------------------
    def run_pass(
        self,
        repo: str | None = None,
        *,
        trigger: str = "cli",
        only_services: Iterable[str] | None = None,
        ignore_failed: bool = False,
        force_images: Iterable[str] = (),
        force_reason: str = "rebuild requested",
        pinned: dict[str, str] | None = None,
        force_services: Iterable[str] = (),
        pull_base: bool = False,
    ) -> PassResult:
        """Observe, plan and apply; every step recorded under one run. `force_images` are
        built even if unchanged, `force_reason` saying why (`pipeline rebuild` by default)."""
        run_id = self.state.start_run(trigger, repo, owner=self.owner)
        structlog.contextvars.bind_contextvars(run_id=run_id)
        for name in force_services:  # `pipeline deploy` releases a pin
            if self.state.rollbacks.unpin_service(name):
                self.report(f"{name}: unpinned: deploy requested")
        try:
            observed = self.observe(self._repos(repo), pinned=pinned, run_id=run_id)
            the_plan = self.make_plan(
                observed,
                only_services=only_services,
                ignore_failed=ignore_failed,
                force_images=force_images,
                force_reason=force_reason,
            )
            the_plan = self._force(the_plan, observed, force_services)
            result = self.apply(the_plan, observed, run_id, pull_base=pull_base)
        except PipelineError as exc:
            self.state.finish_run(run_id, "failed", error=str(exc))
            # Not reported here: the caller prints the pass's errors (`pipeline run` once each).
            return PassResult(run_id, Plan((), (), ()), False, [str(exc)])
        finally:
            structlog.contextvars.unbind_contextvars("run_id")
        revs = {r.sha for r in observed.revisions.values()}
        if result.errors:
            status = "failed"
        elif the_plan.empty:
            status = "noop"
        else:
            status = "superseded" if result.superseded else "succeeded"
        self.state.finish_run(
            run_id,
            status,
            error="\n".join(result.errors) or None,
            summary=_summary(the_plan),
            revision=next(iter(revs)) if len(revs) == 1 else None,
        )
        return result

    def _force(self, the_plan: Plan, observed: Observed, services: Iterable[str]) -> Plan:
        """Add a rollout for each named service the plan left out (`pipeline deploy`)."""
        extra = []
        planned = {r.service for r in the_plan.rollouts}
        for name in services:
            if name in planned or name in observed.env.errors:
                continue  # planned already, or its env_file's error fails it
            svc = self.cfg.services[name]
            repo = self.cfg.images[svc.image].repo
            last = self.state.last_build(svc.image)
            if repo not in observed.revisions:
                continue
            if last is None:
                raise PipelineError(f"service {name}: image {svc.image} was never built")
            extra.append(
                Rollout(
                    service=name,
                    image=svc.image,
                    revision=last.revision,
                    reason="requested",
                    rebuild=False,
                )
            )
        if not extra:
            return the_plan
        return Plan(the_plan.builds, the_plan.rollouts + tuple(extra), the_plan.problems)

    def apply(
        self, the_plan: Plan, observed: Observed, run_id: int, *, pull_base: bool = False
    ) -> PassResult:
        """Build every planned image, then roll out every planned service whose image is ready."""
        result = PassResult(run_id, the_plan, True)
        for problem in the_plan.problems:
            if problem.error:
                self.report(f"{problem.subject}: not rolled out: {problem.message}")
                result.errors.append(problem.message)
            else:
                self.report(f"note: {problem.subject}: {problem.message}")
        result.ok = not result.errors
        for name in the_plan.unpin:
            self.state.rollbacks.unpin_service(name)
            self.report(f"{name}: unpinned: a newer commit arrived")
        if the_plan.empty:
            if not result.errors:
                self.report("up to date: nothing to build or roll out")
            return result
        artifacts: dict[str, Artifact] = {}
        failed_images: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=self.cfg.pipeline.build_concurrency) as pool:
            futures = {
                b.image: pool.submit(self._build_one, b, observed, run_id, pull_base)
                for b in the_plan.builds
            }
            for image, fut in futures.items():
                try:
                    artifacts[image] = fut.result()
                except PipelineError as exc:
                    failed_images[image] = str(exc)
                    result.errors.append(f"image {image}: {exc}")
        rollouts = []
        for ro in the_plan.rollouts:
            if ro.image in failed_images:
                self.report(f"{ro.service}: not rolled out: build of image {ro.image} failed")
                result.errors.append(f"service {ro.service}: skipped, image {ro.image} failed")
                continue
            art = artifacts.get(ro.image)
            env_text = observed.env_files.get(ro.service)
            if (
                art is not None
                and art.unchanged
                and self._up_to_date(ro.service, art.digest, env_text)
            ):
                self.report(f"{ro.service}: already runs {art.digest[:19]}; not restarted")
                continue
            rollouts.append(ro)
        with ThreadPoolExecutor(max_workers=max(1, len(rollouts))) as pool:
            outcomes = list(
                pool.map(lambda r: self._roll_one(r, artifacts, observed, run_id), rollouts)
            )
        for outcome in outcomes:
            result.rollouts.append(outcome)
            if outcome.superseded:
                result.superseded = True
            elif not outcome.ok:
                result.errors.append(f"service {outcome.service}: {outcome.error}")
        result.ok = not result.errors and not result.superseded
        return result

    def _up_to_date(self, service: str, digest: str, env_text: str | None) -> bool:
        record = self.state.service_records([service]).get(service)
        spec = service_spec_hash(self.cfg.services[service], env_text)
        return record is not None and record.digest == digest and record.spec_hash == spec

    def _build_one(self, b: Build, observed: Observed, run_id: int, pull: bool) -> Artifact:
        before = self.state.last_build(b.image)
        art = self.builder.build(b, observed.revisions[b.repo], run_id, pull=pull)
        if before is not None and before.digest == art.digest:
            self.report(f"{b.image}: rebuilt to the same digest; nothing to roll out")
            return Artifact(art.image, art.revision, art.digest, art.ref, unchanged=True)
        return art

    def _roll_one(
        self, ro: Rollout, artifacts: dict[str, Artifact], observed: Observed, run_id: int
    ) -> RolloutResult:
        svc = self.cfg.services[ro.service]
        env_text = observed.env_files.get(ro.service)
        spec_hash = service_spec_hash(svc, env_text)
        if ro.image in artifacts:
            art = artifacts[ro.image]
        else:
            last = self.state.last_build(ro.image)
            if last is None:
                raise PipelineError(f"service {ro.service}: image {ro.image} was never built")
            art = Artifact(ro.image, last.revision, last.digest, last.ref)
        return self.roll(
            ro.service,
            Target(
                revision=art.revision,
                digest=art.digest,
                refs={h: art.ref for h in svc.targets},
                spec_hash=spec_hash,
                pull=self.cfg.registry is not None,
                auth=self.connections.registry_auth(),
                env_file=env_text,
                settings=ServiceSettings(svc, env_text),
            ),
            run_id=run_id,
            reason=ro.reason,
        )

    def roll(
        self,
        service: str,
        target: Target,
        *,
        run_id: int | None,
        reason: str | None,
        kind: str = "deploy",
        spec: ServiceSection | None = None,
    ) -> RolloutResult:
        """Roll one service out under its lease with its configured settings (or `spec`: a
        rollback's restored ones), after recovering a rollout of it that a dead process left
        running; report and record the outcome."""
        svc = spec or self.cfg.services[service]
        self.report(
            f"{service}: rolling out {target.revision[:12]} to {', '.join(svc.targets)} ({reason})"
        )
        try:
            executor = (
                self.cluster_executor(service, svc)
                if svc.cluster
                else self.rollout_executor(service, svc)
            )
            with self.state.leases.lease(f"service:{service}", self.owner) as held:
                if isinstance(executor, RolloutExecutor):
                    recover_service(executor)
                outcome = executor.run(target, run_id=run_id, kind=kind, reason=reason, lease=held)
        except LockedError as exc:
            return RolloutResult(service, False, 0, str(exc), locked=True)
        except PipelineError as exc:
            return RolloutResult(service, False, 0, str(exc))
        if outcome.ok:
            self.report(f"{service}: {target.revision[:12]} healthy on {', '.join(svc.targets)}")
        else:
            # Its first line only: the whole error, log lines and all, comes with the outcome.
            first = (outcome.error or "").partition("\n")[0]
            self.report(f"{service}: FAILED, rolled back: {first}")
        return outcome

    def cluster_executor(self, service: str, spec: ServiceSection) -> ClusterRollout:
        """The executor of a cluster service's rollouts, on its cluster's manager (ConfigError
        when that engine is not one: `placement.check_cluster`)."""
        assert spec.cluster is not None
        return ClusterRollout(
            state=self.state,
            service=service,
            spec=spec,
            cluster=spec.cluster,
            section=self.cfg.clusters[spec.cluster],
            manager=self.connections.cluster(spec.cluster),
            nodes={h.reach_address: self.connections.engine(n) for n, h in self.cfg.hosts.items()},
            sleep=self.sleep,
            clock=self.clock,
            should_stop=self.should_stop,
            report=self.report,
        )

    def rollout_executor(self, service: str, spec: ServiceSection | None = None) -> RolloutExecutor:
        """The executor of one service's rollouts (and of their crash recovery), with its
        configured settings or `spec`; a named network on hosts of one Swarm is an overlay
        (`placement.overlay_manager`: asks the hosts' engines, ConfigError if it must be one)."""
        svc = spec or self.cfg.services[service]
        overlay = (
            overlay_manager(self.loaded, self.connections, service)
            if svc.network not in ("bridge", "host", "none") and svc.proxy is None
            else None
        )
        return RolloutExecutor(
            state=self.state,
            service=service,
            spec=svc,
            hosts=self.cfg.hosts,
            engines={h: self.connections.engine(h) for h in svc.hosts},
            sleep=self.sleep,
            clock=self.clock,
            should_stop=self.should_stop,
            report=self.report,
            keep_images=self.cfg.pipeline.keep_revisions,
            proxy=self.cfg.proxy,
            auth=self.connections.registry_auth() if svc.proxy is not None else None,
            overlay=overlay,
            services=self.cfg.services,
            config_at=self.loaded.locate,
            acme_root=self.loaded.acme_ca_root_pem,
        )


def _summary(the_plan: Plan) -> str:
    builds = ", ".join(b.image for b in the_plan.builds) or "none"
    rollouts = ", ".join(r.service for r in the_plan.rollouts) or "none"
    return f"builds: {builds}; rollouts: {rollouts}"
