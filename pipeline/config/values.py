"""The values of `pipeline.toml` that follow a rule of their own, as types msgspec decodes
through `decode_hook`: durations ("30s", "1h30m" → seconds), port mappings, volumes, paths,
URLs, names. Each type is a subclass of the builtin it holds (a `Seconds` is a float, an
`Address` a str), so code reading the config sees plain values; a rule's ValueError becomes
msgspec's ValidationError at the key (`pipeline.config.load` words it for the user)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from pipeline.config.cron import parse_cron

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?[bkmgBKMG]?$")
_RESTART_RE = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
_SECRET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$")
# A Host header a proxy route matches: a DNS name, optionally with one leading "*." wildcard.
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")


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

    Raises ValueError naming the text (`decode` reports it at the config key)."""
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


def _https_url(value: str) -> str:
    """An https:// URL with a host and no spaces: an ACME directory (RFC 8555, section 6.1:
    ACME servers must serve it over HTTPS)."""
    try:
        parts = urlsplit(value)
        https = parts.scheme == "https" and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        https = False
    if not https or re.search(r"\s", value):
        raise ValueError(
            f"{value!r} is not an https:// URL (an ACME directory, e.g. "
            "'https://acme-v02.api.letsencrypt.org/directory')"
        )
    return value


def _email(value: str) -> str:
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
        raise ValueError(f"{value!r} is not an email address (NAME@DOMAIN)")
    return value


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


class Seconds(float):
    """A duration in seconds: "500ms", "30s", "2m", "1h30m", "1d", "0" or a plain number
    (`parse_duration`)."""


class SpecList(list[str]):
    """A list of strings that may be given as one string (`cache_from = "type=registry,..."`)."""


class SecretSources(dict[str, str]):
    """`[images.*] secrets`: ID_env = "VAR" or ID_file = "/path" entries."""


class Checked(str):
    """A string with a rule of its own: a subclass's `check` returns the value (normalised) or
    raises ValueError saying what is wrong."""

    @staticmethod
    def check(value: str) -> str:
        return value


class Cron(Checked):
    """A five-field crontab expression, in UTC (`pipeline.config.cron.parse_cron`)."""

    check = staticmethod(_cron)


class RelPath(Checked):
    """A path relative to the repository root, normalised ("./web/" is "web")."""

    check = staticmethod(_relative_path)


class EnvName(Checked):
    """The name of an environment variable."""

    check = staticmethod(_env_name)


class Address(Checked):
    """HOST or HOST:PORT."""

    check = staticmethod(_address)


class PasswordHash(Checked):
    """werkzeug's scrypt password hash (never echoed in messages)."""

    check = staticmethod(_password_hash)


class DockerUrl(Checked):
    """A Docker endpoint: unix:///path, tcp://host:port or ssh://user@host."""

    check = staticmethod(_docker_url)


class RepoUrl(Checked):
    """A git URL pipeline may fetch: https, ssh, git, file, scp-like or a path."""

    check = staticmethod(_repo_url)


class RepoName(Checked):
    """The owner/name webhook deliveries give a repository."""

    check = staticmethod(_repository_full_name)


class NetworkName(Checked):
    """A named Docker network (not bridge, host or none)."""

    check = staticmethod(_network_name)


class PortSpec(Checked):
    """A `[[IP:]HOST:]CONTAINER[/udp]` port mapping (`parse_port`)."""

    check = staticmethod(_port)


class Volume(Checked):
    """A volume: NAME:/path[:ro] or /host:/path[:ro]."""

    check = staticmethod(_volume)


class Memory(Checked):
    """A memory size Docker takes: 256m, 1g."""

    check = staticmethod(_memory)


class Restart(Checked):
    """A Docker restart policy: no, always, unless-stopped, on-failure[:N]."""

    check = staticmethod(_restart)


class Hostname(Checked):
    """A DNS name a proxy route matches, optionally with a leading '*.'."""

    check = staticmethod(_hostname)


class PathPrefix(Checked):
    """A URL path prefix starting with '/', no wildcards."""

    check = staticmethod(_path_prefix)


class HttpsUrl(Checked):
    """An https:// URL (an ACME directory)."""

    check = staticmethod(_https_url)


class Email(Checked):
    """An email address, NAME@DOMAIN (an ACME account's contact)."""

    check = staticmethod(_email)


class DatabaseUrl(Checked):
    """A postgresql:// or sqlite:/// URL without a password."""

    check = staticmethod(_database_url)


def _kind(value: object) -> str:
    """The name msgspec gives a value's type in its messages (`str`, `array`, `object`)."""
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"Expected `str`, got `{_kind(value)}`")
    return value


def decode_hook(kind: type, value: object) -> object:
    """msgspec's `dec_hook` for the types above: the checked (and converted) value of `kind`.

    Raises ValueError, which msgspec reports at the value's key; a wrong builtin type reads as
    msgspec's own ("Expected `str`, got `int`"). NotImplementedError for any other type."""
    if kind is Seconds:
        return Seconds(parse_duration(value))
    if kind is SpecList:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"Expected `str | array`, got `{_kind(value)}`")
        return SpecList(_string(item) for item in items)
    if kind is SecretSources:
        if not isinstance(value, dict):
            raise ValueError(f"Expected `object`, got `{_kind(value)}`")
        return SecretSources(_secret_sources({_string(k): _string(v) for k, v in value.items()}))
    if isinstance(kind, type) and issubclass(kind, Checked):
        return kind(kind.check(_string(value)))
    raise NotImplementedError(f"no decoder for {kind!r}")


def encode_hook(value: object) -> object:
    """msgspec's `enc_hook` for the types above: the builtin each one holds."""
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")
