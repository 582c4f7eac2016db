"""File-change notifications for the service: the only module that imports watchdog.

Two uses: the config file (reload it live) and the refs of local repositories (a push to a repo
on this machine triggers at once, without hooks or polling). Bursts of events are debounced into
one callback, run on a timer thread; callbacks only enqueue work.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

log = structlog.get_logger(__name__)

Callback = Callable[[], None]
# inotify reports reads too; only writes, creations, moves and deletions change anything.
_IGNORED = frozenset({"opened", "closed_no_write"})


@dataclass
class _Subscription:
    key: str
    matches: Callable[[str], bool]
    callback: Callback
    debounce: float
    timer: threading.Timer | None = None


@dataclass
class _Dir:
    watch: ObservedWatch
    subs: list[_Subscription] = field(default_factory=list)


class _Dispatch(FileSystemEventHandler):
    """Hands the paths of every relevant event under one watched directory to `on_paths`."""

    def __init__(self, on_paths: Callable[[list[str]], None]) -> None:
        self.on_paths = on_paths

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _IGNORED:
            return
        paths = [os.fsdecode(event.src_path)]
        if event.dest_path:
            paths.append(os.fsdecode(event.dest_path))
        self.on_paths(paths)


class Watcher:
    """Debounced callbacks on file changes; `watch_*` and `unwatch` work before and after start."""

    def __init__(self) -> None:
        self._observer = Observer()
        self._observer.daemon = True
        self._lock = threading.Lock()
        self._dirs: dict[tuple[str, bool], _Dir] = {}
        self._keys: dict[str, list[tuple[str, bool]]] = {}
        self._stopped = False

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        """Stop watching and cancel pending callbacks; returns once the observer thread ended."""
        with self._lock:
            self._stopped = True
            for d in self._dirs.values():
                for sub in d.subs:
                    if sub.timer:
                        sub.timer.cancel()
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout=5)

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._keys)

    def watch_file(
        self, key: str, path: Path, callback: Callback, *, debounce: float = 0.3
    ) -> None:
        """Call `callback` when the file at `path` is written, replaced, created or removed.

        The directory is watched, not the file, so editors that save by renaming a temp file
        over it are seen too."""
        target = os.path.realpath(path)
        self._add(key, os.path.dirname(target), False, lambda p: p == target, callback, debounce)

    def watch_git_refs(
        self, key: str, git_dir: Path, callback: Callback, *, debounce: float = 0.1
    ) -> None:
        """Call `callback` when any ref of the repository at `git_dir` (a bare repo or a .git
        directory) changes: loose refs under `refs/` or `packed-refs`."""
        root = os.path.realpath(git_dir)
        packed = os.path.join(root, "packed-refs")
        # git writes `<ref>.lock` then renames it over the ref: the rename's target is the change.
        self._add(key, os.path.join(root, "refs"), True, _not_lock, callback, debounce)
        self._add(key, root, False, lambda p: p == packed, callback, debounce)

    def unwatch(self, key: str) -> None:
        """Forget every watch registered under `key` (unknown keys are ignored)."""
        with self._lock:
            for dir_key in self._keys.pop(key, []):
                d = self._dirs.get(dir_key)
                if d is None:
                    continue
                for sub in [s for s in d.subs if s.key == key]:
                    if sub.timer:
                        sub.timer.cancel()
                    d.subs.remove(sub)
                if not d.subs:
                    del self._dirs[dir_key]
                    self._observer.unschedule(d.watch)

    # -- internals --------------------------------------------------------------------------
    def _add(
        self,
        key: str,
        directory: str,
        recursive: bool,
        matches: Callable[[str], bool],
        callback: Callback,
        debounce: float,
    ) -> None:
        dir_key = (directory, recursive)
        with self._lock:
            d = self._dirs.get(dir_key)
            if d is None:
                handler = _Dispatch(functools.partial(self._dispatch, dir_key))
                watch = self._observer.schedule(handler, directory, recursive=recursive)
                d = self._dirs[dir_key] = _Dir(watch)
            d.subs.append(_Subscription(key, matches, callback, debounce))
            self._keys.setdefault(key, []).append(dir_key)

    def _dispatch(self, dir_key: tuple[str, bool], paths: list[str]) -> None:
        with self._lock:
            d = self._dirs.get(dir_key)
            if d is None or self._stopped:
                return
            for sub in d.subs:
                if any(sub.matches(p) for p in paths):
                    self._arm(sub)

    def _arm(self, sub: _Subscription) -> None:
        # Restarting the timer on every event turns a burst (write, rename, chmod) into one call.
        if sub.timer:
            sub.timer.cancel()
        sub.timer = threading.Timer(sub.debounce, self._fire, args=[sub])
        sub.timer.daemon = True
        sub.timer.start()

    def _fire(self, sub: _Subscription) -> None:
        try:
            sub.callback()
        except Exception as exc:  # a failing callback must not stop later notifications
            log.error("watch.callback_failed", key=sub.key, error=str(exc))


def _not_lock(path: str) -> bool:
    return not path.endswith(".lock")


def local_repo_path(url: str) -> Path | None:
    """The directory of a repo given as an absolute path or a file:// URL, else None."""
    if url.startswith("/"):
        return Path(url)
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    return None


def git_dir_of(path: Path) -> Path | None:
    """The git directory of a bare repo or a work tree at `path`, or None if it is neither."""
    if (path / ".git").is_dir():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "refs").is_dir():
        return path
    return None
