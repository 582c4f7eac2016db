"""The Kamal-like commands' pure parts and the ones needing no Docker: `logs`' merge by time,
`init`'s generated config, `lock status`/`lock release`, the exit codes, the command listing,
shell completion."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.cli import completion
from pipeline.cli.app import _LAZY, app
from pipeline.cli.common import EXIT_CODES, complete_service
from pipeline.cli.init import exposed_port, image_name
from pipeline.cli.logs import merge_by_time, split_timestamp
from pipeline.lab.sample_app import write_sample_app
from pipeline.state.store import State

README = Path(__file__).resolve().parents[2] / "README.md"

CONFIG = """
[pipeline]
data_dir = "data"

[hosts.web-1]
docker = "tcp://10.88.0.2:2375"

[repos.shop]
url = "https://git.example.com/acme/shop.git"

[images.web]
repo = "shop"
context = "web"

[services.web]
image = "web"
hosts = ["web-1"]

[services.worker]
image = "web"
hosts = ["web-1"]
"""


def cli(
    *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=cwd,
        input=stdin,
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("2026-11-30T02:45:32.123456789Z hello", (1796006732_123456789, "hello")),
        ("2026-11-30T02:45:32.5Z x", (1796006732_500000000, "x")),
        ("2026-11-30T02:45:32Z  two spaces", (1796006732_000000000, " two spaces")),
        ("no timestamp here", (0, "no timestamp here")),
    ],
)
def test_split_timestamp_reads_dockers_rfc3339_nano_prefix(
    line: str, expected: tuple[int, str]
) -> None:
    """A log line's Docker timestamp becomes exact epoch nanoseconds; a line without one sorts
    first."""
    assert split_timestamp(line) == expected


def test_merge_by_time_interleaves_hosts_in_time_order() -> None:
    """Lines of two hosts come out in time order, however Docker's fractions are trimmed."""
    merged = merge_by_time(
        [
            ("h1", "2026-11-30T02:45:32.5Z h1 second"),
            ("h1", "2026-11-30T02:45:33.000000001Z h1 fourth"),
            ("h2", "2026-11-30T02:45:32.25Z h2 first"),
            ("h2", "2026-11-30T02:45:32.999999999Z h2 third"),
        ]
    )
    assert [(h, t) for h, _at, t in merged] == [
        ("h2", "h2 first"),
        ("h1", "h1 second"),
        ("h2", "h2 third"),
        ("h1", "h1 fourth"),
    ]


@pytest.mark.parametrize(
    ("text", "port"),
    [
        ("FROM scratch\nEXPOSE 8080\n", 8080),
        ("FROM scratch\nEXPOSE 9000/tcp 9001\n", 9000),
        ("FROM scratch\n# EXPOSE 1\nEXPOSE \\\n  7000/udp\n", 7000),
        ('FROM scratch\nCMD ["x"]\n', None),
    ],
)
def test_exposed_port_is_the_first_expose(text: str, port: int | None) -> None:
    """`init` publishes the first port a Dockerfile EXPOSEs, continuations and comments read
    as Docker reads them."""
    assert exposed_port(text) == port


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("web/Dockerfile", "web"),
        ("Dockerfile", "shop"),
        ("api/Dockerfile.worker", "api-worker"),
        ("ops/Tools.Dockerfile", "ops-tools"),
    ],
)
def test_image_name_comes_from_the_dockerfiles_folder(path: str, name: str) -> None:
    """Each Dockerfile's image is named after its folder (the repo's at the root)."""
    assert image_name(PurePosixPath(path), "shop") == name


def test_init_writes_a_config_that_validates_once_filled(tmp_path: Path) -> None:
    """`pipeline init` in the sample app's repository writes one image and service per
    Dockerfile with its EXPOSEd port; `validate` refuses the placeholders and accepts the file
    once hosts and registry are filled in; a second `init` does not overwrite it."""
    repo = tmp_path / "shop"
    write_sample_app(repo, "web", "web v1")
    write_sample_app(repo, "api", "api v1")
    done = cli("init", str(repo))
    assert done.returncode == 0, done.stderr
    config = repo / "pipeline.toml"
    text = config.read_text()
    assert "[images.web]" in text and "[images.api]" in text
    assert 'context = "web"' in text and "[services.web.health]" in text
    assert re.search(r'ports = \["8080:8080"\]', text) and re.search(
        r'ports = \["8081:8080"\]', text
    )

    refused = cli("validate", "-c", str(config))
    assert refused.returncode == 2 and "FILL-IN" in refused.stdout + refused.stderr

    # Each placeholder left is refused at its key, the registry's too (a valid host name).
    config.write_text(text.replace('docker = "FILL-IN"', 'docker = "tcp://10.88.40.2:2375"'))
    half = cli("validate", "-c", str(config))
    assert half.returncode == 2, half.stdout + half.stderr
    assert "registry.address: FILL-IN is a placeholder" in half.stdout + half.stderr

    config.write_text(
        text.replace('address = "FILL-IN"', 'address = "10.88.40.1:5000"').replace(
            'docker = "FILL-IN"', 'docker = "tcp://10.88.40.2:2375"'
        )
    )
    ok = cli("validate", "-c", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 image(s), 2 service(s), 1 host(s)" in ok.stdout

    again = cli("init", str(repo))
    assert again.returncode == 2 and "exists" in again.stderr
    assert "10.88.40.2" in config.read_text()


def test_lock_status_shows_the_holder_and_release_frees_it_with_a_history_line(
    tmp_path: Path,
) -> None:
    """`lock status` names a lease's owner, host and pid (one JSON document with --json);
    `lock release` asks first, frees it on yes and leaves a line in `history`."""
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    state = State.in_dir(tmp_path / "data")
    assert state.leases.acquire("service:web", "build-box:4242", 600)

    status = cli("lock", "status", "--json", "-c", str(config))
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert (row["lease"], row["service"], row["host"], row["pid"]) == (
        "service:web",
        "web",
        "build-box",
        4242,
    )
    table = cli("lock", "status", "-c", str(config))
    assert "service:web" in table.stdout and "build-box" in table.stdout

    declined = cli("lock", "release", "web", "-c", str(config), stdin="n\n")
    assert declined.returncode == 2 and state.leases.lock_holder("service:web") is not None

    released = cli("lock", "release", "web", "-c", str(config), stdin="y\n")
    assert released.returncode == 0, released.stderr
    assert "build-box:4242" in released.stdout
    assert state.leases.lock_holder("service:web") is None
    history = json.loads(cli("history", "web", "--json", "-c", str(config)).stdout)
    assert history[0]["status"] == "note" and "build-box:4242" in history[0]["reason"]
    assert "No lease is held" in cli("lock", "status", "-c", str(config)).stdout


def test_exit_codes_are_documented_in_the_readme() -> None:
    """Every exit code the commands use is in README's table with its meaning."""
    text = README.read_text()
    for code in EXIT_CODES:
        assert re.search(rf"^\| `{code}` \|", text, re.M), code


def test_help_lists_every_command_as_the_command_describes_itself() -> None:
    """`pipeline --help` lists each command with the first sentence of its own help (taken
    from the lazy table, so the listing cannot drift from the commands it does not import)."""
    ctx = app.make_context("pipeline", ["validate"])
    for name, (_module, _attr, short) in _LAZY.items():
        cmd = app.get_command(ctx, name)
        assert cmd is not None and cmd.name == name, name
        assert cmd.hidden == (short is None), name
        if short is not None:
            assert cmd.get_short_help_str(limit=10_000) == short, name


def test_global_log_options_set_up_logging_for_the_command_that_runs(tmp_path: Path) -> None:
    """`pipeline --log-format json --log-level debug db current` runs with JSON log lines at
    debug level (logging is set up when the command runs, after its arguments are parsed)."""
    import structlog
    from click.testing import CliRunner

    from pipeline import logs

    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    args = ["--log-format", "json", "--log-level", "debug", "db", "current", "-c", str(config)]
    logs.configure("console", "warning")
    try:
        res = CliRunner().invoke(app, args)
        settings = structlog.get_config()
    finally:
        logs.configure()  # the command logged to the runner's stream, closed now
    assert res.exit_code == 0, res.output
    assert isinstance(settings["processors"][-1], structlog.processors.JSONRenderer)
    assert settings["wrapper_class"] is structlog.make_filtering_bound_logger("DEBUG")


def test_an_interrupted_command_exits_1_as_the_readme_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A command interrupted by Ctrl-C or SIGTERM (KeyboardInterrupt out of its body, after a
    rollout undid its work) exits 1, README's "interrupted" code, without a traceback."""
    from click.testing import CliRunner

    from pipeline.cli import app as app_module

    def interrupted(_path: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(app_module, "load_config", interrupted)
    res = CliRunner().invoke(app, ["validate"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output


def test_completion_offers_the_configs_service_names(tmp_path: Path) -> None:
    """Shell completion of a service reads the names from the config named by -c."""
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    root = SimpleNamespace(params={"config": str(config)}, parent=None)
    ctx: Any = SimpleNamespace(params={}, parent=root)  # a subcommand's context under the app's
    assert complete_service(ctx, None, "w") == ["web", "worker"]
    assert complete_service(ctx, None, "wo") == ["worker"]
    root.params["config"] = str(tmp_path / "missing.toml")
    assert complete_service(ctx, None, "") == []


def _complete(instruction: str, words: str, **env: str) -> list[str]:
    """What the console script answers a bash completion request of `instruction`."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pipeline")],
        env={
            "_PIPELINE_COMPLETE": instruction,
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1),
            "PATH": "/usr/bin:/bin",
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return done.stdout.splitlines()


def test_completion_through_the_shell_protocol(tmp_path: Path) -> None:
    """`pipeline deploy <TAB>` in bash gets the config's services, `pipeline lo<TAB>` the
    commands, `pipeline history --l<TAB>` the option (click's protocol: type,value lines)."""
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    assert _complete("bash_complete", f"pipeline deploy -c {config} ") == [
        "plain,web",
        "plain,worker",
    ]
    assert _complete("bash_complete", "pipeline lo") == ["plain,logs", "plain,lock"]
    assert _complete("bash_complete", "pipeline history --l") == ["plain,--limit"]


def test_completion_scripts_installed_by_the_typer_cli_still_complete(tmp_path: Path) -> None:
    """A completion script that the typer-based pipeline installed (`complete_bash`, bare
    values; `complete_zsh` with `_TYPER_COMPLETE_ARGS`) still gets the services and commands."""
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    assert _complete("complete_bash", f"pipeline deploy -c {config} ") == ["web", "worker"]
    assert _complete("complete_bash", "pipeline lo") == ["logs", "lock"]
    zsh = _complete("complete_zsh", "", _TYPER_COMPLETE_ARGS="pipeline lo")
    assert zsh[0].startswith('_arguments \'*: :(("logs":') and zsh[-1].startswith('"lock":')


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_install_completion_for_bash_completes_in_a_real_bash(tmp_path: Path) -> None:
    """`pipeline --install-completion` under bash writes the script where typer put it, sources
    it from ~/.bashrc once, and that script completes `pipeline lo<TAB>` in a real bash."""
    env = {"HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    for _ in range(2):  # installing again changes nothing
        shell, path = completion.install(app, "pipeline", "bash", home=tmp_path)
    assert (shell, path) == ("bash", tmp_path / ".bash_completions" / "pipeline.sh")
    assert (tmp_path / ".bashrc").read_text().count(f"source '{path}'") == 1
    probe = (
        f"source {path}; COMP_WORDS=(pipeline lo); COMP_CWORD=1; "
        '_pipeline_completion pipeline; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "--norc", "-c", probe],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.stdout.split() == ["logs", "lock"], done.stderr
    for shell in ("zsh", "fish"):
        _, path = completion.install(app, "pipeline", shell, home=tmp_path)
        assert "_PIPELINE_COMPLETE" in path.read_text()
    assert "fpath+=~/.zfunc" in (tmp_path / ".zshrc").read_text()


def test_push_and_pull_progress_sums_bytes_over_layers() -> None:
    """Docker's per-layer push/pull messages add up to the bytes a terminal shows; a finished
    layer counts whole."""
    from pipeline.cli.output import amount
    from pipeline.hosts.engine import layer_progress

    layers: dict[str, tuple[int, int]] = {}
    messages = [
        {"status": "Preparing", "id": "a"},
        {
            "status": "Pushing",
            "id": "a",
            "progressDetail": {"current": 500_000, "total": 2_000_000},
        },
        {
            "status": "Pushing",
            "id": "b",
            "progressDetail": {"current": 100_000, "total": 1_000_000},
        },
        {"status": "Pushed", "id": "a", "progressDetail": {}},
    ]
    changed = [layer_progress(layers, m) for m in messages]
    assert changed == [False, True, True, True]
    done, total = sum(c for c, _ in layers.values()), sum(t for _, t in layers.values())
    assert (done, total) == (2_100_000, 3_000_000)
    assert amount("push reg/web", done, total) == "2.1/3.0 MB"
    assert amount("lab-1: build web", 3, 5) == "step 3/5"
    assert amount("web: lab-1: health", 3, None) == "attempt 3"


def test_rollback_to_a_release_the_service_never_had_exits_2(tmp_path: Path) -> None:
    """`pipeline rollback web --to r99` naming no release of web is a bad argument (exit 2,
    README's table), while a rollback with nothing earlier to go back to is a failure (1)."""
    from click.testing import CliRunner

    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG.replace('data_dir = "data"', f'data_dir = "{tmp_path / "data"}"'))
    bad = CliRunner().invoke(app, ["rollback", "web", "--to", "r99", "-c", str(config)])
    assert bad.exit_code == 2, bad.output
    assert "service web: it has no release r99" in bad.stderr
    none = CliRunner().invoke(app, ["rollback", "web", "-c", str(config)])
    assert none.exit_code == 1, none.output
    assert "no earlier succeeded release" in none.stderr


def test_rollback_of_an_unknown_service_exits_2_and_json_still_gets_one_document(
    tmp_path: Path,
) -> None:
    """`pipeline rollback nosuch` is bad input (exit 2, naming the known services, as `deploy`
    says it); with `--json` stdout still carries exactly one JSON document with the error."""
    from click.testing import CliRunner

    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG.replace('data_dir = "data"', f'data_dir = "{tmp_path / "data"}"'))
    plain = CliRunner().invoke(app, ["rollback", "nosuch", "-c", str(config)])
    assert plain.exit_code == 2, plain.output
    assert "unknown service 'nosuch' (known: web" in plain.stderr
    as_json = CliRunner().invoke(app, ["rollback", "nosuch", "--json", "-c", str(config)])
    assert as_json.exit_code == 2
    doc = json.loads(as_json.stdout)
    assert (doc["ok"], doc["exit_code"], doc["releases"]) == (False, 2, [])
    assert "unknown service 'nosuch'" in doc["error"]
    none = CliRunner().invoke(app, ["rollback", "web", "--json", "-c", str(config)])
    assert none.exit_code == 1 and json.loads(none.stdout)["exit_code"] == 1
