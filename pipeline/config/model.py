"""The shape of `pipeline.toml`: one msgspec Struct per table; key names are a user contract.

Tables are frozen, strict (no coercion: "2" is not an int) and refuse unknown keys. A value with
a rule of its own (a duration, a port mapping, a path) has a type of its own
(`pipeline.config.values`), checked and converted as msgspec decodes it, so a bad one is
reported at its key; a table's cross checks are its `__post_init__`, reported at the table.
Decode with `decode` and dump with `to_data`: both need the hooks of those types."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from pipeline.config.values import (
    Address,
    Cron,
    DatabaseUrl,
    DockerUrl,
    Email,
    EnvName,
    Hostname,
    HttpsUrl,
    Memory,
    NetworkName,
    PasswordHash,
    PathPrefix,
    PortSpec,
    RelPath,
    RepoName,
    RepoUrl,
    Restart,
    Seconds,
    SecretSources,
    SpecList,
    Volume,
    decode_hook,
    encode_hook,
    parse_port,
)
from pipeline.config.values import PortMapping as PortMapping
from pipeline.config.values import parse_duration as parse_duration

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DEFAULT_MONITOR = 5.0  # seconds a new container is watched after its check first passes
DEFAULT_LISTEN = "127.0.0.1:8700"

Positive = Annotated[int, msgspec.Meta(ge=1)]
PortNumber = Annotated[int, msgspec.Meta(ge=1, le=65535)]

T = TypeVar("T")


def decode(kind: type[T], data: Any) -> T:
    """`data` (a TOML table, or JSON a `to_data` wrote) as a `kind` table, checked as the config
    file is. Raises msgspec.ValidationError at the first problem, its message ending in the key
    path ("... - at `$.health.timeout`"); the message may quote the value."""
    return msgspec.convert(data, kind, strict=True, dec_hook=decode_hook)


def to_data(table: msgspec.Struct) -> dict[str, Any]:
    """A table as JSON-ready builtins, every key present (defaults too); `decode` reads it back."""
    data: dict[str, Any] = msgspec.to_builtins(table, enc_hook=encode_hook)
    return data


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class PipelineSection(_Table, frozen=True):
    data_dir: str = ".pipeline"
    build_host: str | None = None  # a [hosts.*] name; None = the local engine
    build_concurrency: Positive = 2
    keep_revisions: Positive = 3  # images kept per service on each host
    # The docker CLI BuildKit builds run through; tried first, then `docker` on PATH, then
    # /usr/bin/docker (pipeline.build.buildkit.cli_candidates).
    docker_cli: str | None = None
    # The state database as an SQLAlchemy URL without its password (postgresql://USER@HOST/DB);
    # None: SQLite in data_dir. Several `pipeline serve` instances share a PostgreSQL one.
    database: DatabaseUrl | None = None
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


class ServerSection(_Table, frozen=True):
    listen: Address = Address(DEFAULT_LISTEN)
    api_token_env: EnvName | None = None
    max_body: Annotated[int, msgspec.Meta(ge=1024)] = 5 * 1024 * 1024  # bytes
    # None: required when `listen` reaches beyond loopback (see `reads_need_token`)
    read_token_required: bool | None = None
    # The dashboard's read pages: "open" (no login, only while reads need no token, see
    # `dashboard_open`) or "login"; its actions always need the login.
    dashboard: Literal["login", "open"] = "open"
    # A password the dashboard's login takes besides the API token: werkzeug's scrypt format,
    # "scrypt:N:r:p$SALT$HEX" (`pipeline dashboard-password` prints one).
    password_hash: PasswordHash | None = None
    # How long an event waits for the commit it names to show on the remote (replication lag).
    announced_commit_timeout: Seconds = Seconds(300.0)

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


class RegistrySection(_Table, frozen=True):
    address: Address
    insecure: bool = False
    username: str | None = None
    password_env: EnvName | None = None
    password_file: str | None = None


class HostSection(_Table, frozen=True):
    docker: DockerUrl
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


class ClusterSection(HostSection, frozen=True):
    """`[clusters.NAME]`: a Docker Swarm reached through one of its managers (`docker`, with the
    connection forms and TLS keys of `[hosts.*]`); `address` is where published ports are
    reached when a node's own address is not known."""


class RepoSection(_Table, frozen=True):
    url: RepoUrl
    branch: str | None = None
    tags: str | None = None  # a glob of release tags, e.g. "v*"
    poll: Seconds | None = None
    webhook_secret_env: EnvName | None = None
    submodules: bool = True  # fetch submodules into build contexts (false: empty folders)
    # The repository webhook deliveries name ("owner/name"), when `url` cannot be compared with
    # their clone URLs (a mirror, an ssh host alias, a local path).
    webhook_repository: RepoName | None = None

    def __post_init__(self) -> None:
        if self.branch and self.tags:
            raise ValueError("give either 'branch' or 'tags', not both")

    @property
    def follows(self) -> str:
        """The branch followed ('main' when neither branch nor tags is set) or the tag glob."""
        return self.tags if self.tags else (self.branch or "main")


class ImageSection(_Table, frozen=True):
    repo: str
    context: RelPath = RelPath(".")
    dockerfile: RelPath | None = None  # relative to the repository root
    watch: list[str] = msgspec.field(default_factory=list)
    rebuild: Cron | None = None
    build_args: dict[str, str] = msgspec.field(default_factory=dict)
    build_host: str | None = None
    # "auto": BuildKit through the docker CLI when one carries it, else the SDK's legacy builder.
    builder: Literal["auto", "buildkit", "legacy"] = "auto"
    target: str | None = None  # the Dockerfile stage to build (`--target`)
    # ID_env = "VAR" / ID_file = "/path": handed to BuildKit as `--secret id=ID,...`.
    secrets: SecretSources = msgspec.field(default_factory=SecretSources)
    cache_from: SpecList = msgspec.field(default_factory=SpecList)
    cache_to: SpecList = msgspec.field(default_factory=SpecList)

    @property
    def dockerfile_path(self) -> str:
        """The Dockerfile's repository path (default `<context>/Dockerfile`)."""
        if self.dockerfile:
            return self.dockerfile
        return "Dockerfile" if self.context == "." else f"{self.context}/Dockerfile"


class HealthSection(_Table, frozen=True):
    http: str | None = None  # a path on the host's published port, or a full http(s) URL
    tcp: PortNumber | None = None
    cmd: list[str] | None = None
    docker: bool = False
    port: PortNumber | None = None  # container port for http checks
    expect_status: list[int] = msgspec.field(default_factory=list)  # default: any 2xx or 3xx
    interval: Seconds = Seconds(1.0)
    timeout: Seconds = Seconds(30.0)
    healthy_threshold: Positive = 1
    # After the check first passes, the container must keep running (restart count unchanged)
    # and passing for this long (Swarm's update_config.monitor); "0" turns the window off.
    monitor: Seconds = Seconds(DEFAULT_MONITOR)

    def __post_init__(self) -> None:
        kinds = [k for k in ("http", "tcp", "cmd") if getattr(self, k) is not None]
        kinds += ["docker"] if self.docker else []
        if len(kinds) > 1:
            raise ValueError(f"give one check, not {' and '.join(kinds)}")
        if self.http is not None and not (
            self.http.startswith("/") or re.match(r"^https?://", self.http)
        ):
            raise ValueError(f"http check {self.http!r} must be a path ('/health') or a URL")


class ProxySection(_Table, frozen=True):
    """`[proxy]`: the reverse proxy pipeline runs as container `pipeline-proxy` on every host of
    a proxied service (an image that behaves like the official `caddy:2`: /usr/bin/caddy)."""

    image: str = "caddy:2"
    http_port: PortNumber = 80  # host port of plain HTTP
    https_port: PortNumber = 443  # host port of HTTPS (tls services)
    network: NetworkName = NetworkName("pipeline")
    # For `tls = "acme"` routes only: the ACME directory (None: Caddy's default issuers, Let's
    # Encrypt's production directory first), a PEM file on this machine with the root the
    # directory's own HTTPS chains to (relative to the config file; uploaded into the proxy),
    # and the ACME account's contact email.
    acme_ca: HttpsUrl | None = None
    acme_ca_root: str | None = None
    acme_email: Email | None = None

    def __post_init__(self) -> None:
        if self.http_port == self.https_port:
            raise ValueError("http_port and https_port must differ")


class ServiceProxySection(_Table, frozen=True):
    """`[services.NAME.proxy]`: the requests the host's proxy sends to this service."""

    hosts: Annotated[list[Hostname], msgspec.Meta(min_length=1)]
    port: PortNumber  # the container port requests go to
    path_prefix: PathPrefix = PathPrefix("/")
    drain: Seconds = Seconds(30.0)  # seconds in-flight requests get before the old one stops
    tls: Literal["acme", "internal", "off"] = "off"
    # What the previous container becomes once drained, kept for a rollback: "paused" (frozen,
    # memory kept: a rollback resumes it in milliseconds) or "stopped" (SIGTERM, memory freed:
    # a rollback starts it again, which takes the engine about half a second more).
    retain: Literal["paused", "stopped"] = "paused"


class ServiceSection(_Table, frozen=True):
    image: str
    # Where it runs: `hosts` (one container each) or `cluster` (a Swarm service); never both,
    # which `pipeline.config.load` reports at the key.
    hosts: list[str] = msgspec.field(default_factory=list)
    cluster: str | None = None
    # A cluster service's tasks (Swarm default 1)
    replicas: Annotated[int, msgspec.Meta(ge=0)] | None = None
    networks: list[NetworkName] = msgspec.field(default_factory=list)
    placement: list[str] = msgspec.field(default_factory=list)  # Swarm placement constraints
    endpoint_mode: Literal["vip", "dnsrr"] | None = None  # Swarm's; None: Swarm's default (vip)
    ports: list[PortSpec] = msgspec.field(default_factory=list)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    env_file: str | None = None
    command: list[str] | None = None
    volumes: list[Volume] = msgspec.field(default_factory=list)
    cpus: Annotated[float, msgspec.Meta(gt=0)] | None = None
    memory: Memory | None = None
    network: str = "bridge"
    restart: Restart = Restart("unless-stopped")
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    strategy: Literal["stop-first", "start-first"] = "stop-first"
    stop_timeout: Seconds = Seconds(10.0)  # SIGTERM, then SIGKILL after this long (docker stop -t)
    max_parallel: Positive = 1
    health: HealthSection = msgspec.field(default_factory=HealthSection)
    proxy: ServiceProxySection | None = None  # routed through the host's proxy (zero downtime)

    @property
    def targets(self) -> list[str]:
        """Where it runs, as messages and records name it: its hosts, or its cluster's name."""
        return [self.cluster] if self.cluster else list(self.hosts)

    def __post_init__(self) -> None:
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


class Config(_Table, frozen=True):
    pipeline: PipelineSection = msgspec.field(default_factory=PipelineSection)
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    registry: RegistrySection | None = None
    proxy: ProxySection | None = None
    hosts: dict[str, HostSection] = msgspec.field(default_factory=dict)
    repos: dict[str, RepoSection] = msgspec.field(default_factory=dict)
    images: dict[str, ImageSection] = msgspec.field(default_factory=dict)
    clusters: dict[str, ClusterSection] = msgspec.field(default_factory=dict)
    services: dict[str, ServiceSection] = msgspec.field(default_factory=dict)
