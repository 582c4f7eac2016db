"""The shape of `pipeline.toml`: one pydantic model per table; key names are a user contract."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from pipeline.config.cron import parse_cron

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?[bkmgBKMG]?$")
_RESTART_RE = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
_SECRET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$")
# A Host header a proxy route matches: a DNS name, optionally with one leading "*." wildcard.
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")
DEFAULT_MONITOR = 5.0  # seconds a new container is watched after its check first passes


def parse_duration(value: object) -> float:
    """Seconds from "500ms", "30s", "2m", "1h30m", "1d", "0" or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {value!r} (use e.g. '500ms', '30s', '2m', '1h')")
    return total


def _cron(value: str) -> str:
    parse_cron(value)
    return value


def _relative_path(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or value.startswith("~"):
        raise ValueError(f"path {value!r} must be relative to the repository root")
    if ".." in path.parts:
        raise ValueError(f"path {value!r} leaves the repository ('..')")
    return str(path)


def _repo_url(value: str) -> str:
    lowered = value.lower()
    if value.startswith("-"):
        raise ValueError(f"repository URL {value!r} looks like a command-line option")
    if "::" in value.split("/", 1)[0] or lowered.startswith("ext:"):
        raise ValueError(f"repository URL {value!r} uses a transport helper; refused")
    if re.match(r"^(https|ssh|git|file)://[^\s]+$", value):
        return value
    if value.startswith("/"):
        return value  # a local path: followed like file://, and its refs can be watched
    if re.match(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s]+$", value):
        return value  # scp-like ssh: git@host:org/repo.git
    raise ValueError(
        f"repository URL {value!r} is not https://, ssh://, git://, file://, user@host:path "
        "or an absolute path"
    )


def _repository_full_name(value: str) -> str:
    if not re.fullmatch(r"[^\s/:@]+(/[^\s/:@]+)+", value):
        raise ValueError(
            f"repository name {value!r} is not 'owner/name' (the full name or path with "
            "namespace webhook deliveries give, e.g. 'acme/shop' or 'group/sub/shop')"
        )
    return value


@dataclass(frozen=True)
class PortMapping:
    """One entry of `[services.*] ports`: the container port and protocol, the host port (None:
    Docker picks a free one) and the host IP it is published on (None: every address)."""

    container_port: int
    protocol: str  # "tcp" or "udp"
    host_port: int | None
    host_ip: str | None

    @property
    def key(self) -> str:
        """Docker's name of the container port, e.g. "8080/tcp"."""
        return f"{self.container_port}/{self.protocol}"


def parse_port(text: str) -> PortMapping:
    """Parse a `[[IP:]HOST:]CONTAINER[/tcp|/udp]` mapping: "8080", "18080:8080",
    "127.0.0.1:80:8080/udp", "1.2.3.4::80". Ports are 1-65535, the IP an IPv4 address.

    Raises ValueError naming the text (pydantic reports it at the config key)."""
    spec, _, proto = text.partition("/")
    parts = spec.split(":")
    ip, host, container = ([""] * (3 - len(parts)) + parts)[-3:]
    if (
        proto not in ("", "tcp", "udp")
        or len(parts) > 3
        or not container
        or (ip and not re.fullmatch(r"[0-9.]+", ip))
        or any(p and not (p.isdigit() and 0 < int(p) <= 65535) for p in (host, container))
    ):
        raise ValueError(f"invalid port mapping {text!r} (use '[IP:]HOST:CONTAINER[/udp]')")
    return PortMapping(int(container), proto or "tcp", int(host) if host else None, ip or None)


def _port(value: str) -> str:
    parse_port(value)
    return value


def _memory(value: str) -> str:
    if not _MEMORY_RE.match(value):
        raise ValueError(f"invalid memory {value!r} (use e.g. '256m', '1g')")
    return value


def _restart(value: str) -> str:
    if not _RESTART_RE.match(value):
        raise ValueError(
            f"invalid restart policy {value!r} (no, always, unless-stopped, on-failure[:N])"
        )
    return value


def _volume(value: str) -> str:
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
        raise ValueError(f"invalid volume {value!r} (use 'NAME:/path[:ro]' or '/host:/path[:ro]')")
    if len(parts) == 3 and parts[2] not in ("ro", "rw"):
        raise ValueError(f"invalid volume mode {parts[2]!r} in {value!r} (ro or rw)")
    return value


def _address(value: str) -> str:
    if not _ADDRESS_RE.match(value):
        raise ValueError(f"invalid address {value!r} (use HOST or HOST:PORT)")
    return value


_PASSWORD_HASH_RE = re.compile(r"^scrypt:\d{1,9}:\d{1,3}:\d{1,3}\$[^$]{1,128}\$[0-9a-f]{16,256}$")


def _password_hash(value: str) -> str:
    # The value is not echoed: a hash is still worth keeping out of logs and errors.
    if not _PASSWORD_HASH_RE.match(value):
        raise ValueError("not a password hash of the form 'scrypt:N:r:p$SALT$HEX'")
    return value


def _docker_url(value: str) -> str:
    if not re.match(r"^(unix:///[^\s]+|tcp://[A-Za-z0-9.-]+:\d{1,5}|ssh://[^\s/]+)$", value):
        raise ValueError(
            f"invalid docker endpoint {value!r} (unix:///path, tcp://host:port or ssh://user@host)"
        )
    return value


def _network_name(value: str) -> str:
    if value in ("bridge", "host", "none") or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", value):
        raise ValueError(f"invalid network {value!r} (a named Docker network, not {value!r})")
    return value


def _secret_sources(value: dict[str, str]) -> dict[str, str]:
    for key, source in value.items():
        stem, _, kind = key.rpartition("_")
        if kind not in ("env", "file") or not _SECRET_ID_RE.match(stem):
            raise ValueError(
                f"secret {key!r}: name it ID_env (an environment variable) or ID_file (a file), "
                'e.g. npm_token_env = "NPM_TOKEN"'
            )
        if kind == "env":
            _env_name(source)
        elif not source:
            raise ValueError(f"secret {key!r}: empty file path")
    return value


def _database_url(value: str) -> str:
    """A `[pipeline] database` URL: postgresql:// (or sqlite:///PATH); a password in it is
    refused (it would sit in the config file: use database_password_env/_file)."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "sqlite"):
        raise ValueError("invalid database URL (a postgresql:// or sqlite:/// URL)")
    userinfo = rest.partition("/")[0].rpartition("@")[0]
    if ":" in userinfo:
        raise ValueError(
            "a password in the database URL: give it by database_password_env or "
            "database_password_file instead"
        )
    return value


def _spec_list(value: object) -> object:
    """A cache spec given as one string or a list of them, as a list."""
    return [value] if isinstance(value, str) else value


def _env_name(value: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
        raise ValueError(f"invalid environment variable name {value!r}")
    return value


def _hostname(value: str) -> str:
    if not _HOSTNAME_RE.match(value):
        raise ValueError(f"invalid host name {value!r} (a DNS name like 'shop.example.com')")
    return value


def _path_prefix(value: str) -> str:
    if not value.startswith("/") or any(c in value for c in " *?#"):
        raise ValueError(f"invalid path_prefix {value!r} (a path starting with '/', no wildcards)")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Cron = Annotated[str, AfterValidator(_cron)]
RelPath = Annotated[str, AfterValidator(_relative_path)]
EnvName = Annotated[str, AfterValidator(_env_name)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PipelineSection(_Table):
    data_dir: str = ".pipeline"
    build_host: str | None = None  # a [hosts.*] name; None = the local engine
    build_concurrency: int = Field(default=2, ge=1)
    keep_revisions: int = Field(default=3, ge=1)  # images kept per service on each host
    # The docker CLI BuildKit builds run through; tried first, then `docker` on PATH, then
    # /usr/bin/docker (pipeline.build.buildkit.cli_candidates).
    docker_cli: str | None = None
    # The state database as an SQLAlchemy URL without its password (postgresql://USER@HOST/DB);
    # None: SQLite in data_dir. Several `pipeline serve` instances share a PostgreSQL one.
    database: Annotated[str, AfterValidator(_database_url)] | None = None
    database_password_env: EnvName | None = None
    database_password_file: str | None = None


def listen_host(listen: str) -> str:
    """The host part of a `[server] listen` value: "HOST", "HOST:PORT", "[V6]:PORT" or a bare
    IPv6 address ("::1") give "HOST" / "V6"."""
    if listen.startswith("["):
        return listen[1:].partition("]")[0]
    if listen.count(":") > 1:
        return listen  # a bare IPv6 address, no port
    return listen.rpartition(":")[0] if ":" in listen else listen


def listens_beyond_loopback(listen: str) -> bool:
    """Whether a server bound to `listen` can be reached from other machines: False for
    loopback only (127.0.0.0/8, ::1 and IPv4-mapped loopback, `localhost`), True for everything
    else: 0.0.0.0, ::, any other address, and any other host name (it may resolve anywhere).

    Loopback as RFC 5735 (127.0.0.0/8) and RFC 4291 (::1) define it, as `ipaddress` reads them.
    """
    host = listen_host(listen).strip().lower().rstrip(".")
    if host == "localhost":
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_loopback


class ServerSection(_Table):
    listen: Annotated[str, AfterValidator(_address)] = "127.0.0.1:8700"
    api_token_env: EnvName | None = None
    max_body: int = Field(default=5 * 1024 * 1024, ge=1024)  # bytes
    # None: required when `listen` reaches beyond loopback (see `reads_need_token`)
    read_token_required: bool | None = None
    # The dashboard's read pages: "open" (no login, only while reads need no token, see
    # `dashboard_open`) or "login"; its actions always need the login.
    dashboard: Literal["login", "open"] = "open"
    # A password the dashboard's login takes besides the API token: werkzeug's scrypt format,
    # "scrypt:N:r:p$SALT$HEX" (`pipeline dashboard-password` prints one).
    password_hash: Annotated[str, AfterValidator(_password_hash)] | None = None

    def reads_need_token(self, bound: str | None = None) -> bool:
        """Whether `GET /api/*` needs the API token: `read_token_required` when set, else
        whether the server listens beyond loopback, on `bound` (the address it was started on,
        which a reload of `listen` does not change) or else on `listen`."""
        if self.read_token_required is not None:
            return self.read_token_required
        return listens_beyond_loopback(bound or self.listen)

    def dashboard_open(self, bound: str | None = None) -> bool:
        """Whether the dashboard's read pages are shown without a login: `dashboard = "open"`
        and the API's reads need no token (loopback, see `reads_need_token`)."""
        return self.dashboard == "open" and not self.reads_need_token(bound)

    # How long an event waits for the commit it names to show on the remote (replication lag).
    announced_commit_timeout: Duration = 300.0


class RegistrySection(_Table):
    address: Annotated[str, AfterValidator(_address)]
    insecure: bool = False
    username: str | None = None
    password_env: EnvName | None = None
    password_file: str | None = None


class HostSection(_Table):
    docker: Annotated[str, AfterValidator(_docker_url)]
    address: str | None = None  # where published ports are reached; defaults to the URL's host
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def reach_address(self) -> str:
        """Address health checks use for this host's published ports."""
        if self.address:
            return self.address
        rest = self.docker.split("://", 1)[1]
        if self.docker.startswith("unix://"):
            return "127.0.0.1"
        return rest.split("@")[-1].split(":")[0].split("/")[0]


class ClusterSection(HostSection):
    """`[clusters.NAME]`: a Docker Swarm reached through one of its managers (`docker`, with the
    connection forms and TLS keys of `[hosts.*]`); `address` is where published ports are
    reached when a node's own address is not known."""


class RepoSection(_Table):
    url: Annotated[str, AfterValidator(_repo_url)]
    branch: str | None = None
    tags: str | None = None  # a glob of release tags, e.g. "v*"
    poll: Duration | None = None
    webhook_secret_env: EnvName | None = None
    submodules: bool = True  # fetch submodules into build contexts (false: empty folders)
    # The repository webhook deliveries name ("owner/name"), when `url` cannot be compared with
    # their clone URLs (a mirror, an ssh host alias, a local path).
    webhook_repository: Annotated[str, AfterValidator(_repository_full_name)] | None = None

    @model_validator(mode="after")
    def _one_ref(self) -> RepoSection:
        if self.branch and self.tags:
            raise ValueError("give either 'branch' or 'tags', not both")
        return self

    @property
    def follows(self) -> str:
        """The branch followed ('main' when neither branch nor tags is set) or the tag glob."""
        return self.tags if self.tags else (self.branch or "main")


class ImageSection(_Table):
    repo: str
    context: RelPath = "."
    dockerfile: RelPath | None = None  # relative to the repository root
    watch: list[str] = Field(default_factory=list)
    rebuild: Cron | None = None
    build_args: dict[str, str] = Field(default_factory=dict)
    build_host: str | None = None
    # "auto": BuildKit through the docker CLI when one carries it, else the SDK's legacy builder.
    builder: Literal["auto", "buildkit", "legacy"] = "auto"
    target: str | None = None  # the Dockerfile stage to build (`--target`)
    # ID_env = "VAR" / ID_file = "/path": handed to BuildKit as `--secret id=ID,...`.
    secrets: Annotated[dict[str, str], AfterValidator(_secret_sources)] = Field(
        default_factory=dict
    )
    cache_from: Annotated[list[str], BeforeValidator(_spec_list)] = Field(default_factory=list)
    cache_to: Annotated[list[str], BeforeValidator(_spec_list)] = Field(default_factory=list)

    @property
    def dockerfile_path(self) -> str:
        """The Dockerfile's repository path (default `<context>/Dockerfile`)."""
        if self.dockerfile:
            return self.dockerfile
        return "Dockerfile" if self.context == "." else f"{self.context}/Dockerfile"


class HealthSection(_Table):
    http: str | None = None  # a path on the host's published port, or a full http(s) URL
    tcp: int | None = Field(default=None, ge=1, le=65535)
    cmd: list[str] | None = None
    docker: bool = False
    port: int | None = Field(default=None, ge=1, le=65535)  # container port for http checks
    expect_status: list[int] = Field(default_factory=list)  # default: any 2xx or 3xx
    interval: Duration = 1.0
    timeout: Duration = 30.0
    healthy_threshold: int = Field(default=1, ge=1)
    # After the check first passes, the container must keep running (restart count unchanged)
    # and passing for this long (Swarm's update_config.monitor); "0" turns the window off.
    monitor: Duration = DEFAULT_MONITOR

    @model_validator(mode="after")
    def _one_check(self) -> HealthSection:
        kinds = [k for k in ("http", "tcp", "cmd") if getattr(self, k) is not None]
        kinds += ["docker"] if self.docker else []
        if len(kinds) > 1:
            raise ValueError(f"give one check, not {' and '.join(kinds)}")
        if self.http is not None and not (
            self.http.startswith("/") or re.match(r"^https?://", self.http)
        ):
            raise ValueError(f"http check {self.http!r} must be a path ('/health') or a URL")
        return self


class ProxySection(_Table):
    """`[proxy]`: the reverse proxy pipeline runs as container `pipeline-proxy` on every host of
    a proxied service (an image that behaves like the official `caddy:2`: /usr/bin/caddy)."""

    image: str = "caddy:2"
    http_port: int = Field(default=80, ge=1, le=65535)  # host port of plain HTTP
    https_port: int = Field(default=443, ge=1, le=65535)  # host port of HTTPS (tls services)
    network: Annotated[str, AfterValidator(_network_name)] = "pipeline"

    @model_validator(mode="after")
    def _distinct_ports(self) -> ProxySection:
        if self.http_port == self.https_port:
            raise ValueError("http_port and https_port must differ")
        return self


class ServiceProxySection(_Table):
    """`[services.NAME.proxy]`: the requests the host's proxy sends to this service."""

    hosts: list[Annotated[str, AfterValidator(_hostname)]] = Field(min_length=1)
    path_prefix: Annotated[str, AfterValidator(_path_prefix)] = "/"
    port: int = Field(ge=1, le=65535)  # the container port requests go to
    drain: Duration = 30.0  # seconds in-flight requests get before the old container stops
    tls: Literal["acme", "internal", "off"] = "off"


class ServiceSection(_Table):
    image: str
    # Where it runs: `hosts` (one container each) or `cluster` (a Swarm service); never both,
    # which `pipeline.config.load` reports at the key.
    hosts: list[str] = Field(default_factory=list)
    cluster: str | None = None
    replicas: int | None = Field(default=None, ge=0)  # a cluster service's tasks (Swarm default 1)
    networks: list[Annotated[str, AfterValidator(_network_name)]] = Field(default_factory=list)
    placement: list[str] = Field(default_factory=list)  # Swarm placement constraints
    endpoint_mode: Literal["vip", "dnsrr"] | None = None  # Swarm's; None: Swarm's default (vip)
    ports: list[Annotated[str, AfterValidator(_port)]] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    env_file: str | None = None
    command: list[str] | None = None
    volumes: list[Annotated[str, AfterValidator(_volume)]] = Field(default_factory=list)
    cpus: float | None = Field(default=None, gt=0)
    memory: Annotated[str, AfterValidator(_memory)] | None = None
    network: str = "bridge"
    restart: Annotated[str, AfterValidator(_restart)] = "unless-stopped"
    labels: dict[str, str] = Field(default_factory=dict)
    strategy: Literal["stop-first", "start-first"] = "stop-first"
    stop_timeout: Duration = 10.0  # SIGTERM, then SIGKILL after this long (as `docker stop -t`)
    max_parallel: int = Field(default=1, ge=1)
    health: HealthSection = Field(default_factory=HealthSection)
    proxy: ServiceProxySection | None = None  # routed through the host's proxy (zero downtime)

    @property
    def targets(self) -> list[str]:
        """Where it runs, as messages and records name it: its hosts, or its cluster's name."""
        return [self.cluster] if self.cluster else list(self.hosts)

    @model_validator(mode="after")
    def _ports_fit_strategy(self) -> ServiceSection:
        fixed = [p for p in self.ports if parse_port(p).host_port is not None]
        if self.proxy is not None and self.network == "host":
            raise ValueError(
                "a proxied service runs on the proxy's network; it cannot use network 'host'"
            )
        if self.strategy == "start-first" and (fixed or self.network == "host"):
            raise ValueError(
                "strategy 'start-first' runs old and new side by side, so it cannot publish a "
                "fixed host port or use network 'host'; use 'stop-first'"
            )
        return self


class Config(_Table):
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    server: ServerSection = Field(default_factory=ServerSection)
    registry: RegistrySection | None = None
    proxy: ProxySection | None = None
    hosts: dict[str, HostSection] = Field(default_factory=dict)
    repos: dict[str, RepoSection] = Field(default_factory=dict)
    images: dict[str, ImageSection] = Field(default_factory=dict)
    clusters: dict[str, ClusterSection] = Field(default_factory=dict)
    services: dict[str, ServiceSection] = Field(default_factory=dict)
