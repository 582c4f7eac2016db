"""CLI commands of the deploy flow: plan, run, deploy, rollback, status, history."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from pipeline.cli.common import (
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_USAGE,
    argument,
    command,
    complete_image,
    complete_repo,
    complete_service,
    config_option,
    exit_code_of,
    fail,
    json_option,
    load_config,
    print_json,
    print_table,
    start_logging,
)
from pipeline.cli.output import Reporter, make_reporter
from pipeline.errors import PipelineError
from pipeline.redact import redact

if TYPE_CHECKING:
    from pipeline.config.load import LoadedConfig
    from pipeline.deploy.connections import Connections
    from pipeline.deploy.runner import PassResult, Runner


def _connections(loaded: LoadedConfig, reporter: Reporter | None = None) -> Connections:
    # Imported here: the docker SDK and GitPython are not needed by `history` or `validate`.
    from pipeline.deploy.connections import Connections

    return Connections(loaded, progress=reporter.progress if reporter else None)


def _runner(loaded: LoadedConfig, reporter: Reporter | None = None) -> Runner:
    from pipeline.deploy.runner import Runner
    from pipeline.state.database import open_state

    reporter = reporter or make_reporter(True)
    return Runner(loaded, open_state(loaded), _connections(loaded, reporter), report=reporter.line)


def _reporter(loaded: LoadedConfig, json: bool) -> Reporter:
    return make_reporter(json, {n: list(s.hosts) for n, s in loaded.model.services.items()})


def _recovered(runner: Runner) -> Runner:
    """The runner, once rollouts a dead process left running are put back (or finished)."""
    from pipeline.deploy.recovery import recover_interrupted

    recover_interrupted(runner)
    return runner


def _outcome(runner: Runner, result: PassResult, reporter: Reporter, json: bool) -> None:
    """Show a pass's summary, errors and outcome (or its `--json` document); exit 1 when it
    failed, 3 when a service's lease was held by another deploy."""
    from pipeline.state.store import release_json

    releases = [release_json(r) for r in reversed(runner.state.releases(run_id=result.run_id))]
    reporter.close(releases)
    code = 0 if result.ok else EXIT_LOCKED if result.locked else EXIT_FAILED
    if json:
        print_json(
            {
                "run_id": result.run_id,
                "ok": result.ok,
                "exit_code": code,
                "locked": result.locked,
                "errors": result.errors,
                "plan": result.plan.to_json(),
                "releases": releases,
            }
        )
    else:
        for error in result.errors:
            click.echo(redact(f"error: {error}"), err=True)
        click.echo(f"run {result.run_id}: {'ok' if result.ok else 'FAILED'}")
    if code:
        raise click.exceptions.Exit(code)


_repo_option = click.option("--repo", help="Only this repo.", shell_complete=complete_repo)


@command("plan")
@config_option
@json_option
@_repo_option
def plan(config: Path | None, json: bool, repo: str | None) -> None:
    """Show what a run would build and roll out, and why; change nothing. Exit 1 when a
    service cannot be planned (its env_file cannot be read)."""
    loaded = load_config(config)
    runner = _runner(loaded)
    try:
        the_plan = runner.preview(repo)
    except PipelineError as exc:
        fail(str(exc))
    if json:
        print_json(the_plan.to_json())
        if the_plan.errors:
            raise click.exceptions.Exit(EXIT_FAILED)
        return
    if the_plan.empty and not the_plan.errors:
        click.echo("Nothing to do: every service is up to date.")
    for b in the_plan.builds:
        click.echo(f"build   {b.image} at {b.revision[:12]}: {b.reason}")
    for r in the_plan.rollouts:
        how = "after its build" if r.rebuild else "same image"
        click.echo(f"rollout {r.service} ({how}): {r.reason}")
    for p in the_plan.problems:
        click.echo(f"error   {p.message}" if p.error else f"note    {p.subject}: {p.message}")
    for name in the_plan.unpin:
        click.echo(f"unpin   services.{name}: a newer commit releases its pin")
    if the_plan.errors:
        raise click.exceptions.Exit(EXIT_FAILED)


@command("run")
@config_option
@_repo_option
@json_option
def run(config: Path | None, repo: str | None, json: bool) -> None:
    """One pass: bring every service to the newest commit. Exit 1 if anything failed."""
    loaded = load_config(config)
    reporter = _reporter(loaded, json)
    runner = _recovered(_runner(loaded, reporter))
    _outcome(runner, runner.run_pass(repo), reporter, json)


@command("deploy")
@argument("service", shell_complete=complete_service)
@config_option
@json_option
@click.option("--revision", help="Commit sha (or prefix) or tag; default: the newest.")
def deploy(service: str, config: Path | None, json: bool, revision: str | None) -> None:
    """Roll SERVICE out now, even a revision that failed before."""
    loaded = load_config(config)
    svc = loaded.model.services.get(service)
    if svc is None:
        fail(f"unknown service {service!r} (known: {', '.join(loaded.model.services)})",
             EXIT_USAGE)  # fmt: skip
    repo = loaded.model.images[svc.image].repo
    reporter = _reporter(loaded, json)
    runner = _recovered(_runner(loaded, reporter))
    result = runner.run_pass(
        repo,
        trigger="deploy",
        only_services=[service],
        ignore_failed=True,
        pinned={repo: revision} if revision else None,
        force_services=[service],
    )
    _outcome(runner, result, reporter, json)


@command("rebuild")
@argument("image", shell_complete=complete_image)
@config_option
@json_option
def rebuild(image: str, config: Path | None, json: bool) -> None:
    """Rebuild IMAGE now, pulling its base image fresh (what its `rebuild` schedule does);
    its services are rolled out only when the digest changed."""
    loaded = load_config(config)
    img = loaded.model.images.get(image)
    if img is None:
        fail(f"unknown image {image!r} (known: {', '.join(loaded.model.images)})", EXIT_USAGE)
    reporter = _reporter(loaded, json)
    runner = _recovered(_runner(loaded, reporter))
    result = runner.run_pass(img.repo, trigger="rebuild", force_images=[image], pull_base=True)
    _outcome(runner, result, reporter, json)


@command("rollback", logs_later=True)
@argument("service", shell_complete=complete_service)
@config_option
@json_option
@click.option(
    "--to",
    help="Release to go back to: r42 (or 42) is release 42 of `history`, anything "
    "else a revision prefix (its newest succeeded release). Default: the release "
    "before the one deployed now.",
)
@click.option(
    "--no-serve",
    "no_serve",
    is_flag=True,
    help="Roll back in this process even when a `pipeline serve` of this config runs.",
)
def rollback(service: str, config: Path | None, json: bool, to: str | None, no_serve: bool) -> None:
    """Put SERVICE back on an earlier succeeded release on every host, its image and its
    settings, and pin it there until a newer commit or `pipeline deploy SERVICE`.

    When a `pipeline serve` of the same config runs on this machine, it does the rollback: its
    modules, database and engine connections are already up, so the switch is not delayed by
    this command's start-up."""

    def refuse(message: str, code: int) -> NoReturn:
        if json:  # still one document on stdout (README "What you see")
            print_json({"service": service, "ok": False, "exit_code": code,
                        "error": redact(message), "releases": []})  # fmt: skip
        fail(message, code)

    def finish(ok: bool, code: int, error: str | None, releases: list[dict[str, Any]]) -> None:
        if json:
            print_json({"service": service, "ok": ok, "exit_code": code, "error": error,
                        "releases": releases})  # fmt: skip
            if code:
                raise click.exceptions.Exit(code)
            return
        if not ok:
            fail(f"rollback failed: {error}", code)
        click.echo(f"{service}: rolled back")

    loaded = load_config(config)
    if service not in loaded.model.services:
        refuse(f"unknown service {service!r} (known: {', '.join(loaded.model.services)})",
               EXIT_USAGE)  # fmt: skip

    def exit_code(ok: bool, locked: bool, bad_input: bool = False) -> int:
        return 0 if ok else EXIT_LOCKED if locked else EXIT_USAGE if bad_input else EXIT_FAILED

    answer = None if no_serve else _rollback_in_serve(loaded, service, to)
    if answer is not None:
        code = exit_code(bool(answer.get("ok")), bool(answer.get("locked")),
                         bool(answer.get("bad_input")))  # fmt: skip
        if answer.get("refused"):
            refuse(str(answer.get("error")), code)  # as an error raised here would be
        _reporter(loaded, json).close(answer.get("releases") or [])
        finish(bool(answer.get("ok")), code, answer.get("error"), answer.get("releases") or [])
        return
    start_logging()
    from pipeline.plan.rollback import refused_as_bad_input
    from pipeline.state.store import release_json

    reporter = _reporter(loaded, json)
    runner = _runner(loaded, reporter)
    try:
        from pipeline.deploy.operations import rollback_service

        outcome = rollback_service(_recovered(runner), service, to)
    except PipelineError as exc:
        reporter.close([])
        refuse(str(exc), EXIT_USAGE if refused_as_bad_input(exc, to) else exit_code_of(exc))
    releases = [release_json(r) for r in runner.state.releases(service, 1)
                if outcome.release_id and r.id == outcome.release_id]  # fmt: skip
    reporter.close(releases)
    finish(outcome.ok, exit_code(outcome.ok, outcome.locked), outcome.error, releases)


def _rollback_in_serve(loaded: LoadedConfig, service: str, to: str | None) -> dict[str, Any] | None:
    """Have the running `pipeline serve` of this config (`pipeline.service.handoff`) roll
    `service` back and return its answer (`Service.rollback_now`), its progress lines shown on
    stderr as they come; None when there is none ready, or it refused before doing anything
    (the caller then rolls back itself). Exits 1 when the service took the rollback and
    stopped answering, or the wait was interrupted (the rollback goes on there)."""
    from urllib.parse import quote

    from pipeline.service import handoff

    found = handoff.find(loaded.data_dir, loaded.path)
    if found is None:
        return None
    where = f"pipeline serve (pid {found.pid})"

    def lost(why: str) -> NoReturn:
        fail(f"{where} took the rollback of {service} and {why}: `pipeline history {service}` "
             "shows how it ends")  # fmt: skip

    try:
        answered = handoff.post(
            found, f"/api/rollback/{quote(service, safe='')}", {"to": to, "wait": True}
        )
        if answered is None or 400 <= answered.status < 500 or answered.status == 503:
            # Not ready, or refused it (a token from a newer start, a config not reloaded
            # yet, stopping): nothing was done there.
            why = "not answering"
            if answered is not None:
                refusal = next(answered.documents, {})
                answered.close()
                why = f"HTTP {answered.status}: {refusal.get('error', refusal)}"
            click.echo(f"{service}: {where} did not take it ({why}); rolling back here",
                       err=True)  # fmt: skip
            return None
        click.echo(f"{service}: rolling back in {where}", err=True)
        for document in answered.documents:
            if "line" in document:
                click.echo(document["line"], err=True)  # as the plain reporter shows them
            elif "done" in document and answered.status == 200:
                done: dict[str, Any] = document["done"]
                return done
            else:
                fail(f"{where} failed the rollback of {service}: HTTP {answered.status}: "
                     f"{document.get('error', document)}")  # fmt: skip
        lost("ended its answer early")
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the rollback is the service's now
        fail(f"stopped waiting; the rollback of {service} goes on in {where}: "
             f"`pipeline history {service}` shows how it ends")  # fmt: skip
    except handoff.HandoffLost as exc:
        lost(f"stopped answering ({exc})")


@command("status")
@config_option
@json_option
def status(config: Path | None, json: bool) -> None:
    """Per service and host: revision, digest, container state and health."""
    loaded = load_config(config)
    from pipeline.deploy.operations import status_rows
    from pipeline.state.database import open_state

    rows = status_rows(open_state(loaded), _connections(loaded))
    if json:
        print_json(rows)
        return
    view: list[dict[str, Any]] = [
        {**r, "revision": (r["revision"] or "")[:12], "digest": (r["digest"] or "")[7:19]}
        for r in rows
    ]
    print_table(view, ["service", "host", "revision", "digest", "state", "health", "updated_at"])
    pins = {r["service"]: r["pinned"] for r in rows if r["pinned"]}
    for name, pin in pins.items():
        click.echo(
            f"{name}: pinned at {pin['revision'][:12]} (release r{pin['release_id']}) by "
            f"{pin['reason']} since {pin['since']}; a newer commit or "
            f"`pipeline deploy {name}` releases it"
        )


@command("history")
@argument("service", required=False, shell_complete=complete_service)
@config_option
@json_option
@click.option("--limit", type=int, default=50, help="How many entries.")
def history(service: str | None, config: Path | None, json: bool, limit: int) -> None:
    """Rollouts, newest first: service, revision, status, why it failed, times, error."""
    from pipeline.state.database import open_state
    from pipeline.state.store import release_json

    loaded = load_config(config)
    state = open_state(loaded)
    rows = [release_json(r) for r in state.releases(service, limit)]
    if service is not None and not rows and service not in loaded.model.services:
        # A service removed from the config keeps its history; a name never seen is a typo.
        fail(f"unknown service {service!r} (known: {', '.join(loaded.model.services)})",
             EXIT_USAGE)  # fmt: skip
    if json:
        print_json(rows)
        return
    view = [
        {
            **r,
            "id": f"r{r['id']}",  # what `pipeline rollback --to` takes
            "revision": r["revision"][:12],
            "error": (r["error"] or "").splitlines()[0][:80] if r["error"] else None,
        }
        for r in rows
    ]
    columns = ["id", "started_at", "service", "kind", "revision", "status", "failure_kind"]
    print_table(view, [*columns, "reason", "error"])
