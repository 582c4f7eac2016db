"""The engines and git mirrors of one config, each made once and shared: by the runner of a pass
and its builder, by the operations on deployed services, and by the service's repo checks."""

from __future__ import annotations

import threading

from pipeline.config.load import LoadedConfig, read_secret
from pipeline.hosts.engine import Engine, Progress
from pipeline.retry import RetryPolicy
from pipeline.sources.git import Mirror


class Connections:
    """Engines by host and mirrors by repo of `loaded`, made on first use; `close()` closes the
    engines' connections (a later use reconnects). Safe to share between threads."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        retry: RetryPolicy | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.loaded = loaded
        self.progress = progress  # each engine's byte and step progress goes there
        self.retry = retry or RetryPolicy()  # the engines' policy for pulls and inspections
        self._lock = threading.Lock()
        self._engines: dict[str, Engine] = {}
        self._mirrors: dict[str, Mirror] = {}
        self._mirror_locks: dict[str, threading.Lock] = {}

    def engine(self, host: str | None) -> Engine:
        """The engine of a configured host, or the local engine for None."""
        key = host or "local"
        with self._lock:
            if key not in self._engines:
                engine = self._engines[key] = (
                    Engine.local(retry=self.retry)
                    if host is None
                    else Engine.from_host(
                        host, self.loaded.model.hosts[host], self.loaded.base_dir, retry=self.retry
                    )
                )
                engine.progress = self.progress
            return self._engines[key]

    def cluster(self, name: str) -> Engine:
        """The engine of a `[clusters.NAME]` table: the Swarm manager pipeline talks to."""
        key = f"cluster:{name}"
        with self._lock:
            if key not in self._engines:
                self._engines[key] = Engine.from_host(
                    name, self.loaded.model.clusters[name], self.loaded.base_dir, retry=self.retry
                )
            return self._engines[key]

    def mirror(self, repo: str) -> Mirror:
        """The repo's mirror; one object per repo and URL, so its set-up runs once (a poll of
        hundreds of repos then costs one `git ls-remote` each)."""
        section = self.loaded.model.repos[repo]
        url: str = section.url
        if url.startswith("/"):  # a local path is followed as file:// (git's own local transport)
            url = f"file://{url}"
        with self._lock:
            mirror = self._mirrors.get(repo)
            if mirror is None or (mirror.url, mirror.submodules) != (url, section.submodules):
                mirror = self._mirrors[repo] = Mirror(
                    url,
                    self.loaded.data_dir / "git" / f"{repo}.git",
                    submodules=section.submodules,
                )
            return mirror

    def mirror_lock(self, repo: str) -> threading.Lock:
        """The lock to hold while fetching into and reading the repo's mirror (one per repo)."""
        with self._lock:
            return self._mirror_locks.setdefault(repo, threading.Lock())

    def registry_auth(self) -> dict[str, str] | None:
        """{"username", "password"} for the `[registry]`, the password read (and registered for
        redaction) now; None without a registry or a username. ConfigError if its file is
        unreadable."""
        reg = self.loaded.model.registry
        if reg is None or not reg.username:
            return None
        password = read_secret(reg.password_env, reg.password_file, self.loaded.base_dir)
        return {"username": reg.username, "password": password or ""}

    def close(self) -> None:
        """Close every engine's connection."""
        with self._lock:
            engines = list(self._engines.values())
        for engine in engines:
            engine.close()
