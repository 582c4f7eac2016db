"""The docker CLI, for what the SDK cannot do: BuildKit builds (`docker buildx build`, or
`DOCKER_BUILDKIT=1 docker build` with a CLI that still carries BuildKit).

What a CLI offers is probed once per binary (path, size and mtime) and cached for the process:
- buildx: `docker buildx version` exits 0 (the plugin is installed; Docker docs, "Install
  Docker Buildx": "verify ... with docker buildx version");
- BuildKit in `docker build`: `DOCKER_BUILDKIT=1 docker build --help` exits 0 and lists
  `--secret`. The classic CLI (18.09 to 22.x) lists `--secret` only when BuildKit is on; a
  CLI of 23 or later without buildx refuses BuildKit ("BuildKit is enabled but the buildx
  component is missing or broken") and exits 1; with buildx, `docker build` is `buildx build`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from pipeline.errors import StallingError
from pipeline.redact import redact

log = structlog.get_logger(__name__)

_PROBE_TIMEOUT = 20  # seconds: a CLI that hangs on --help is as good as none
_BUILD_TAIL = 15  # output lines quoted in a failed build's error
# The caller names the engine (-H and TLS flags); nothing from the environment may redirect it.
_ENGINE_ENV = (
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS",
)


@dataclass(frozen=True)
class CliProbe:
    """What the docker CLI at `path` offers: `found` (it exists and runs), `buildx` (the buildx
    plugin answers), `buildkit` (`DOCKER_BUILDKIT=1 docker build` builds with BuildKit)."""

    path: str
    found: bool
    buildx: bool = False
    buildkit: bool = False


_cache: dict[tuple[str, int, int], CliProbe] = {}
_cache_lock = threading.Lock()


def which(name: str) -> str | None:
    """`name` resolved on PATH (shutil.which), None when absent."""
    return shutil.which(name)


def probe(path: str, cache_file: Path | None = None) -> CliProbe:
    """Probe the CLI at `path` (see the module's docstring), once per binary: the answer is
    kept for the process and, with `cache_file` (JSON), across processes, keyed by the binary's
    path, size and mtime (a CLI upgraded in place is probed again)."""
    try:
        st = os.stat(path)
    except OSError:
        return CliProbe(path, found=False)
    key = (path, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    stored = _load(cache_file).get(_key_text(key)) if cache_file else None
    if isinstance(stored, dict):
        result = CliProbe(path, True, bool(stored.get("buildx")), bool(stored.get("buildkit")))
    else:
        found = os.access(path, os.X_OK)
        buildx = found and _run_ok([path, "buildx", "version"]) is not None
        help_text = "" if not found or buildx else _run_ok([path, "build", "--help"], True)
        result = CliProbe(path, found, buildx, buildx or "--secret" in (help_text or ""))
        log.debug("docker cli probed", path=path, buildx=buildx, buildkit=result.buildkit)
        if cache_file and found:
            _store(cache_file, _key_text(key), {"buildx": buildx, "buildkit": result.buildkit})
    with _cache_lock:
        _cache[key] = result
    return result


def _key_text(key: tuple[str, int, int]) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


def _load(cache_file: Path) -> dict[str, object]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(cache_file: Path, key: str, value: dict[str, bool]) -> None:
    """Add one answer to the cache file (written whole to a temp file, then renamed)."""
    with _cache_lock:
        data = _load(cache_file)
        data[key] = value
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
            tmp.replace(cache_file)
        except OSError as exc:  # a cache only: probing again next time is fine
            log.debug("docker cli probe not cached", error=str(exc))


def _run_ok(argv: list[str], buildkit: bool = False) -> str | None:
    env = {**_clean_env(), "DOCKER_BUILDKIT": "1"} if buildkit else _clean_env()
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _ENGINE_ENV}


def engine_flags(
    url: str, *, tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> list[str]:
    """The CLI's global flags reaching the engine the SDK reaches with the same settings:
    `-H URL` (unix://, tcp:// or ssh://, the CLI dials ssh with the ssh client as the SDK's
    `use_ssh_client` does) and, with TLS files, `--tlsverify` and the files."""
    flags = ["-H", url]
    if tls_ca or tls_cert:
        flags.append("--tlsverify")
        if tls_ca:
            flags += ["--tlscacert", tls_ca]
        if tls_cert:
            flags += ["--tlscert", tls_cert]
        if tls_key:
            flags += ["--tlskey", tls_key]
    return flags


def run_build(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    where: str,
    iidfile: Path,
    on_output: Callable[[str], None] | None = None,
) -> str:
    """Run a CLI build (`argv` in full, `env` added to a copy of the environment without the
    DOCKER_HOST family), stream its output lines to `on_output` and return the image id the
    CLI wrote to `iidfile` ("sha256:...").

    A failed build raises StallingError("build failed: WHERE: ...") with its last output lines,
    redacted (registered secrets and URL credentials masked)."""
    tail: deque[str] = deque(maxlen=_BUILD_TAIL)
    full_env = {**_clean_env(), **env}
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except OSError as exc:
        raise StallingError(
            f"build failed: {where}: cannot run {argv[0]}: {exc.strerror}"
        ) from None
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = redact(raw.rstrip())
            if line.strip():
                tail.append(line)
                if on_output:
                    on_output(line)
    if proc.returncode != 0:
        output = "\n".join(tail)
        raise StallingError(f"build failed: {where}: exit status {proc.returncode}\n{output}")
    try:
        image_id = iidfile.read_text(encoding="utf-8").strip()
    except OSError:
        image_id = ""
    if not image_id.startswith("sha256:"):
        raise StallingError(f"build failed: {where}: the CLI wrote no image id to {iidfile}")
    return image_id
