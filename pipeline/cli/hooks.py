"""git push to deploy: `pipeline hooks install`, and the internal `hook-event`/`hook-validate`
commands the installed hooks run."""

from __future__ import annotations

import os
import shlex
import stat
import sys
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline import logs
from pipeline.cli.common import (
    EXIT_FAILED,
    Group,
    argument,
    command,
    config_option,
    fail,
    load_config,
)
from pipeline.cli.serve import local_repo_path, service_class
from pipeline.errors import ConfigError

# The hooks run on every push: each command imports what it needs (hook-validate only the
# config; hook-event the state database, and the service only when it deploys here).
if TYPE_CHECKING:
    from pipeline.config.load import LoadedConfig
    from pipeline.config.model import RepoSection
    from pipeline.state.schema import Event
    from pipeline.state.store import State


def hook_script(name: str) -> str:
    """The text of a hook script shipped inside the package (`pipeline/cli/hook_scripts/`,
    package data in pyproject.toml), read through importlib.resources: from a wheel, a zip or
    a source checkout alike."""
    from importlib.resources import files

    return files("pipeline.cli").joinpath("hook_scripts", name).read_text(encoding="utf-8")


HOOK_NAMES = ("pre-receive", "post-receive")
HOOK_MARKER = "installed by `pipeline hooks install`"
ENV_FILE = "pipeline-hook.env"
FOLLOW_POLL = 0.3

hooks_app = Group(
    "hooks", help="Git push-to-deploy hooks for bare repositories.", no_args_is_help=True
)


def follows_ref(repo: RepoSection, ref: str) -> bool:
    """True when a push of `ref` (refs/heads/X or refs/tags/X) is what `repo` follows."""
    if repo.tags:
        return ref.startswith("refs/tags/") and fnmatchcase(
            ref.removeprefix("refs/tags/"), repo.tags
        )
    return ref == f"refs/heads/{repo.branch or 'main'}"


@command("hook-event", hidden=True)
@click.option("--repo", required=True, help="Config repo name.")
@click.option("--ref", required=True, help="The pushed ref (refs/heads/X, refs/tags/X).")
@click.option("--sha", required=True, help="The commit the ref now points at.")
@config_option
@click.option("--follow/--no-follow", default=False, help="Show the deploy's progress.")
@click.option(
    "--queue-only/--no-queue-only",
    default=False,
    help="When the server is down, only queue (no inline deploy).",
)
@click.option("--timeout", type=float, default=1800, help="Stop following after this many s.")
def hook_event(
    repo: str,
    ref: str,
    sha: str,
    config: Path | None,
    follow: bool,
    queue_only: bool,
    timeout: float,
) -> None:
    """Queue a push event for REPO (run by the post-receive hook) and follow it."""
    from pipeline.state.database import open_state
    from pipeline.state.queue import FINAL_STATUSES, EventQueue

    logs.configure("console", "warning")  # the pusher reads our lines, not the service log
    loaded = load_config(config)
    section = loaded.model.repos.get(repo)
    if section is None:
        fail(f"pipeline: repo {repo!r} is not in {loaded.path} (hook installed for another?)")
    if not follows_ref(section, ref):
        click.echo(f"pipeline: {ref} is not followed by repo {repo} ({section.follows}).")
        return
    state = open_state(loaded)
    queue = EventQueue(state)
    baseline = _latest_run(state)
    kind = "tag" if ref.startswith("refs/tags/") else "push"
    # The service may have seen the new ref already (it watches local repos): follow that
    # event rather than queue a second one that would only find everything up to date.
    event_id = _seen_already(state, repo, sha)
    if event_id is None:
        event_id, _ = queue.put(source="hook", kind=kind, repo=repo, ref=ref, sha=sha)
        what = f"event {event_id} ({kind} {ref.split('/', 2)[-1]} {sha[:12]}) queued"
    else:
        baseline = 0  # its run may have started already
        what = f"event {event_id} ({kind} {ref.split('/', 2)[-1]} {sha[:12]}) seen already"
    if not follow:
        click.echo(f"pipeline: {what}.")
        return
    if _server_up(state):
        click.echo(f"pipeline: {what}; following it (Ctrl-C stops following only).")
    elif queue_only:
        click.echo(
            f"pipeline server is not running: {what}; it will deploy when `pipeline serve` starts."
        )
        return
    else:
        click.echo(f"pipeline server is not running: {what}; deploying it here.")
        service = service_class()(loaded.path, report=lambda line: click.echo(f"  {line}"))
        if service.work_until(lambda: _event(state, event_id).status in FINAL_STATUSES):
            if not _outcome(state, loaded, _event(state, event_id)):
                raise click.exceptions.Exit(EXIT_FAILED)
            return
        # A server that started meanwhile took the event: follow it there.
    try:
        final = _follow(state, event_id, baseline, timeout=timeout)
    except KeyboardInterrupt:
        click.echo("pipeline: stopped following; the deploy goes on.")
        return
    if final is None:
        click.echo(f"pipeline: still deploying after {timeout:.0f}s; see `pipeline history`.")
        return
    if not _outcome(state, loaded, final):
        raise click.exceptions.Exit(EXIT_FAILED)


@command("hook-validate", hidden=True)
@argument("file", type=click.Path(path_type=Path), help="The pushed pipeline.toml.")
@click.option("--repo", required=True, help="Config repo name.")
@click.option("--ref", required=True, help="The pushed ref.")
@config_option
def hook_validate(file: Path, repo: str, ref: str, config: Path | None) -> None:
    """Exit 1, printing every problem, when a push to a followed ref has an invalid
    pipeline.toml (run by the pre-receive hook)."""
    from pipeline.config import load as config_mod

    try:
        loaded = config_mod.load(config or config_mod.default_config_path())
    except ConfigError as exc:
        # A broken server config must not block every push; say so and let it through.
        click.echo(f"pipeline: not checking pipeline.toml: server config invalid:\n{exc}")
        return
    section = loaded.model.repos.get(repo)
    if section is None or not follows_ref(section, ref):
        return
    try:
        config_mod.parse(file.read_text(encoding="utf-8"), Path("pipeline.toml"))
    except ConfigError as exc:
        click.echo(f"pipeline: push of {ref} refused: pipeline.toml is invalid:")
        for problem in exc.problems:
            click.echo(f"  {problem}")
        raise click.exceptions.Exit(EXIT_FAILED) from None
    click.echo("pipeline: pipeline.toml is valid.")


@hooks_app.command("install")
@argument("bare_repo", type=click.Path(path_type=Path), help="The bare repository pushed to.")
@click.option("--repo", help="Config repo name (default: the one whose url is it).")
@config_option
@click.option(
    "--queue-only/--no-queue-only",
    default=False,
    help="When the server is down, only queue the event (no inline deploy).",
)
@click.option("--force/--no-force", default=False, help="Replace hooks pipeline did not install.")
def install(
    bare_repo: Path, repo: str | None, config: Path | None, queue_only: bool, force: bool
) -> None:
    """Install pre-receive (config check) and post-receive (deploy) hooks into BARE_REPO."""
    loaded = load_config(config)
    bare = bare_repo.absolute()
    if not _is_bare(bare):
        fail(f"{bare_repo}: not a bare git repository (want HEAD, objects/, refs/, bare = true)")
    name = repo or _repo_of(loaded, bare)
    if name not in loaded.model.repos:
        fail(f"--repo {name}: not in {loaded.path} (known: {', '.join(loaded.model.repos)})")
    hooks_dir = bare / "hooks"
    hooks_dir.mkdir(exist_ok=True)
    for hook in HOOK_NAMES:
        target = hooks_dir / hook
        if target.exists() and not force and HOOK_MARKER not in _text(target):
            fail(f"{target}: a hook pipeline did not install is there; --force replaces it")
    settings = {
        "PIPELINE_PYTHON": os.path.abspath(sys.executable),
        "PIPELINE_REPO": name,
        "PIPELINE_CONFIG": str(loaded.path),
        "PIPELINE_HOOK_FLAGS": "--follow" + (" --queue-only" if queue_only else ""),
    }
    env_lines = [f"# {HOOK_MARKER}; sourced by pre-receive and post-receive."]
    env_lines += [f"{k}={shlex.quote(v)}" for k, v in settings.items()]
    (hooks_dir / ENV_FILE).write_text("\n".join(env_lines) + "\n", encoding="utf-8")
    for hook in HOOK_NAMES:
        target = hooks_dir / hook
        target.write_text(hook_script(hook), encoding="utf-8")
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    follows = loaded.model.repos[name].follows
    mode = "queue only" if queue_only else "deploy inline"
    click.echo(
        f"Installed pre-receive and post-receive in {hooks_dir} for repo {name}: pushes to "
        f"{follows} deploy (config {loaded.path}; when the server is down: {mode})."
    )


# -- helpers ---------------------------------------------------------------------------------


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _is_bare(path: Path) -> bool:
    if not ((path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()):
        return False
    in_core = False
    for line in _text(path / "config").splitlines():
        text = line.strip().lower()
        if text.startswith("["):
            in_core = text.replace(" ", "") == "[core]"
        elif in_core and text.replace(" ", "").replace("\t", "") == "bare=true":
            return True
    return False


def _repo_of(loaded: LoadedConfig, bare: Path) -> str:
    matches = [
        name
        for name, repo in loaded.model.repos.items()
        if (p := local_repo_path(repo.url)) is not None and p.resolve() == bare.resolve()
    ]
    if len(matches) != 1:
        found = f"several: {', '.join(matches)}" if matches else "none"
        fail(f"which repo is {bare}? {found} of the config's repos has it as url; give --repo")
    return matches[0]


def _server_up(state: State) -> bool:
    """Whether a `pipeline serve` of this state database runs: one heard within INSTANCE_TTL
    (its heartbeat) whose process, when on this machine, lives. It, not this hook, then takes
    the event. Asked of the database, not of `[server] listen`: the serve of another project
    on that port (the default one) would be followed for ever and never take the event, and
    an instance on another machine sharing the database takes it as well."""
    alive = state.cluster.owner_alive()
    return any(row["alive"] and alive(row["owner"]) for row in state.cluster.instances())


def _latest_run(state: State) -> int:
    runs = state.runs(limit=1)
    return runs[0].id if runs else 0


def _event(state: State, event_id: int) -> Event:
    from pipeline.state.queue import EventQueue

    return EventQueue(state).get(event_id)


def _seen_already(state: State, repo: str, sha: str) -> int | None:
    """The repo's newest push/tag event when it is for `sha` (a watch or poll of the service
    saw this push first), else None. Only the newest counts: a push back to an older commit
    must be deployed again."""
    from pipeline.state.queue import EventQueue

    newest = EventQueue(state).newest_push(repo)
    return newest.id if newest is not None and newest.sha == sha else None


def _follow(
    state: State,
    event_id: int,
    baseline: int,
    *,
    timeout: float,
    echo: Callable[[str], None] = click.echo,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Event | None:
    """Print the steps of the run that handles the event until the event is final; return it
    (None on timeout). While the event waits, the newest running run of its repo is shown."""
    from pipeline.state.queue import FINAL_STATUSES

    shown: dict[int, str] = {}
    pushes: set[str] = set()
    deadline = clock() + timeout
    said_waiting = False
    while True:
        ev = _event(state, event_id)
        run_id = ev.run_id or (
            state.running_run_after(ev.repo, baseline) if ev.status == "working" else None
        )
        if ev.status == "queued" and not said_waiting:
            echo("pipeline: waiting for the worker...")
            said_waiting = True
        if run_id is not None:
            for step in state.steps(run_id):
                if shown.get(step.id) == step.status:
                    continue
                shown[step.id] = step.status
                line = _step_line(
                    step.kind, step.subject, step.host, step.status, step.error or step.detail
                )
                if step.kind == "push":
                    # One step per tag, the same digest once done: say each line once per image.
                    if line in pushes:
                        continue
                    pushes.add(line)
                echo("  " + line)
        if ev.status in FINAL_STATUSES:
            return ev
        if clock() > deadline:
            return None
        sleep(FOLLOW_POLL)


def _step_line(
    kind: str, subject: str | None, host: str | None, status: str, detail: str | None
) -> str:
    where = " ".join(p for p in (subject, f"on {host}" if host else None) if p)
    text = f"{kind} {where}: {status}" if where else f"{kind}: {status}"
    if detail and status != "running":
        text += f" ({detail.splitlines()[0][:160]})"
    return text


def _outcome(state: State, loaded: LoadedConfig, ev: Event) -> bool:
    """Print how the event ended and the URLs now serving; True when it deployed (or no-op)."""
    from pipeline.config.model import parse_port

    run = state.run(ev.run_id) if ev.run_id else None
    if run is None:
        click.echo(f"pipeline: event {ev.id} {ev.status}" + (f": {ev.note}" if ev.note else ""))
        return ev.status in ("done", "superseded", "ignored")
    ok = run.status in ("succeeded", "noop")
    word = {"noop": "nothing to deploy (up to date)"}.get(run.status, run.status)
    click.echo(f"pipeline: run {run.id} {word}" + (f": {run.summary}" if run.summary else ""))
    for line in (run.error or "").splitlines():
        click.echo(f"  error: {line}")
    cfg = loaded.model
    for rel in state.releases(limit=100):
        if rel.run_id != run.id or rel.status != "succeeded" or rel.service not in cfg.services:
            continue
        svc = cfg.services[rel.service]
        for host in svc.hosts:
            address = cfg.hosts[host].reach_address if host in cfg.hosts else host
            for text in svc.ports:
                port = parse_port(text)
                if port.host_port is None or port.protocol != "tcp":
                    continue
                ip = port.host_ip if port.host_ip not in (None, "0.0.0.0", "::") else address
                click.echo(
                    f"  {rel.service} {rel.revision[:12]} serving at http://{ip}:{port.host_port}/"
                )
    return ok
