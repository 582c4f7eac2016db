"""What each command imports before it answers: the guard of the CLI's start-up time.

Not a timing test (timings depend on the machine): each case runs a command in a fresh
process and lists the modules it loaded. The costly ones (SQLAlchemy and Alembic, the docker
SDK, GitPython, the web service, APScheduler, pyroute2, structlog, and typer or pydantic for
parsing options) must stay out of the commands that do not need them, and so must the CLI
modules of the other commands; `bench/bench_cli_startup.py` measures the times.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import stand_in_serve

EXAMPLE = Path(__file__).resolve().parents[2] / "pipeline.example.toml"

# Runs the CLI as the console script does, then writes the name of every module loaded to the
# file named by the first argument, whatever the command's exit.
_PROBE = """
import json, sys
out, sys.argv = sys.argv[1], ["pipeline", *sys.argv[2:]]
try:
    from pipeline.cli.app import main
    main()
except SystemExit:
    pass
finally:
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
"""

HEAVY = {
    "docker",
    "sqlalchemy",
    "alembic",
    "git",
    "fastapi",
    "starlette",
    "uvicorn",
    "apscheduler",
    "watchdog",
    "pyroute2",
    "structlog",
    "httpx",
    "tenacity",
}
# The config needs msgspec, and cronsim for the example's `rebuild` cron: not APScheduler.
CONFIG_ONLY = HEAVY
# What parsing the command line must not load: typer (and its pydantic option parsing); the
# config is msgspec, so validate loads no pydantic at all.
OPTION_PARSING = {"typer", "pydantic"}
# The CLI modules `--help` and `validate` need; every other command's module stays unloaded.
CLI_CORE = {"pipeline.cli", "pipeline.cli.app", "pipeline.cli.common"}


def _loaded(tmp_path: Path, *args: str) -> set[str]:
    """The top-level packages a command loads."""
    return {name.split(".")[0] for name in _modules(tmp_path, *args)}


def _cli_modules(modules: set[str]) -> set[str]:
    return {m for m in modules if m.startswith("pipeline.cli")}


def _modules(tmp_path: Path, *args: str) -> set[str]:
    """The full names of every module a command loads."""
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.exists(), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return set(json.loads(out.read_text()))


def _config(tmp_path: Path) -> Path:
    """The example config with its state database in tmp_path."""
    path = tmp_path / "pipeline.toml"
    text = EXAMPLE.read_text(encoding="utf-8")
    path.write_text(text.replace('data_dir = ".pipeline"', f'data_dir = "{tmp_path / "data"}"'))
    return path


def test_help_imports_no_config_database_docker_git_or_service(tmp_path: Path) -> None:
    """`pipeline --help` loads click and the CLI's core, no other command's module: not typer
    or pydantic, the database, Docker, git, the service, the scheduler, the lab or structlog."""
    modules = _modules(tmp_path, "--help")
    loaded = {name.split(".")[0] for name in modules}
    assert "click" in loaded  # the probe ran the CLI
    assert loaded & (HEAVY | {"typer", "pydantic"}) == set()
    assert _cli_modules(modules) == CLI_CORE


def test_a_commands_help_imports_no_database_docker_git_or_service(tmp_path: Path) -> None:
    """`pipeline run --help` loads nothing of typer, pydantic, the database, Docker, git, the
    service or structlog (logging is set up when a command runs, not for its help)."""
    loaded = _loaded(tmp_path, "run", "--help")
    assert "click" in loaded
    assert loaded & (HEAVY | {"typer", "pydantic"}) == set()


@pytest.mark.parametrize("command", ["validate", "hook-validate"])
def test_config_only_commands_import_no_database_docker_git_or_service(
    tmp_path: Path, command: str
) -> None:
    """`pipeline validate` and the pre-receive hook's `hook-validate` (run on every push) load
    the config (msgspec, and cronsim for its cron) and nothing of typer, pydantic, the
    database, Docker, git, the service or structlog; `validate` no other command's CLI module."""
    config = _config(tmp_path)
    args = ["validate", "-c", str(config)]
    if command == "hook-validate":
        args = ["hook-validate", "--repo", "shop", "--ref", "refs/heads/main"]
        args += ["-c", str(config), str(config)]
    modules = _modules(tmp_path, *args)
    loaded = {name.split(".")[0] for name in modules}
    assert {"msgspec", "cronsim"} <= loaded  # the config and its cron were read
    assert loaded & (CONFIG_ONLY | OPTION_PARSING) == set()
    if command == "validate":
        assert _cli_modules(modules) == CLI_CORE


# Loads a config the way every command does, then prints the top-level packages it loaded.
_LOAD = """
import json, sys
from pathlib import Path
from pipeline.config.load import load
load(Path(sys.argv[1]))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize("env_file", [False, True])
def test_loading_a_config_imports_no_pydantic(tmp_path: Path, env_file: bool) -> None:
    """Loading and validating a config imports neither pydantic nor the heavy packages, and
    python-dotenv only when a service has an env_file."""
    config = _config(tmp_path)
    if env_file:
        (tmp_path / "web.env").write_text("MODE=prod\n")
        text = config.read_text(encoding="utf-8")
        config.write_text(
            text.replace("[services.web]\n", '[services.web]\nenv_file = "web.env"\n')
        )
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = set(json.loads(done.stdout))
    assert "msgspec" in loaded
    assert loaded & (CONFIG_ONLY | {"pydantic", "pydantic_core", "typer"}) == set()
    assert ("dotenv" in loaded) is env_file


def test_hook_event_imports_the_database_but_not_docker_git_or_the_service(
    tmp_path: Path,
) -> None:
    """The post-receive hook's `hook-event` (queue a push, no --follow) loads the state
    database and nothing of Docker, git, the HTTP client or the service."""
    config = _config(tmp_path)
    args = ["hook-event", "--repo", "shop", "--ref", "refs/heads/main", "--sha", "a" * 40]
    loaded = _loaded(tmp_path, *args, "-c", str(config))
    assert "sqlalchemy" in loaded  # the event was queued
    assert loaded & {"docker", "git", "fastapi", "uvicorn", "pyroute2", "httpx"} == set()


def test_init_and_lock_status_import_only_what_they_need(tmp_path: Path) -> None:
    """`pipeline init` loads neither structlog, Docker, git nor the database;
    `lock status` loads the database but not Docker, git or the service."""
    repo = tmp_path / "repo"
    (repo / "web").mkdir(parents=True)
    (repo / "web" / "Dockerfile").write_text("FROM scratch\nEXPOSE 8080\n")
    loaded = _loaded(tmp_path, "init", str(repo))
    assert (repo / "pipeline.toml").exists()  # the probe ran the command
    assert loaded & HEAVY == set()

    loaded = _loaded(tmp_path, "lock", "status", "-c", str(_config(tmp_path)))
    assert "sqlalchemy" in loaded
    assert loaded & {"docker", "git", "fastapi", "uvicorn", "pyroute2", "httpx"} == set()


# Imports what `pipeline rollback` runs through up to its switch (the command, the rollback,
# the rollout with its health gate and proxy, the state database), then lists what loaded.
_ROLLBACK = """
import json, sys
import pipeline.cli.deploy, pipeline.deploy.operations, pipeline.deploy.rollout
import pipeline.deploy.health, pipeline.deploy.proxy, pipeline.state.database
import pipeline.sources.git  # the rollback reads its repo's head from the mirror
import docker, paramiko
seen = {"modules": sorted(sys.modules), "paramiko": type(paramiko).__name__}
seen["client"] = paramiko.SSHClient.__module__  # first use: the real paramiko loads
seen["then"] = type(sys.modules["paramiko"]).__name__
print(json.dumps(seen))
"""


def test_a_rollback_loads_no_git_or_second_http_stack(tmp_path: Path) -> None:
    """What a rollback imports before its switch holds none of the costly packages it never
    uses: GitPython (a branch's head is a file read), httpx (requests is the docker SDK's
    already), pathspec, the PostgreSQL dialect, or paramiko (the SDK's import of it is
    deferred)."""
    done = subprocess.run(
        [sys.executable, "-c", _ROLLBACK], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(done.stdout)
    modules = set(seen["modules"])
    assert {"docker", "sqlalchemy", "requests", "pipeline.deploy.rollout"} <= modules
    unused = {
        "git",
        "httpx",
        "httpcore",
        "pathspec",
        "sqlalchemy.dialects.postgresql",
        "cryptography",
        "nacl",
        "invoke",
    }
    assert modules & unused == set()
    assert seen["paramiko"] == "_Deferred"  # `import paramiko` works, loading nothing yet
    assert (seen["client"], seen["then"]) == ("paramiko.client", "module")  # its first use


def test_a_rollback_handed_to_a_running_serve_loads_no_database_docker_or_logging(
    tmp_path: Path,
) -> None:
    """`pipeline rollback web` with a `pipeline serve` of the same config running (here a
    stand-in answering its API) sends it the rollback with serve.json's token and prints its
    answer, loading none of the database, Docker, structlog or the service's own stack: the
    start-up that delayed a rollback's switch by about a second is not paid."""
    config = _config(tmp_path)
    answer = {"service": "web", "ok": True, "locked": False, "bad_input": False,
              "refused": False, "error": None, "releases": []}  # fmt: skip
    out = tmp_path / "modules.json"
    with stand_in_serve(config, answer, lines=("web: lab-1: proxy routes to web-abc-r1",)) as got:
        token = json.loads((tmp_path / "data" / "serve.json").read_text())["token"]
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(out), "rollback", "web", "-c", str(config)],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rolling back in pipeline serve" in done.stderr
    assert "proxy routes to web-abc-r1" in done.stderr
    assert done.stdout.strip() == "web: rolled back"
    assert got == [("/api/rollback/web", f"Bearer {token}", {"to": None, "wait": True})]
    loaded = {name.split(".")[0] for name in json.loads(out.read_text())}
    assert loaded & (HEAVY | {"rich", "requests", "urllib3", "pydantic"}) == set()
