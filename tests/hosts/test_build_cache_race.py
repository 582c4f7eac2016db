"""A legacy build whose cached layer is removed mid-build (pure: a fake engine API; the real
builder is covered by tests/hosts/test_engine.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.errors import StallingError
from pipeline.hosts.engine import Engine

GONE = (
    'unable to find image "sha256:aeabced070aff3c8c68957668f0583e65bbd70a15744e8f0325d82d56fc7d784"'
)


class _Api:
    """Answers each build with the next of `answers`: "gone" (the cached layer vanished),
    "broken" (a failing step) or "ok"; records the nocache flag of each call."""

    def __init__(self, *answers: str) -> None:
        self.answers, self.nocache = list(answers), []

    def build(self, **kw: Any) -> Iterator[dict[str, Any]]:
        self.nocache.append(kw["nocache"])
        answer = self.answers.pop(0)
        yield {"stream": "Step 1/2 : FROM scratch\n"}
        if answer == "gone":
            yield {"error": GONE, "errorDetail": {"message": GONE}}
        elif answer == "broken":
            yield {"error": "exit code 1", "errorDetail": {"message": "exit code 1"}}
        else:
            yield {"aux": {"ID": "sha256:" + "ab" * 32}}


def _engine(api: _Api) -> Engine:
    @contextlib.contextmanager
    def calling(_what: str) -> Iterator[None]:
        yield

    conn = SimpleNamespace(name="local", url="unix:///var/run/docker.sock", calling=calling,
                           client=SimpleNamespace(api=api), where="host local")  # fmt: skip
    return Engine(conn)  # type: ignore[arg-type]


def _build(engine: Engine) -> str:
    return engine.build(Path("/ctx"), "Dockerfile", ["web:1"], labels={}, build_args={})


def test_a_cached_layer_removed_mid_build_is_built_again_without_the_cache() -> None:
    """When a concurrent prune removes a cached layer the build was using ("unable to find
    image"), the build runs once more without the cache and succeeds."""
    api = _Api("gone", "ok")
    assert _build(_engine(api)) == "sha256:" + "ab" * 32
    assert api.nocache == [False, True]


@pytest.mark.parametrize("answers", [("broken",), ("gone", "gone")])
def test_other_build_failures_are_not_retried(answers: tuple[str, ...]) -> None:
    """A failing step is reported at once, and a second vanished layer (no cache used then)
    is reported too: one retry, only for the cache race."""
    api = _Api(*answers)
    with pytest.raises(StallingError, match="build failed"):
        _build(_engine(api))
    assert len(api.nocache) == len(answers)
