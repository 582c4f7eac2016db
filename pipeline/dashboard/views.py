"""What each dashboard page shows, as plain data read from the service: the same records and
JSON shapes the API answers with (`state.store.run_json`, `step_json`, `release_json`, the
status rows of `pipeline status`), grouped for a page. Nothing here renders or writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pipeline.config.load import LoadedConfig
from pipeline.state.queue import EventQueue
from pipeline.state.store import State, release_json, run_json, step_json
from pipeline.timeutil import iso, utc

# The steps a rollout records per host, in the order they run (deploy/steps.py).
_ROLLOUT_STEPS = ("pull", "stop", "start", "health", "route", "switch", "retire", "rollback")
_TRIGGER_SOURCES = ("poll", "webhook", "hook", "watch")


class Backend(Protocol):
    """What the dashboard reads from the service (`service.api.ServerContext` is one): the
    live config, the records, the queue, the status rows of `pipeline status`, the worker's
    nudge, the address listened on, and the daemon's repo heads, commit subjects, ancestry
    (`ancestor(repo, old, new)`: is `old` reachable from `new`; None when unknown) and plan."""

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
    @property
    def ancestor(self) -> Callable[[str, str, str], bool | None] | None: ...


def short(sha: str | None, n: int = 12) -> str:
    """The first `n` characters of a sha or digest ("" for None); "sha256:" kept off digests."""
    return (sha or "").removeprefix("sha256:")[:n]


def words(label: str | None) -> str:
    """A stored label as words for a page: "rolled_back" -> "rolled back" ("" for None)."""
    return (label or "").replace("_", " ")


def utc_text(value: str | None) -> str:
    """An ISO 8601 time as "2026-11-30 04:02 UTC", for text no script localizes ("" for
    None; the value itself when it does not parse)."""
    if not value:
        return ""
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return value
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


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
    queued: dict[str, dict[str, Any]] = {}
    for ev in backend.queue.recent(200):
        if ev["repo"] and ev["source"] in _TRIGGER_SOURCES:
            queued.setdefault(ev["repo"], ev)
    repos = backend.repos() if backend.repos is not None else []
    for repo in repos:
        repo["last_trigger"] = _last_trigger(backend, repo["name"], queued.get(repo["name"]))
    return Overview(
        hosts=hosts,
        services=services,
        cells=cells,
        rolling=rolling,
        repos=repos,
        queue_depth=backend.queue.depth(),
        runs=[run_json(r) for r in backend.state.runs(10)],
    )


def _last_trigger(
    backend: Backend, repo: str, event: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The newer of `repo`'s last poll and its last queued trigger (a webhook, or a poll that
    found a change), as {"source": "poll" | "webhook" | ..., "at": ISO UTC}; None when neither.

    A poll that finds nothing new queues nothing; what it leaves is the slot it claimed in
    `schedule_slots` (`Cluster.claim_slot`), so its time is that slot's start: the poll ran
    within one poll interval after it."""
    found: list[tuple[datetime, str, str]] = []
    if event is not None and event["received_at"]:
        found.append((datetime.fromisoformat(event["received_at"]), event["source"], ""))
    section = backend.loaded().model.repos.get(repo)
    slot = backend.state.cluster.last_slot(f"poll:{repo}")
    if section is not None and section.poll and slot is not None:
        at = utc(slot * section.poll)
        found.append((at, "poll", f"polled within {section.poll:g} s after this"))
    if not found:
        return None
    at, source, note = max(found)
    return {"source": source, "at": iso(at), "note": note}


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
    """A service page: its releases newest first, each with the commit range it brought
    (`range_from`..`revision`), or, for one that went back to an older revision,
    `back_from` (the revision it replaced)."""

    name: str
    image: str
    hosts: list[str]
    releases: list[dict[str, Any]]
    rollback_targets: list[dict[str, Any]]


def service_view(backend: Backend, name: str, limit: int = 50) -> ServiceView | None:
    """Service `name`'s page; None when the config has no such service. A release's commit
    range runs from the revision of the succeeded release before it (None for the first, and
    for one of the same revision); when its revision is an ancestor of that one (the mirror's
    `git merge-base --is-ancestor`), it brought no commits: `back_from` names the one left."""
    cfg = backend.loaded().model
    svc = cfg.services.get(name)
    if svc is None:
        return None
    repo = cfg.images[svc.image].repo
    releases = [release_json(r) for r in backend.state.releases(name, limit)]
    for i, rel in enumerate(releases):
        before = next((r for r in releases[i + 1 :] if r["status"] == "succeeded"), None)
        old, new = (before["revision"] if before else None), rel["revision"]
        rel["range_from"], rel["back_from"] = old, None
        if old is None or not new or old == new:
            rel["range_from"] = None
        elif backend.ancestor is not None and backend.ancestor(repo, new, old):
            rel["range_from"], rel["back_from"] = None, old
    targets = [r for r in releases if r["status"] == "succeeded"]
    return ServiceView(name, svc.image, list(svc.hosts), releases, targets)
