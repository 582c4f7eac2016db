"""The builder's choice, the BuildKit CLI's argv, and the plan-time checks of the image keys:
pure tables, plus one probe of this machine's real docker CLIs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline import logs
from pipeline.build.builder import Builder
from pipeline.build.buildkit import (
    BuilderChoice,
    CliBuild,
    base_images,
    choose_builder,
    cli_build_args,
    cli_candidates,
)
from pipeline.cli.deploy import run
from pipeline.config.load import load, parse
from pipeline.deploy.connections import Connections
from pipeline.deploy.runner import Runner
from pipeline.errors import ConfigError, StallingError
from pipeline.hosts.dockercli import CliProbe, engine_flags, probe, run_build
from pipeline.lab.workrepo import WorkRepo
from pipeline.plan.buildkeys import SecretSource, secret_sources, unsupported_keys
from pipeline.plan.planner import Build
from pipeline.redact import redact, register_secret
from pipeline.state.store import State

NEW_CLI = CliProbe("/usr/local/bin/docker", found=True)  # Docker 28 without buildx
OLD_CLI = CliProbe("/usr/bin/docker", found=True, buildkit=True)  # Debian's 20.10
BUILDX_CLI = CliProbe("/opt/docker", found=True, buildx=True, buildkit=True)
MISSING = CliProbe("/usr/bin/docker", found=False)


@pytest.mark.parametrize(
    ("setting", "probes", "expected"),
    [
        ("auto", [NEW_CLI, OLD_CLI], BuilderChoice("buildkit", "/usr/bin/docker")),
        ("auto", [BUILDX_CLI, OLD_CLI], BuilderChoice("buildx", "/opt/docker")),
        ("buildkit", [OLD_CLI, BUILDX_CLI], BuilderChoice("buildkit", "/usr/bin/docker")),
        ("legacy", [BUILDX_CLI], BuilderChoice("legacy", why='builder = "legacy"')),
        (
            "auto",
            [NEW_CLI, MISSING],
            BuilderChoice(
                "legacy",
                why="/usr/local/bin/docker has no buildx and its build has no BuildKit; "
                "/usr/bin/docker not found",
            ),
        ),
    ],
)
def test_choose_builder(setting: Any, probes: list[CliProbe], expected: BuilderChoice) -> None:
    """The first candidate CLI with buildx or BuildKit builds; without one, legacy says why."""
    assert choose_builder(setting, probes) == expected


def test_legacy_notice_is_one_line_saying_why() -> None:
    """The legacy fallback's notice names the CLI and what it lacks, on one line."""
    choice = choose_builder("auto", [NEW_CLI])
    assert choice.notice == (
        "legacy builder: /usr/local/bin/docker has no buildx and its build has no BuildKit"
    )
    assert choose_builder("auto", [OLD_CLI]).notice == (
        "BuildKit: /usr/bin/docker build (DOCKER_BUILDKIT=1)"
    )


def test_cli_candidates_configured_then_path_then_debian() -> None:
    """Candidates: the configured CLI, `docker` on PATH, /usr/bin/docker; no repeats."""
    assert cli_candidates("/opt/d", "/usr/local/bin/docker") == [
        "/opt/d",
        "/usr/local/bin/docker",
        "/usr/bin/docker",
    ]
    assert cli_candidates(None, "/usr/bin/docker") == ["/usr/bin/docker"]


SPEC = CliBuild(
    context=Path("/w/context"),
    dockerfile="Dockerfile",
    tags=["reg:5000/web:abc", "reg:5000/web:main"],
    labels={"b": "2", "a": "1"},
    build_args={"VERSION": "1"},
    iidfile=Path("/w/iid"),
    target="prod",
    secrets=[
        SecretSource("npm_token", "env", "NPM_TOKEN", "npm_token_env"),
        SecretSource("ssh_key", "file", "/run/keys/deploy", "ssh_key_file"),
    ],
    cache_from=["type=registry,ref=reg:5000/web:cache"],
    cache_to=["type=inline"],
    pull=True,
)


def test_argv_of_docker_build_with_buildkit() -> None:
    """Without buildx: `DOCKER_BUILDKIT=1 docker build`, secrets by reference, labels as
    --label, a registry cache as its image and an inline cache as the build arg."""
    args, env = cli_build_args("buildkit", SPEC)
    assert env == {"DOCKER_BUILDKIT": "1"}
    assert args == [
        "build",
        "--progress=plain",
        "--iidfile",
        "/w/iid",
        "-f",
        "/w/context/Dockerfile",
        "-t",
        "reg:5000/web:abc",
        "-t",
        "reg:5000/web:main",
        "--label",
        "a=1",
        "--label",
        "b=2",
        "--target",
        "prod",
        "--pull",
        "--secret",
        "id=npm_token,env=NPM_TOKEN",
        "--secret",
        "id=ssh_key,src=/run/keys/deploy",
        "--cache-from",
        "reg:5000/web:cache",
        "--build-arg",
        "BUILDKIT_INLINE_CACHE=1",
        "--build-arg",
        "VERSION=1",
        "/w/context",
    ]


def test_argv_of_buildx_build() -> None:
    """With buildx: `docker buildx build --load`, cache specs passed as given, no env."""
    args, env = cli_build_args("buildx", SPEC)
    assert env == {}
    assert args[:3] == ["buildx", "build", "--load"]
    assert "--cache-from" in args
    assert args[args.index("--cache-from") + 1] == "type=registry,ref=reg:5000/web:cache"
    assert args[args.index("--cache-to") + 1] == "type=inline"


def test_engine_flags_follow_the_host_settings() -> None:
    """The CLI reaches the engine the SDK does: -H URL, and --tlsverify with the TLS files."""
    assert engine_flags("ssh://root@h", tls_ca=None, tls_cert=None, tls_key=None) == [
        "-H",
        "ssh://root@h",
    ]
    assert engine_flags("tcp://h:2376", tls_ca="/ca", tls_cert="/c", tls_key="/k") == [
        "-H",
        "tcp://h:2376",
        "--tlsverify",
        "--tlscacert",
        "/ca",
        "--tlscert",
        "/c",
        "--tlskey",
        "/k",
    ]


CONFIG = """
[pipeline]
data_dir = "data"
{pipeline}

[repos.app]
url = "/srv/app.git"

[images.web]
repo = "app"
target = "prod"
{image}
"""


def _loaded(image: str, pipeline: str = "") -> Any:
    return parse(CONFIG.format(image=image, pipeline=pipeline), Path("pipeline.toml"))


def _builder(loaded: Any, probes: list[CliProbe]) -> Builder:
    by_path = {p.path: p for p in probes}
    return Builder(
        loaded,
        state=None,
        connections=None,  # type: ignore[arg-type]
        report=lambda _l: None,
        probe=lambda path: by_path.get(path, CliProbe(path, found=False)),
        which=lambda _name: "/usr/local/bin/docker",
    )


BUILD = Build("web", "app", "0" * 40, "never built")


def test_buildkit_key_on_a_machine_without_buildkit_is_a_located_plan_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`secrets` where the builder resolves to legacy: an error naming file:line and key."""
    monkeypatch.setenv("NPM_TOKEN", "tok-value-1234")
    loaded = _loaded('secrets = { npm_token_env = "NPM_TOKEN" }')
    with pytest.raises(ConfigError) as caught:
        _builder(loaded, [NEW_CLI]).check([BUILD])
    assert caught.value.problems == [
        "pipeline.toml:12: images.web.secrets: needs BuildKit, but this image builds with the "
        "legacy builder (/usr/local/bin/docker has no buildx and its build has no BuildKit; "
        "/usr/bin/docker not found)"
    ]
    _builder(loaded, [NEW_CLI, OLD_CLI]).check([BUILD])  # Debian's CLI found: fine


def test_plan_refuses_a_named_docker_cli_that_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A `[pipeline] docker_cli` that does not exist fails a planned build with file:line and
    key, instead of building with another CLI; nothing planned, nothing said."""
    loaded = _loaded("", pipeline='docker_cli = "/nonexistent/docker"')
    with pytest.raises(ConfigError) as caught:
        _builder(loaded, [OLD_CLI]).check([BUILD])
    assert caught.value.problems == [
        "pipeline.toml:4: pipeline.docker_cli: /nonexistent/docker does not exist"
    ]
    _builder(loaded, [OLD_CLI]).check([])


def test_missing_secret_is_an_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An unset secret variable or unreadable secret file: an error naming the key; a present
    one is registered for redaction."""
    monkeypatch.delenv("PL_TEST_UNSET", raising=False)
    monkeypatch.setenv("PL_TEST_SET", "sekrit-value-42")
    loaded = _loaded(
        'secrets = { a_env = "PL_TEST_UNSET", b_file = "/nonexistent/key", c_env = "PL_TEST_SET" }'
    )
    with pytest.raises(ConfigError) as caught:
        _builder(loaded, [OLD_CLI]).check([BUILD])
    assert caught.value.problems == [
        "pipeline.toml:12: images.web.secrets.a_env: environment variable PL_TEST_UNSET is not "
        "set; nothing was built",
        "pipeline.toml:12: images.web.secrets.b_file: cannot read /nonexistent/key: No such file "
        "or directory; nothing was built",
    ]
    assert "sekrit-value-42" not in redact("x sekrit-value-42 y")


@pytest.mark.parametrize(
    ("image", "builder", "keys"),
    [
        ('cache_from = "type=registry,ref=r/x"', "legacy", ["cache_from"]),
        ('cache_to = ["type=inline"]', "legacy", ["cache_to"]),
        ("", "legacy", []),  # target alone works on legacy (the Engine API's `target`)
        ('cache_from = "type=registry,ref=r/x"\ncache_to = "type=inline"', "buildkit", []),
        ('cache_from = "type=local,src=/c"', "buildkit", ["cache_from"]),
        ('cache_to = "type=registry,ref=r/x,mode=max"', "buildkit", ["cache_to"]),
        ('cache_to = "type=registry,ref=r/x,mode=max"', "buildx", []),
    ],
)
def test_unsupported_keys(image: str, builder: Any, keys: list[str]) -> None:
    """Which keys each builder refuses: legacy all BuildKit-only ones, BuildKit without buildx
    the cache specs it cannot express."""
    img = _loaded(image).model.images["web"]
    assert [k for k, _ in unsupported_keys(img, builder)] == keys


@pytest.mark.parametrize(
    ("secrets", "error"),
    [
        ('{ npm_token = "X" }', "name it ID_env"),
        ('{ npm_token_env = "not a var" }', "invalid environment variable name"),
        ('{ _env = "X" }', "name it ID_env"),
    ],
)
def test_bad_secret_keys_are_located_config_errors(secrets: str, error: str) -> None:
    """A secret key without _env/_file, or a bad variable name, fails loading at its line."""
    with pytest.raises(ConfigError, match=rf"pipeline.toml:12: images.web.secrets: .*{error}"):
        _loaded(f"secrets = {secrets}")


def test_secret_sources_and_cache_string() -> None:
    """Secret keys become ids by their suffix; a cache spec string is a one-item list."""
    img = _loaded(
        'secrets = { npm_token_env = "NPM_TOKEN", ssh_key_file = "/run/keys/deploy" }\n'
        'cache_from = "type=registry,ref=r/x"'
    ).model.images["web"]
    assert secret_sources(img) == [
        SecretSource("npm_token", "env", "NPM_TOKEN", "npm_token_env"),
        SecretSource("ssh_key", "file", "/run/keys/deploy", "ssh_key_file"),
    ]
    assert img.cache_from == ["type=registry,ref=r/x"]


@pytest.mark.docker
@pytest.mark.skipif(
    not (os.access("/usr/bin/docker", os.X_OK) and os.access("/usr/local/bin/docker", os.X_OK)),
    reason="needs the test bed's two docker CLIs",
)
def test_probe_of_this_machines_clis() -> None:
    """On the test bed, Debian's 20.10 CLI builds with BuildKit and the Docker 28 CLI (no
    buildx) does not."""
    assert probe("/usr/bin/docker") == OLD_CLI
    assert probe("/usr/local/bin/docker") == NEW_CLI


def _legacy_with_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config (returned) whose image web, with `secrets` on the legacy builder, is to be
    built from a local git repo; NPM_TOKEN unset."""
    monkeypatch.delenv("NPM_TOKEN", raising=False)
    remote = WorkRepo(tmp_path / "git")
    remote.write("Dockerfile", "FROM scratch\n")
    remote.commit_push("initial")
    config = tmp_path / "pipeline.toml"
    config.write_text(
        f'[pipeline]\ndata_dir = "data"\n\n[repos.app]\nurl = "{remote.url}"\n\n'
        '[images.web]\nrepo = "app"\nbuilder = "legacy"\n'
        'secrets = { npm_token_env = "NPM_TOKEN" }\n'
    )
    return config


def test_plan_refuses_a_buildkit_key_on_the_legacy_builder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pipeline plan` (Runner.preview) of an image with `secrets` and `builder = "legacy"`
    fails at plan time with the located key, before any engine is reached."""
    config = _legacy_with_secret(tmp_path, monkeypatch)
    loaded = load(config)
    state = State.in_dir(loaded.data_dir)
    runner = Runner(loaded, state, Connections(loaded))
    try:
        with pytest.raises(ConfigError) as caught:
            runner.preview()
    finally:
        state.engine.dispose()
    assert caught.value.problems == [
        f"{config}:10: images.web.secrets: needs BuildKit, but this image builds with the "
        'legacy builder (builder = "legacy")',
        f"{config}:10: images.web.secrets.npm_token_env: environment variable NPM_TOKEN is "
        "not set; nothing was built",
    ]


def test_run_prints_a_plan_time_error_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pipeline run` refused at plan time prints each located error once and exits 1."""
    config = _legacy_with_secret(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    try:
        res = CliRunner().invoke(run, ["-c", "pipeline.toml"])  # the command alone
    finally:
        logs.configure()  # the command logged to the runner's stream, closed now
    assert res.exit_code == 1, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if "images.web.secrets:" in line]
    assert errors == [
        f"error: {config.name}:10: images.web.secrets: needs BuildKit, but this image builds "
        'with the legacy builder (builder = "legacy")'
    ], res.stderr


def test_failed_cli_build_raises_with_its_tail_secrets_masked(tmp_path: Path) -> None:
    """A CLI build that fails raises a StallingError naming the engine, with its last output
    lines, a registered secret masked; the lines were streamed as they came."""
    register_secret("hunter2-the-secret")
    cli = tmp_path / "docker"
    cli.write_text("#!/bin/sh\necho '#1 step one'\necho 'token hunter2-the-secret'\nexit 3\n")
    cli.chmod(0o755)
    lines: list[str] = []
    with pytest.raises(StallingError) as caught:
        run_build(
            [str(cli), "build"],
            env={},
            where="host local (unix:///x)",
            iidfile=tmp_path / "iid",
            on_output=lines.append,
        )
    assert lines == ["#1 step one", "token ***"]
    assert str(caught.value) == (
        "build failed: host local (unix:///x): exit status 3\n#1 step one\ntoken ***"
    )


@pytest.mark.parametrize(
    ("dockerfile", "build_args", "expected"),
    [
        ("FROM reg:5000/base:1\n", {}, ["reg:5000/base:1"]),
        ("FROM scratch\nCOPY x /x\n", {}, []),
        (
            "ARG BASE=reg:5000/base:latest\nFROM $BASE AS deps\nFROM scratch AS prod\n"
            "COPY --from=deps / /\nFROM deps\nFROM Other/x:1 as Y\nFROM y\n",
            {},
            ["reg:5000/base:latest", "Other/x:1"],
        ),
        ("ARG V=1\nFROM reg/base:$V\nFROM reg/base:$V\n", {"V": "2"}, ["reg/base:2"]),
    ],
)
def test_base_images_are_the_registry_images_the_stages_start_from(
    dockerfile: str, build_args: dict[str, str], expected: list[str]
) -> None:
    """A refreshing BuildKit build pulls exactly the Dockerfile's registry bases (ARGs applied),
    not its stage names nor scratch, each once."""
    assert base_images(dockerfile, build_args) == expected
