"""What each dashboard page shows, as plain data read from the service: the same records and
JSON shapes the API answers with (`state.store.run_json`, `step_json`, `release_json`, the
status rows of `pipeline status`), grouped for a page. Nothing here renders or writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.config.load import LoadedConfig
from pipeline.state.queue import EventQueue
from pipeline.state.store import State, release_json, run_json, step_json

# The steps a rollout records per host, in the order they run (deploy/steps.py).
_ROLLOUT_STEPS = ("pull", "stop", "start", "health", "route", "switch", "retire", "rollback")
_TRIGGER_SOURCES = ("poll", "webhook", "hook", "watch")


class Backend(Protocol):
    """What the dashboard reads from the service (`service.api.ServerContext` is one): the
    live config, the records, the queue, the status rows of `pipeline status`, the worker's
    nudge, the address listened on, and the daemon's repo heads, commit subjects and plan."""

    @property
    def loaded(self) -> Callable[[], LoadedConfig]: ...
    @property
    def state(self) -> State: ...
    @property
    def queue(self) -> EventQueue: ...
    @property
    def status(self) -> Callable[[], list[dict[str, Any]]]: ...
    @property
    def wake(self) -> Callable[[], None]: ...
    @property
    def listen(self) -> str | None: ...
    @property
    def repos(self) -> Callable[[], list[dict[str, Any]]] | None: ...
    @property
    def subject(self) -> Callable[[str, str], str | None] | None: ...
    @property
    def plan(self) -> Callable[[], dict[str, Any]] | None: ...


def short(sha: str | None, n: int = 12) -> str:
    """The first `n` characters of a sha or digest ("" for None); "sha256:" kept off digests."""
    return (sha or "").removeprefix("sha256:")[:n]


@dataclass
class Cell:
    """One service on one host, as the overview's grid shows it."""

    row: dict[str, Any]
    subject: str | None

    @property
    def ok(self) -> bool:
        return self.row.get("state") == "running" and self.row.get("health") in (None, "healthy")

    @property
    def health(self) -> str:
        """The engine's health when the container has a HEALTHCHECK; else, for a running
        container pipeline deployed, "healthy at deploy" (it passed the health gate)."""
        if self.row.get("health"):
            return str(self.row["health"])
        return "healthy at deploy" if self.row.get("state") == "running" else "unknown"


@dataclass
class Overview:
    """The overview page: services x hosts, repos, queue depth, recent runs."""

    hosts: list[str]
    services: list[str]
    cells: dict[tuple[str, str], Cell]
    rolling: set[str]
    repos: list[dict[str, Any]]
    queue_depth: int
    runs: list[dict[str, Any]]


def overview(backend: Backend) -> Overview:
    """Read the overview: what `pipeline status` shows per service and host, each revision's
    commit subject, which services have a rollout running, the repos' heads and their last
    poll or webhook, the queue depth and the newest runs."""
    cfg = backend.loaded().model
    hosts = list(cfg.hosts)
    services = list(cfg.services)
    subjects: dict[str, str | None] = {}

    def subject_of(service: str, sha: str | None) -> str | None:
        if not sha or backend.subject is None:
            return None
        if sha not in subjects:
            repo = cfg.images[cfg.services[service].image].repo
            subjects[sha] = backend.subject(repo, sha)
        return subjects[sha]

    cells = {
        (r["service"], r["host"]): Cell(r, subject_of(r["service"], r["revision"]))
        for r in backend.status()
    }
    rolling = {
        name
        for name in services
        if (latest := backend.state.releases(name, limit=1)) and latest[0].status == "running"
    }
    last_trigger: dict[str, dict[str, Any]] = {}
    for ev in backend.queue.recent(200):
        if ev["repo"] and ev["source"] in _TRIGGER_SOURCES:
            last_trigger.setdefault(ev["repo"], ev)
    repos = backend.repos() if backend.repos is not None else []
    for repo in repos:
        repo["last_trigger"] = last_trigger.get(repo["name"])
    return Overview(
        hosts=hosts,
        services=services,
        cells=cells,
        rolling=rolling,
        repos=repos,
        queue_depth=backend.queue.depth(),
        runs=[run_json(r) for r in backend.state.runs(10)],
    )


@dataclass
class RunView:
    """A run page: the run, its steps grouped by host, its releases and one outcome line per
    service ("web: 1a2b3c4d5e6f healthy on lab-1, lab-2")."""

    run: dict[str, Any]
    local: list[dict[str, Any]]
    by_host: dict[str, list[dict[str, Any]]]
    releases: list[dict[str, Any]]
    outcomes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.run["status"] != "running"


def run_view(state: State, run_id: int) -> RunView | None:
    """The run `run_id` as its page shows it; None when there is no such run."""
    run = state.run(run_id)
    if run is None:
        return None
    steps = [step_json(s) for s in state.steps(run_id)]
    releases = [release_json(r) for r in state.releases(limit=100, run_id=run_id)]
    by_host: dict[str, list[dict[str, Any]]] = {}
    local: list[dict[str, Any]] = []
    for step in steps:
        if step["host"] and step["kind"] in _ROLLOUT_STEPS:
            by_host.setdefault(step["host"], []).append(step)
        else:
            local.append(step)
    view = RunView(run_json(run), local, by_host, releases)
    view.outcomes = [_outcome(rel, steps) for rel in reversed(releases)]
    return view


def _outcome(release: dict[str, Any], steps: list[dict[str, Any]]) -> str:
    """One release's line, as the runner reports it: healthy on which hosts, or where it
    failed and the first line of why."""
    mine = [s for s in steps if s["subject"] == release["service"] and s["host"]]
    name, rev = release["service"], short(release["revision"])
    if release["status"] == "succeeded":
        hosts = _unique(
            s["host"] for s in mine if s["kind"] == "health" and s["status"] == "succeeded"
        )
        hosts = hosts or _unique(s["host"] for s in mine)
        return f"{name}: {rev} healthy on {', '.join(hosts)}"
    if release["status"] == "running":
        return f"{name}: {rev} rolling out"
    failed = [s for s in mine if s["status"] == "failed" and not _sibling_stop(s)]
    where = f" on {', '.join(_unique(s['host'] for s in failed))}" if failed else ""
    why = (release["error"] or (failed[0]["error"] if failed else "") or "").splitlines()
    return f"{name}: {rev} {release['status'].upper().replace('_', ' ')}{where}" + (
        f": {why[0]}" if why else ""
    )


def _sibling_stop(step: dict[str, Any]) -> bool:
    return (step["error"] or "").startswith("stopped: another host")


def _unique(values: Any) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


@dataclass
class ServiceView:
    """A service page: its releases newest first, each with the commit range it brought."""

    name: str
    image: str
    hosts: list[str]
    releases: list[dict[str, Any]]
    rollback_targets: list[dict[str, Any]]


def service_view(backend: Backend, name: str, limit: int = 50) -> ServiceView | None:
    """Service `name`'s page; None when the config has no such service. A release's commit
    range runs from the revision of the succeeded release before it ("" for the first)."""
    svc = backend.loaded().model.services.get(name)
    if svc is None:
        return None
    releases = [release_json(r) for r in backend.state.releases(name, limit)]
    for i, rel in enumerate(releases):
        before = next((r for r in releases[i + 1 :] if r["status"] == "succeeded"), None)
        rel["range_from"] = before["revision"] if before else None
    targets = [r for r in releases if r["status"] == "succeeded"]
    return ServiceView(name, svc.image, list(svc.hosts), releases, targets)
