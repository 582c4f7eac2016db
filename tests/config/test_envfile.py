"""A service's env_file is read as Docker Compose reads one, and a bad one is reported with its
file, line and config key, never with a value of the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline import logs
from pipeline import redact as redact_module
from pipeline.cli.app import app
from pipeline.config.envfile import EnvFileError, parse_env, read_env_file
from pipeline.config.load import parse
from pipeline.redact import redact


@pytest.fixture(autouse=True)
def _own_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values these tests register as secrets are forgotten afterwards, so that they mask
    nothing in other tests."""
    monkeypatch.setattr(redact_module, "_secrets", set(redact_module._secrets))


PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7envfile9pem\n"
    "x9Tq3vZ0b8Yw1Rk2Lm4Np6Qs8Tu0Vw2Xy4Za6Bc8De0Fg2Hi4Jk6Lm8No0Pq2Rs\n"
    "-----END PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('GREETING="hello envfile world"\n', {"GREETING": "hello envfile world"}),
        ("SINGLE='${HOME} # kept'\n", {"SINGLE": "${HOME} # kept"}),
        ("UNQUOTED=two words   \n", {"UNQUOTED": "two words"}),
        (f'TLS_KEY="{PEM}"\nAFTER=x\n', {"TLS_KEY": PEM, "AFTER": "x"}),
        ("export EXPORTED=yes\n", {"EXPORTED": "yes"}),
        ("# a comment\n\n   # indented\nA=1 # inline\nB=v#not-a-comment\n",
         {"A": "1", "B": "v#not-a-comment"}),
        ('QUOTED="x" # after the quote\n', {"QUOTED": "x"}),
        ('ESCAPES="a\\tb\\nc \\"q\\""\n', {"ESCAPES": 'a\tb\nc "q"'}),
        ("LITERAL=${HOME}/x\nDOUBLE=\"$HOME\"\n", {"LITERAL": "${HOME}/x", "DOUBLE": "$HOME"}),
        ("SPACED = around\n", {"SPACED": "around"}),
        ("EMPTY=\nEMPTY_Q=''\n", {"EMPTY": "", "EMPTY_Q": ""}),
        ("TWICE=1\nTWICE=2\n", {"TWICE": "2"}),
        ('CRLF=x\r\nQ="y"\r\n', {"CRLF": "x", "Q": "y"}),
        ("dotted.name-1[0]=ok\n", {"dotted.name-1[0]": "ok"}),
    ],
    ids=["double-quoted", "single-quoted", "unquoted", "multi-line", "export", "comments",
         "comment-after-quote", "escapes", "no-interpolation", "spaces", "empty", "last-wins",
         "crlf", "compose-names"],
)  # fmt: skip
def test_env_file_syntax_is_composes(text: str, expected: dict[str, str]) -> None:
    """Each form of Compose's env-file syntax gives the variables Compose would, quotes removed,
    a quoted multi-line value kept whole, `${VAR}` left literal."""
    assert parse_env(text) == (expected, None)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('A=1\nB="not closed\nC=3\n', 2, "a quoted value is not closed"),
        ("A=1\nB='x' trailing\n", 2, "text follows its closing quote"),
        ("A=1\n\nB: yaml-style\n", 3, "write NAME=value"),
        ("A=1\nLONELY\n", 2, "no '=' on this line"),
        (f"A=1\nKEY={PEM}\n", 3, "a value spanning several lines must be quoted"),
        ("A=1\n2BAD NAME=x\n", 2, "not NAME=VALUE"),
        ("A=1\n$NAME=x\n", 2, "invalid variable name"),
        ("export\n", 1, "no '=' on this line"),
    ],
    ids=["unclosed-quote", "after-quote", "yaml", "bare-name", "unquoted-pem", "space-in-name",
         "bad-name", "export-alone"],
)  # fmt: skip
def test_malformed_line_is_reported_with_its_number(text: str, line: int, message: str) -> None:
    """The first line that is not NAME=VALUE is reported with its number and what is wrong."""
    _values, problem = parse_env(text)
    assert problem is not None
    assert problem[0] == line and message in problem[1], problem


def test_problem_names_file_line_and_key_never_a_value(tmp_path: Path) -> None:
    """A malformed env_file raises `FILE:LINE: services.NAME.env_file: ...` without quoting the
    line, which may be a line of a secret."""
    path = tmp_path / "web.env"
    path.write_text(f"OK=1\nKEY={PEM}\n")
    with pytest.raises(EnvFileError) as info:
        read_env_file(path, "web.env", "services.web.env_file", "pipeline.toml:9")
    (problem,) = info.value.problems
    assert problem.startswith("web.env:3: services.web.env_file: no '=' on this line"), problem
    assert all(part not in problem for part in PEM.splitlines()[1:])


def _make(path: Path, kind: str) -> None:
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"A=1\nB=\xff\n")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "pipeline.toml:9: services.web.env_file: cannot read web.env: "
                    "No such file or directory"),
        ("directory", "pipeline.toml:9: services.web.env_file: cannot read web.env: "
                      "Is a directory"),
        ("not-utf8", "web.env:2: services.web.env_file: not UTF-8 text"),
    ],
)  # fmt: skip
def test_unreadable_file_is_reported_at_the_config_key(
    tmp_path: Path, kind: str, expected: str
) -> None:
    """A missing or unreadable file is reported at the config's `env_file` line; a file that is
    not UTF-8 at the line of its first bad byte."""
    _make(tmp_path / "web.env", kind)
    with pytest.raises(EnvFileError) as info:
        read_env_file(tmp_path / "web.env", "web.env", "services.web.env_file", "pipeline.toml:9")
    assert info.value.problems == [expected]


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("s3cr3t-token-value", True),
        ("hunter2", True),
        ("prod", True),
        ("abc", False),  # shorter than 4: every secret's minimum
        ("true", False),
        ("Off", False),
        ("info", False),
        ("8080", False),
        ("65535", False),
        ("123456", True),  # longer than a port: may be a PIN or an account number
    ],
)
def test_which_env_file_values_are_masked(value: str, masked: bool) -> None:
    """Every env_file value is a secret as soon as it is read, except settings that are never
    secrets (short values, booleans, log levels, numbers of a port's size)."""
    parse_env(f"V={value}\n")
    assert (redact(f"[{value}]") == "[***]") is masked


def test_every_line_of_a_multi_line_value_is_masked() -> None:
    """A PEM key read from an env_file is masked whole, and so is each of its lines printed
    alone."""
    parse_env(f'TLS_KEY="{PEM}"\n')
    assert redact(f"key: {PEM}") == "key: ***"
    body = PEM.splitlines()[1]
    assert redact(f"line: {body}") == "line: ***"


CONFIG = """
[hosts.web-1]
docker = "tcp://10.88.0.2:2375"

[repos.shop]
url = "https://git.example.com/acme/shop.git"

[images.web]
repo = "shop"

[services.web]
image = "web"
hosts = ["web-1"]
env_file = "web.env"

[services.api]
image = "web"
hosts = ["web-1"]
env_file = "env/api.env"
"""


def test_validate_reports_each_env_file_with_file_line_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pipeline validate` reads every env_file: a malformed line and a missing file are each
    reported as FILE:LINE: services.NAME.env_file, exit 2; fixed, it exits 0."""
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    (tmp_path / "web.env").write_text('GREETING="hello"\nTOKEN="validate-secret-9f3\n')

    def validate() -> Result:
        # In process (the command is a thin wrapper): a subprocess costs seconds on a busy machine.
        with monkeypatch.context() as m:
            m.chdir(tmp_path)
            try:
                return CliRunner().invoke(app, ["validate", "-c", "pipeline.toml"])
            finally:
                logs.configure()  # the command logged to the runner's stream, closed now

    res = validate()
    assert res.exit_code == 2, res.stdout + res.stderr
    api_line = CONFIG.splitlines().index('env_file = "env/api.env"') + 1
    assert res.stderr.splitlines() == [
        "web.env:2: services.web.env_file: a quoted value is not closed, or text follows its "
        "closing quote",
        f"pipeline.toml:{api_line}: services.api.env_file: cannot read env/api.env: "
        "No such file or directory",
        "2 problem(s) found.",
    ], res.stderr
    assert "validate-secret-9f3" not in res.stdout + res.stderr
    (tmp_path / "web.env").write_text('GREETING="hello"\nTOKEN="validate-secret-9f3"\n')
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "api.env").write_text("export A=1\n")
    res = validate()
    assert res.exit_code == 0, res.stdout + res.stderr


def test_loading_a_config_registers_its_env_file_values(tmp_path: Path) -> None:
    """A command that only loads the config (`history`, `status`) masks env_file values too."""
    (tmp_path / "web.env").write_text("API_TOKEN=loaded-not-yet-deployed-4e1\n")
    parse(CONFIG.replace('env_file = "env/api.env"\n', ""), tmp_path / "pipeline.toml")
    assert redact("token loaded-not-yet-deployed-4e1") == "token ***"
