"""Loading `pipeline.toml`: its problems reported at once, each with file:line and key path.

Tables are decoded one by one (each `[services.NAME]`, `[hosts.NAME]`, ... entry on its own), and
msgspec stops at a table's first problem: one run reports the first problem of every bad table,
every reference to an undefined name and every placeholder left."""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from pipeline.config.envfile import EnvFile, EnvFileError, read_env_file
from pipeline.config.model import (
    DEFAULT_LISTEN,
    NAME_RE,
    ClusterSection,
    Config,
    HostSection,
    ImageSection,
    PipelineSection,
    ProxySection,
    RegistrySection,
    RepoSection,
    ServerSection,
    ServiceSection,
    decode,
    listens_beyond_loopback,
    parse_port,
)
from pipeline.errors import ConfigError
from pipeline.redact import register_secret

_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "pipeline": PipelineSection,
    "server": ServerSection,
    "registry": RegistrySection,
    "proxy": ProxySection,
}
_NAMED: dict[str, type[msgspec.Struct]] = {
    "hosts": HostSection,
    "clusters": ClusterSection,
    "repos": RepoSection,
    "images": ImageSection,
    "services": ServiceSection,
}
_INLINE_SECRETS = {"password", "token", "secret", "webhook_secret", "api_token"}
# A key whose wrongly typed value a message does not quote: it may be a secret.
_SECRETISH = ("password", "token", "secret")


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and where it came from; relative paths resolve against `base_dir`."""

    path: Path
    model: Config
    shown: str = ""  # the file's name in messages, as given (default: its file name)
    lines: _LineIndex | None = field(default=None, repr=False, compare=False)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def locate(self, *key: str) -> str:
        """`FILE:LINE` of the config key `key` (or of its nearest table) for messages."""
        line = self.lines.line_of(key) if self.lines is not None else 1
        return f"{self.shown or self.path.name}:{line}"

    def read_env_file(self, service: str) -> EnvFile | None:
        """The `env_file` of `service` (relative to the config's directory), read and checked,
        its values registered as secrets; None when it has none. Raises EnvFileError naming
        `FILE:LINE` and `services.NAME.env_file` (see `pipeline.config.envfile`)."""
        name = self.model.services[service].env_file
        if not name:
            return None
        shown = str(Path(self.shown or self.path.name).parent / name)
        key = f"services.{service}.env_file"
        where = self.locate("services", service, "env_file")
        return read_env_file(self.base_dir / name, shown, key, where)

    def env_file_problems(self) -> list[str]:
        """Every service's env_file problem (`FILE:LINE: services.NAME.env_file: ...`), in
        service order; [] when each one reads."""
        problems = []
        for service in self.model.services:
            try:
                self.read_env_file(service)
            except EnvFileError as exc:
                problems.extend(exc.problems)
        return problems

    def docker_cli_problems(self) -> list[str]:
        """`FILE:LINE: pipeline.docker_cli: PATH does not exist` (or is not a file, or is not
        executable) when `[pipeline] docker_cli` names a CLI that cannot run; [] when it can or
        is unset. The path is checked as builds run it (`pipeline.hosts.dockercli.probe`)."""
        cli = self.model.pipeline.docker_cli
        if cli is None:
            return []
        path = Path(cli)
        if not path.exists():
            why = "does not exist"
        elif not path.is_file():
            why = "is not a file"
        elif not os.access(path, os.X_OK):
            why = "is not executable"
        else:
            return []
        return [f"{self.locate('pipeline', 'docker_cli')}: pipeline.docker_cli: {cli} {why}"]

    @property
    def uses_acme(self) -> bool:
        """Whether some service has `tls = "acme"` (only then do `[proxy] acme_*` matter)."""
        services = self.model.services.values()
        return any(s.proxy is not None and s.proxy.tls == "acme" for s in services)

    def acme_ca_root_pem(self) -> bytes | None:
        """The content of `[proxy] acme_ca_root` (relative to the config's directory) when it is
        set and some service has `tls = "acme"`, else None. Raises ConfigError naming `FILE:LINE`
        and `proxy.acme_ca_root` when it cannot be read or holds no PEM certificate."""
        root = self.model.proxy.acme_ca_root if self.model.proxy is not None else None
        if root is None or not self.uses_acme:
            return None
        where = f"{self.locate('proxy', 'acme_ca_root')}: proxy.acme_ca_root"
        try:
            data = (self.base_dir / root).read_bytes()
        except OSError as exc:
            raise ConfigError([f"{where}: cannot read {root}: {exc.strerror or exc}"]) from None
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise ConfigError([f"{where}: {root} holds no PEM certificate"])
        return data

    def acme_problems(self) -> list[str]:
        """`FILE:LINE: proxy.acme_ca_root: ...` when the ACME root cannot be used (see
        `acme_ca_root_pem`); [] when it can, is unset, or no service has `tls = "acme"`."""
        try:
            self.acme_ca_root_pem()
        except ConfigError as exc:
            return exc.problems
        return []

    @property
    def data_dir(self) -> Path:
        return (self.base_dir / self.model.pipeline.data_dir).resolve()

    def services_of_image(self, image: str) -> list[str]:
        return [name for name, svc in self.model.services.items() if svc.image == image]

    def images_of_repo(self, repo: str) -> list[str]:
        return [name for name, img in self.model.images.items() if img.repo == repo]


def default_config_path() -> Path:
    """`$PIPELINE_CONFIG`, else `./pipeline.toml`."""
    return Path(os.environ.get("PIPELINE_CONFIG") or "pipeline.toml")


def load(path: Path) -> LoadedConfig:
    """Read and validate a config file; raise ConfigError listing the problems found (the
    first of each bad table, every cross-reference and placeholder)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [
                f"{path}: no such file (name the config with -c FILE or $PIPELINE_CONFIG; "
                "`pipeline init` writes one)"
            ]  # fmt: skip
        ) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return parse(text, path)


def parse(text: str, path: Path) -> LoadedConfig:
    """Validate config text; `path` names the file in messages and anchors relative paths.

    The services' env files that read are read too, only to register their values as secrets
    (so that every command, `history` included, masks them); a file's problem is left for
    `validate` and for the plan of its service to report."""
    name = path.name if path.parent == Path(".") else str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        where = f"{name}:{line.group(1)}" if line else name
        raise ConfigError([f"{where}: invalid TOML: {exc}"]) from None
    lines = _LineIndex(text)
    problems: list[tuple[tuple[str, ...], str]] = []
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            sections[key] = _validate(_SECTIONS[key], value, (key,), problems)
        elif key in _NAMED:
            sections[key] = _validate_named(key, value, problems)
        else:
            problems.append(((key,), _unknown_key_message(key)))
    # References are checked on the raw tables, so that they are reported alongside the
    # type errors of the same file instead of only after those are fixed.
    problems.extend(_cross_references(raw))
    problems.extend((key, PLACEHOLDER_MESSAGE) for key in _placeholders(raw, ()))
    if problems:
        located = sorted((lines.line_of(p), ".".join(p), m) for p, m in problems)
        raise ConfigError([f"{name}:{line}: {key}: {msg}" for line, key, msg in located])
    loaded = LoadedConfig(path=path.resolve(), model=Config(**sections), shown=name, lines=lines)
    for service in loaded.model.services:
        with contextlib.suppress(EnvFileError):
            loaded.read_env_file(service)  # registers the values it reads as secrets
    return loaded


# What `pipeline init` writes where only the user knows the value (a registry, a host).
PLACEHOLDER = "FILL-IN"
PLACEHOLDER_MESSAGE = f"{PLACEHOLDER} is a placeholder `pipeline init` wrote: fill it in"


def _placeholders(value: Any, key: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The keys whose string value still holds `PLACEHOLDER`, in tables and lists."""
    if isinstance(value, str):
        return [key] if PLACEHOLDER in value else []
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _placeholders(v, (*key, name))]
    if isinstance(value, list):
        return [k for item in value for k in _placeholders(item, key)]
    return []


def _validate_named(
    section: str, value: Any, problems: list[tuple[tuple[str, ...], str]]
) -> dict[str, Any]:
    if not isinstance(value, dict):
        problems.append(((section,), f"must be a table of named [{section}.NAME] entries"))
        return {}
    out: dict[str, Any] = {}
    for key, entry in value.items():
        if not NAME_RE.match(key):
            problems.append(
                ((section, key), f"invalid name {key!r}: use lowercase letters, digits, '-', '_'")
            )
            continue
        checked = _validate(_NAMED[section], entry, (section, key), problems)
        if checked is not None:
            out[key] = checked
    return out


def _validate(
    model: type[msgspec.Struct],
    value: Any,
    where: tuple[str, ...],
    problems: list[tuple[tuple[str, ...], str]],
) -> msgspec.Struct | None:
    """`value` decoded as `model`, or None with its problem added: msgspec stops at a table's
    first problem, so each table (each named entry) reports one."""
    try:
        return decode(model, value)
    except msgspec.ValidationError as exc:
        loc, msg = _problem(model, value, str(exc))
        problems.append((where + loc, msg))
        return None


# msgspec's messages (ValidationError): "WHAT - at `$.key.list[0]`"; "at" is absent at the top.
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")
_FIELD = re.compile(r"^Object (contains unknown|missing required) field `([^`]+)`$")
_TYPE = re.compile(r"^Expected `([^`]+)`, got `[^`]+`$")
_BOUND = re.compile(r"^Expected `[^`]+`( of length)? (>=|>|<=|<) ([0-9.]+)$")
_BOUND_WORDS = {
    ">=": "greater than or equal to",
    ">": "greater than",
    "<=": "less than or equal to",
    "<": "less than",
}
_TYPE_WORDS = {"array": "list", "object": "table", "null": "", "float": "number"}


def _problem(model: type[msgspec.Struct], value: Any, error: str) -> tuple[tuple[str, ...], str]:
    """The key path (within the table) and the user's message of a msgspec error."""
    at = _AT.match(error)
    assert at is not None  # the pattern matches any text
    msg = at.group("msg")
    loc: tuple[str, ...] = ()
    in_dict = False  # `[...]`: an entry of a table msgspec does not name; reported at the table
    for key, index in _STEP.findall(at.group("path") or ""):
        if not key and not index:
            in_dict = True
            break
        loc = (*loc, key or index)
    if field := _FIELD.match(msg):
        loc = (*loc, field.group(2))
        if field.group(1) == "contains unknown":
            return loc, _unknown_key_message(field.group(2))
        return loc, "missing required key"
    given, found = _raw_at(value, loc) if not in_dict else (None, False)
    # The value is quoted unless it may be a secret (by its key) or is a whole table or list.
    quoted = (
        found
        and not isinstance(given, dict | list)
        and not (loc and any(word in loc[-1] for word in _SECRETISH))
    )
    if typed := _TYPE.match(msg):
        expected = " or ".join(
            w for w in (_TYPE_WORDS.get(t, t) for t in typed.group(1).split(" | ")) if w
        )
        if in_dict:
            return loc, f"each value: expected {expected}"
        kind = {"dict": "table"}.get(type(given).__name__, type(given).__name__)
        return loc, f"expected {expected}, got {kind}" + (f" {given!r}" if quoted else "")
    got = f" (got {given!r})" if quoted else ""
    if bound := _BOUND.match(msg):
        of_length, op, limit = bound.groups()
        if of_length:
            return loc, f"must have at least {limit} item(s)"
        return loc, f"must be {_BOUND_WORDS[op]} {limit}{got}"
    if msg.startswith("Invalid enum value"):
        return loc, f"must be {' or '.join(map(repr, _choices(model, loc)))}{got}"
    return loc, msg  # a rule's own message (a ValueError of a value type or a table's check)


def _raw_at(value: Any, loc: tuple[str, ...]) -> tuple[Any, bool]:
    """The raw (TOML) value at `loc` in `value`, and whether there is one."""
    for part in loc:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None, False
    return value, True


def _choices(model: Any, loc: tuple[str, ...]) -> tuple[Any, ...]:
    """The values of the `Literal` field at `loc` of `model` (through nested tables)."""
    kind: Any = model
    for part in loc:
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            return ()
        kind = next((f.type for f in msgspec.structs.fields(kind) if f.name == part), None)
        while get_origin(kind) in (Union, types.UnionType):  # `X | None` of a table or a Literal
            kind = next(a for a in get_args(kind) if a is not type(None))
    return get_args(kind) if get_origin(kind) is Literal else ()


def _unknown_key_message(key: str) -> str:
    if key in _INLINE_SECRETS:
        return f"unknown key {key!r}: secrets are never inline; use {key}_env (or {key}_file)"
    return f"unknown key {key!r}"


def _cross_references(raw: dict[str, Any]) -> Iterable[tuple[tuple[str, ...], str]]:
    def table(key: str) -> dict[str, Any]:
        value = raw.get(key)
        return value if isinstance(value, dict) else {}

    def entries(key: str) -> Iterable[tuple[str, dict[str, Any]]]:
        return ((n, e) for n, e in table(key).items() if isinstance(e, dict))

    hosts, repos, images = table("hosts"), table("repos"), table("images")

    def ref(
        where: tuple[str, ...], value: Any, known: dict[str, Any], what: str
    ) -> Iterable[tuple[tuple[str, ...], str]]:
        if isinstance(value, str) and value not in known:
            yield (where, f"unknown {what} {value!r}")

    yield from ref(("pipeline", "build_host"), table("pipeline").get("build_host"), hosts, "host")
    yield from _read_token(table("server"))
    for name, image in entries("images"):
        yield from ref(("images", name, "repo"), image.get("repo"), repos, "repo")
        yield from ref(("images", name, "build_host"), image.get("build_host"), hosts, "host")
    for name, svc in entries("services"):
        yield from ref(("services", name, "image"), svc.get("image"), images, "image")
        yield from _placement_problems(name, svc, table("clusters"))
        if "cluster" in svc and "registry" not in raw:
            yield (
                ("services", name, "cluster"),
                "a cluster's nodes pull the image from a registry: add a [registry] table",
            )
        svc_hosts = svc.get("hosts")
        for i, host in enumerate(svc_hosts if isinstance(svc_hosts, list) else []):
            yield from ref(("services", name, "hosts", str(i)), host, hosts, "host")
        health = svc.get("health")
        http = health.get("http") if isinstance(health, dict) else None
        path_check = isinstance(http, str) and http.startswith("/")
        proxied = isinstance(svc.get("proxy"), dict)  # checked through the proxy: no port needed
        if (
            path_check
            and not proxied
            and not svc.get("ports")
            and svc.get("network", "bridge") != "host"
        ):
            yield (
                ("services", name, "health", "http"),
                "an http check on a path needs a published port ('ports') or network 'host'",
            )

    yield from _proxy_problems(raw, dict(entries("services")))


# Keys that only a cluster service (one with `cluster`) has: Swarm settings.
_CLUSTER_ONLY = ("replicas", "networks", "placement", "endpoint_mode")


def _placement_problems(
    name: str, svc: dict[str, Any], clusters: dict[str, Any]
) -> Iterable[tuple[tuple[str, ...], str]]:
    """A service runs on `hosts` or on a `cluster`, never both; Swarm's keys only on a cluster
    service; a cluster service's overlay networks in `networks`, not `network`, and no proxy
    (Swarm publishes its ports)."""
    where = ("services", name)
    has_hosts, cluster = "hosts" in svc, svc.get("cluster")
    if has_hosts and "cluster" in svc:
        yield (where + ("cluster",), "give either 'hosts' or 'cluster', not both")
    elif not has_hosts and "cluster" not in svc:
        yield (where, "give 'hosts' (names of [hosts.*]) or 'cluster' (a [clusters.*] name)")
    elif has_hosts and isinstance(svc.get("hosts"), list) and not svc["hosts"]:
        yield (where + ("hosts",), "name at least one host")
    if "cluster" not in svc:
        for key in _CLUSTER_ONLY:
            if key in svc:
                yield (
                    where + (key,),
                    f"'{key}' is a Swarm setting: only a service with 'cluster' has it "
                    "(a service on 'hosts' runs one container per host)",
                )
        return
    if isinstance(cluster, str) and cluster not in clusters:
        yield (where + ("cluster",), f"unknown cluster {cluster!r}")
    if "network" in svc:
        yield (
            where + ("network",),
            "a cluster service joins overlay networks: list them in 'networks'",
        )
    if "proxy" in svc:
        yield (where + ("proxy",), "a cluster service publishes its own ports; no proxy table")


def _proxy_problems(
    raw: dict[str, Any], services: dict[str, dict[str, Any]]
) -> Iterable[tuple[tuple[str, ...], str]]:
    """What the `[proxy]` and `[services.*.proxy]` tables must agree on: a `[proxy]` table once
    any service is proxied; each host name and path claimed by one service; no service on a
    proxy's host publishing the proxy's ports; a proxied service on the proxy's network."""
    proxied = {n: s for n, s in services.items() if isinstance(s.get("proxy"), dict)}
    if not proxied:
        return
    proxy = raw.get("proxy")
    if not isinstance(proxy, dict):
        for name in proxied:
            yield (("services", name, "proxy"), "a proxied service needs a [proxy] table")
        proxy = {}
    http_port, https_port = proxy.get("http_port", 80), proxy.get("https_port", 443)
    network = proxy.get("network", "pipeline")
    claimed: dict[tuple[str, str], str] = {}
    for name, svc in proxied.items():
        table = svc["proxy"]
        prefix = table.get("path_prefix", "/")
        names = table.get("hosts")
        for i, host in enumerate(names if isinstance(names, list) else []):
            key = (str(host).lower(), str(prefix).rstrip("/") or "/")
            if key in claimed:
                yield (
                    ("services", name, "proxy", "hosts", str(i)),
                    f"host {host!r} with path {prefix!r} is already routed to service "
                    f"{claimed[key]!r}",
                )
            else:
                claimed[key] = name
        if svc.get("network", "bridge") not in ("bridge", network):
            yield (
                ("services", name, "network"),
                f"a proxied service runs on the proxy's network {network!r}; leave 'network' out",
            )
    proxy_hosts = {
        h for s in proxied.values() for h in (s.get("hosts") or []) if isinstance(h, str)
    }
    for name, svc in services.items():
        on_proxy_host = any(h in proxy_hosts for h in svc.get("hosts") or [] if isinstance(h, str))
        ports = svc.get("ports")
        for i, text in enumerate(ports if isinstance(ports, list) else []):
            try:
                host_port = parse_port(str(text)).host_port
            except ValueError:
                continue  # reported by the model
            where = ("services", name, "ports", str(i))
            if on_proxy_host and host_port in (http_port, https_port):
                which = "http_port" if host_port == http_port else "https_port"
                yield (where, f"publishes host port {host_port}, the proxy's {which}")
            elif name in proxied and host_port is not None:
                yield (
                    where,
                    f"a proxied service starts beside its old container, so it cannot publish "
                    f"the fixed host port {host_port}; the proxy reaches it on its network",
                )


def _read_token(server: dict[str, Any]) -> Iterable[tuple[tuple[str, ...], str]]:
    """Reads that need the API token (`ServerSection.reads_need_token`) need `api_token_env`:
    without it every `GET /api/*` would be refused."""
    listen = server.get("listen", DEFAULT_LISTEN)
    required = server.get("read_token_required")
    if not isinstance(listen, str) or server.get("api_token_env") is not None:
        return
    fix = "set [server] api_token_env, or read_token_required = false to leave reads open"
    if required is True:
        yield (
            ("server", "read_token_required"),
            f"GET /api/* needs the API token, but api_token_env is not set: {fix}",
        )
    elif required is None and listens_beyond_loopback(listen):
        yield (
            ("server", "listen"),
            f"{listen!r} reaches beyond loopback, so read_token_required defaults to true and "
            f"GET /api/* needs the API token, but api_token_env is not set: {fix}",
        )


class _LineIndex:
    """Maps dotted key paths to the line that defines them, for error messages."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(
        r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+))*)\s*="
    )

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        in_multiline = False
        for number, line in enumerate(text.splitlines(), start=1):
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = not in_multiline
                if not in_multiline:
                    continue
            if in_multiline and not self._KEY.match(line):
                continue
            if header := self._HEADER.match(line):
                table = self._split(header.group(1))
                self._lines.setdefault(table, number)
            elif key := self._KEY.match(line):
                self._lines.setdefault(table + self._split(key.group(1)), number)

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        parts = re.findall(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+)", dotted)
        return tuple(a or b or c for a, b, c in parts)

    def line_of(self, path: tuple[str, ...]) -> int:
        for end in range(len(path), 0, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        return 1


def read_secret(
    env: str | None, file: str | None = None, base_dir: Path | None = None
) -> str | None:
    """Read a secret from an environment variable or a file, and register it for redaction."""
    value: str | None = None
    if env:
        value = os.environ.get(env)
    if value is None and file:
        path = Path(file) if base_dir is None else base_dir / file
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read secret file: {exc.strerror}"]) from None
    register_secret(value)
    return value
