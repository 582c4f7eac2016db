"""Config loading: the example validates; bad files report every problem with file:line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import logs
from pipeline.cli.app import app
from pipeline.config.load import load, parse
from pipeline.config.model import PortMapping, parse_duration, parse_port
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = """
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
ports = ["8080:8080"]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, Path("pipeline.toml"))
    return info.value.problems


def test_example_config_validates() -> None:
    """The bundled example is a valid config."""
    loaded = load(ROOT / "pipeline.example.toml")
    assert loaded.model.services["web"].health.http == "/health"


def test_all_errors_reported_with_line_and_key() -> None:
    """An unknown key, a bad duration and an unknown image are all reported, each located."""
    text = BASE.replace('context = "web"', 'context = "web"\ncolour = "blue"') + (
        '\n[services.api]\nimage = "nope"\nhosts = ["web-1"]\n\n'
        '[services.api.health]\ntimeout = "soon"\n'
    )
    found = problems(text)
    lines = text.splitlines()
    assert len(found) == 3, found
    by_key = {p.split(": ")[1]: p for p in found}
    unknown = by_key["images.web.colour"]
    assert unknown.startswith("pipeline.toml:")
    assert lines[int(unknown.split(":")[1]) - 1].startswith("colour")
    timeout = by_key["services.api.health.timeout"]
    assert "invalid duration 'soon'" in timeout
    assert lines[int(timeout.split(":")[1]) - 1].startswith("timeout")
    assert "unknown image 'nope'" in by_key["services.api.image"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('url = "https://git.example.com/acme/shop.git"', 'url = "ext::sh -c evil"', "refused"),
        ('url = "https://git.example.com/acme/shop.git"', 'url = "--upload-pack=x"', "option"),
        ('context = "web"', 'context = "../web"', "leaves the repository"),
        ('context = "web"', 'context = "/etc"', "must be relative"),
        ("[services.web]", "[services.Web_]", "invalid name"),
        ('hosts = ["web-1"]', 'hosts = ["web-2"]', "unknown host 'web-2'"),
        ('repo = "shop"', 'repo = "shop"\nrebuild = "61 * * * *"', "invalid cron"),
        ('ports = ["8080:8080"]', 'ports = ["8080:99999"]', "invalid port"),
        ('ports = ["8080:8080"]', 'ports = "8080:8080"', "expected list, got str '8080:8080'"),
        ("[repos.shop]", '[repos.shop]\npassword = "hunter2"', "secrets are never inline"),
    ],
)
def test_bad_values_are_refused(old: str, new: str, expected: str) -> None:
    """Each kind of bad value is refused with a message saying what is wrong."""
    assert old in BASE
    found = problems(BASE.replace(old, new, 1))
    assert any(expected in p for p in found), found
    assert all("hunter2" not in p for p in found)


def test_health_monitor_is_a_located_duration() -> None:
    """`health.monitor` parses like the other durations (default 5 s) and a bad one is refused
    with its file, line and key."""
    text = BASE + '\n[services.web.health]\nhttp = "/health"\nmonitor = "2s"\n'
    assert parse(text, Path("pipeline.toml")).model.services["web"].health.monitor == 2.0
    assert parse(BASE, Path("pipeline.toml")).model.services["web"].health.monitor == 5.0
    found = problems(text.replace('monitor = "2s"', 'monitor = "a while"'))
    line = text.splitlines().index('monitor = "2s"') + 1
    assert found == [
        f"pipeline.toml:{line}: services.web.health.monitor: invalid duration 'a while' "
        "(use e.g. '500ms', '30s', '2m', '1h')"
    ], found


def test_announced_commit_timeout_is_a_located_duration() -> None:
    """`[server] announced_commit_timeout` is 5 minutes unless set, parses like every duration,
    and a bad one is refused with its file, line and key."""
    assert parse(BASE, Path("pipeline.toml")).model.server.announced_commit_timeout == 300.0
    text = '[server]\nannounced_commit_timeout = "90s"\n' + BASE
    assert parse(text, Path("pipeline.toml")).model.server.announced_commit_timeout == 90.0
    found = problems(text.replace('"90s"', '"later"'))
    assert found == [
        "pipeline.toml:2: server.announced_commit_timeout: invalid duration 'later' "
        "(use e.g. '500ms', '30s', '2m', '1h')"
    ], found


def test_invalid_toml_names_the_line() -> None:
    """A TOML syntax error names the file and line."""
    found = problems("[pipeline]\ndata_dir = \n")
    assert found[0].startswith("pipeline.toml:2: invalid TOML")


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("2m", 120), ("1h30m", 5400), ("0", 0)]
)
def test_durations(text: str, seconds: float) -> None:
    """Durations in the documented units parse to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080", PortMapping(8080, "tcp", None, None)),
        ("18080:8080", PortMapping(8080, "tcp", 18080, None)),
        ("127.0.0.1:80:8080/udp", PortMapping(8080, "udp", 80, "127.0.0.1")),
        ("1.2.3.4::80", PortMapping(80, "tcp", None, "1.2.3.4")),
    ],
)
def test_port_mappings_parse(text: str, expected: PortMapping) -> None:
    """Every form of `ports` entry parses to its container port, protocol, host port and IP."""
    assert parse_port(text) == expected


@pytest.mark.parametrize(
    "text", ["80:80:80:80", "8080/sctp", "0", "8080:65536", "::1:80:80", "web:8080", "80:", ""]
)
def test_bad_port_mappings_are_refused(text: str) -> None:
    """Too many parts, another protocol, ports out of 1-65535 or a non-IPv4 address: refused."""
    with pytest.raises(ValueError, match="invalid port mapping"):
        parse_port(text)


def test_validate_cli_exit_codes(tmp_path: Path) -> None:
    """`pipeline validate` exits 0 on the example and 2 with the errors on a bad file."""
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "-c", str(ROOT / "pipeline.example.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "1 service(s)" in ok.stdout
    bad = tmp_path / "pipeline.toml"
    bad.write_text(BASE.replace('image = "web"', 'image = "wbe"'))
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert "pipeline.toml:13: services.web.image: unknown image 'wbe'" in res.stderr


@pytest.mark.parametrize(
    ("cli", "why"),
    [
        ("{tmp}/nonexistent/docker", "does not exist"),
        ("{tmp}", "is not a file"),
        ("{tmp}/plain", "is not executable"),
        ("{tmp}/docker", None),
    ],
)
def test_docker_cli_that_cannot_run_is_a_located_problem(
    tmp_path: Path, cli: str, why: str | None
) -> None:
    """A `[pipeline] docker_cli` that is missing, a directory or not executable is a problem
    naming file:line and key; an executable one is none."""
    (tmp_path / "plain").write_text("#!/bin/sh\n")
    (tmp_path / "docker").write_text("#!/bin/sh\n")
    (tmp_path / "docker").chmod(0o755)
    path = cli.format(tmp=tmp_path)
    loaded = parse(f'[pipeline]\ndocker_cli = "{path}"\n' + BASE, Path("pipeline.toml"))
    expected = [f"pipeline.toml:2: pipeline.docker_cli: {path} {why}"] if why else []
    assert loaded.docker_cli_problems() == expected
    assert parse(BASE, Path("pipeline.toml")).docker_cli_problems() == []


def test_validate_reports_a_docker_cli_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pipeline validate` with `docker_cli = "/nonexistent/docker"` exits 2 naming file:line
    and key, instead of passing and building with another CLI."""
    (tmp_path / "pipeline.toml").write_text(
        '[pipeline]\ndata_dir = "data"\ndocker_cli = "/nonexistent/docker"\n' + BASE
    )
    assert _validate_problems(tmp_path, monkeypatch) == [
        "pipeline.toml:3: pipeline.docker_cli: /nonexistent/docker does not exist",
        "1 problem(s) found.",
    ]


def _validate_problems(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What `pipeline validate -c pipeline.toml` run in `folder` prints on stderr (exit 2)."""
    monkeypatch.chdir(folder)
    try:
        res = CliRunner().invoke(app, ["validate", "-c", "pipeline.toml"])
    finally:
        logs.configure()  # the command logged to the runner's stream, closed now
    assert res.exit_code == 2, res.stdout + res.stderr
    return res.stderr.splitlines()


PROXIED = (
    BASE.replace('ports = ["8080:8080"]', "")
    + """
[services.web.health]
http = "/health"

[services.web.proxy]
hosts = ["shop.example.com"]
port = 8080
drain = "5s"
"""
)


def test_a_proxied_service_with_the_proxy_table_validates() -> None:
    """`[proxy]` and `[services.NAME.proxy]` load with their defaults, and the proxied service's
    http check on a path needs no published port."""
    loaded = parse('[proxy]\nimage = "reg/caddy:2"\n' + PROXIED, Path("pipeline.toml"))
    proxy, route = loaded.model.proxy, loaded.model.services["web"].proxy
    assert proxy is not None and route is not None
    assert (proxy.http_port, proxy.https_port, proxy.network) == (80, 443, "pipeline")
    assert (route.hosts, route.path_prefix, route.port, route.drain, route.tls) == (
        ["shop.example.com"], "/", 8080, 5.0, "off")  # fmt: skip


ACME = PROXIED.replace('drain = "5s"', 'drain = "5s"\ntls = "acme"')


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('acme_ca = "http://ca.example/dir"', "proxy.acme_ca: 'http://ca.example/dir' is not an "
         "https:// URL (an ACME directory, e.g. 'https://acme-v02.api.letsencrypt.org/directory')"),
        ('acme_ca = "https://"', "proxy.acme_ca: 'https://' is not an https:// URL"),
        ('acme_ca = "https://ca.example/a dir"', "is not an https:// URL"),
        ('acme_email = "ops"', "proxy.acme_email: 'ops' is not an email address (NAME@DOMAIN)"),
        ("acme_ca_root = 3", "proxy.acme_ca_root: expected str, got int 3"),
    ],
)  # fmt: skip
def test_bad_acme_settings_are_refused_at_their_line(line: str, says: str) -> None:
    """A `[proxy] acme_ca` that is not an https:// URL, an `acme_email` that is not an address
    and a non-string `acme_ca_root` are refused with file:line and key."""
    found = problems(f"[proxy]\n{line}\n" + ACME)
    assert len(found) == 1 and found[0].startswith("pipeline.toml:2: "), found
    assert says in found[0], found


def test_the_acme_ca_root_must_be_a_readable_pem_once_a_service_uses_acme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`acme_ca_root` is read relative to the config file once a service has tls = "acme": a
    missing file or one without a PEM certificate is a problem naming file:line and key (and
    `pipeline validate` exits 2 with it); with no acme service it is not read at all."""
    settings = '[proxy]\nacme_ca = "https://ca.example/dir"\nacme_ca_root = "root.pem"\n'
    config = tmp_path / "pipeline.toml"
    config.write_text(settings + ACME)
    missing = "pipeline.toml:3: proxy.acme_ca_root: cannot read root.pem: No such file or directory"
    assert load(config).acme_problems() == [f"{tmp_path}/{missing}"]
    (tmp_path / "root.pem").write_text("not a certificate\n")
    assert load(config).acme_problems() == [
        f"{config}:3: proxy.acme_ca_root: root.pem holds no PEM certificate"
    ]
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    (tmp_path / "root.pem").write_text(pem)
    assert load(config).acme_ca_root_pem() == pem.encode()
    (tmp_path / "root.pem").unlink()
    config.write_text(settings + PROXIED)  # tls = "off": the root is never needed
    assert load(config).acme_problems() == []
    assert load(config).acme_ca_root_pem() is None
    config.write_text(settings + ACME)
    assert _validate_problems(tmp_path, monkeypatch) == [missing, "1 problem(s) found."]


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        ("", "services.web.proxy", "needs a [proxy] table"),
        ('[proxy]\n\n[services.api]\nimage = "web"\nhosts = ["web-1"]\n\n[services.api.proxy]\n'
         'hosts = ["shop.example.com"]\nport = 8080\n',
         "services.api.proxy.hosts.0", "already routed to service 'web'"),
        ('[proxy]\nhttp_port = 8000\n\n[services.api]\nimage = "web"\nhosts = ["web-1"]\n'
         'ports = ["8000:8080"]\n', "services.api.ports.0", "the proxy's http_port"),
        ('[proxy]\n\n[services.web.proxy2]\n', "services.web.proxy2", "unknown key"),
    ],
)  # fmt: skip
def test_proxy_conflicts_are_reported_with_line_and_key(extra: str, key: str, says: str) -> None:
    """Two services claiming one host name and path, a service publishing the proxy's port, a
    proxied service without `[proxy]`: each reported at its file:line and key."""
    text = PROXIED + "\n" + extra
    found = [p for p in problems(text) if f": {key}: " in p]
    assert found and says in found[0], problems(text)
    line = int(found[0].split(":")[1])
    assert line > 1 and text.splitlines()[line - 1].strip()


def test_a_proxied_service_cannot_publish_a_fixed_port() -> None:
    """A proxied service runs old and new side by side, so a fixed host port is refused."""
    fixed = 'image = "web"\nports = ["9000:8080"]\n'
    text = "[proxy]\n" + PROXIED.replace('image = "web"\n', fixed)
    assert any("services.web.ports.0: a proxied service starts beside" in p
               for p in problems(text))  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("postgresql://pipeline:hunter2-pw@db/pipeline", "a password in the database URL"),
        ("mysql://pipeline@db/pipeline", "invalid database URL"),
    ],
)
def test_a_database_url_with_a_password_or_an_unknown_scheme_is_refused(
    value: str, expected: str
) -> None:
    """`[pipeline] database` refuses an inline password (it belongs in database_password_env
    or _file) and schemes other than PostgreSQL and SQLite, naming file:line and key, and the
    message never repeats the password."""
    text = f'[pipeline]\ndatabase = "{value}"\n'
    with pytest.raises(ConfigError) as err:
        parse(text, Path("pipeline.toml"))
    assert f"pipeline.toml:2: pipeline.database: {expected}" in str(err.value)
    assert "hunter2-pw" not in str(err.value)


def test_a_postgresql_database_with_its_password_variable_is_accepted() -> None:
    """`database = "postgresql://USER@HOST/DB"` with `database_password_env` is valid config."""
    loaded = parse(
        '[pipeline]\ndatabase = "postgresql://pipeline@db.example.com/pipeline"\n'
        'database_password_env = "PIPELINE_DB_PASSWORD"\n',
        Path("pipeline.toml"),
    )
    assert loaded.model.pipeline.database_password_env == "PIPELINE_DB_PASSWORD"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            '[pipeline]\nbuild_concurrency = "2"\n',
            "pipeline.toml:2: pipeline.build_concurrency: expected int, got str '2'",
        ),
        (
            "[pipeline]\nkeep_revisions = 0\n",
            "pipeline.toml:2: pipeline.keep_revisions: must be greater than or equal to 1 (got 0)",
        ),
        (
            '[server]\ndashboard = "closed"\n',
            "pipeline.toml:2: server.dashboard: must be 'login' or 'open' (got 'closed')",
        ),
        (
            "[server]\napi_token_env = 12345\n",
            "pipeline.toml:2: server.api_token_env: expected str, got int",
        ),
        (
            "[registry]\ninsecure = true\n",
            "pipeline.toml:1: registry.address: missing required key",
        ),
        (
            '[registry]\naddress = "r:5000"\npassword = "hunter2"\n',
            "pipeline.toml:3: registry.password: unknown key 'password': secrets are never "
            "inline; use password_env (or password_file)",
        ),
        (
            "[pipeline]\ndata_dir = 5\n",
            "pipeline.toml:2: pipeline.data_dir: expected str, got int 5",
        ),
        (
            "[proxy]\nhttp_port = 8080\nhttps_port = 8080\n",
            "pipeline.toml:1: proxy: http_port and https_port must differ",
        ),
        (
            '[images.api]\nrepo = "shop"\ncache_from = 3\n',
            "pipeline.toml:3: images.api.cache_from: expected str or list, got int 3",
        ),
    ],
)
def test_each_kind_of_problem_reads_plainly(extra: str, expected: str) -> None:
    """A wrong type, a number out of range, a value not among the choices, a missing key, an
    inline secret and a table's own check each read as one located sentence, quoting the value
    except under a key that may hold a secret."""
    assert problems(extra + BASE) == [expected]


def test_one_problem_per_bad_entry_and_every_reference_in_one_run() -> None:
    """Two bad keys in one service give its first; a bad key in another service, an unknown
    host, a wrongly typed health key and a placeholder are each reported too, in one run."""
    text = BASE.replace('ports = ["8080:8080"]', 'ports = ["8080:8080"]\ncpus = "1"\nmemory = "x"')
    text += '\n[services.api]\nimage = "web"\nhosts = ["web-9"]\nrestart = "sometimes"\n'
    text += '\n[services.db]\nimage = "web"\nhosts = ["web-1"]\n'
    text += '\n[services.db.health]\ntcp = "5432"\n'
    text += '\n[repos.other]\nurl = "https://git.example.com/FILL-IN.git"\n'
    found = problems(text)
    keys = [p.split(": ")[1] for p in found]
    assert keys == [
        "services.web.cpus",
        "services.api.hosts.0",
        "services.api.restart",
        "services.db.health.tcp",
        "repos.other.url",
    ], found
    assert "expected int, got str '5432'" in found[3]


def test_a_missing_config_file_says_how_to_name_one(tmp_path: Path) -> None:
    """A config file that does not exist is reported with the ways to name one (-c FILE,
    $PIPELINE_CONFIG) and `pipeline init`, not only the OS's words."""
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "pipeline.toml")
    assert err.value.problems == [
        f"{tmp_path / 'pipeline.toml'}: no such file (name the config with -c FILE or "
        "$PIPELINE_CONFIG; `pipeline init` writes one)"
    ]
