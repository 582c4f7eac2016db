"""Two services of one pass that share a new overlay network both find it made."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import docker.errors
import pytest
import requests

from pipeline.hosts.swarm import Swarm


class _Api:
    """A manager whose network `backend` is created by someone else between our look and our
    create; `code` is what its create answers then (a fault a real lab race hits by chance)."""

    def __init__(self, code: int, text: str, made: bool = True, listed_at: int = 2) -> None:
        self.code, self.text, self.made, self.looks = code, text, made, 0
        self.listed_at = listed_at  # the look at which the engine lists the network

    def networks(self, names: list[str]) -> list[dict[str, Any]]:
        self.looks += 1
        if self.looks < self.listed_at or not self.made:
            return []
        return [{"Name": names[0], "Driver": "overlay"}]

    def create_network(self, name: str, **_kw: Any) -> None:
        response = requests.Response()
        response.status_code = self.code
        raise docker.errors.APIError(self.text, response=response, explanation=self.text)


def _swarm(api: _Api) -> Swarm:
    @contextlib.contextmanager
    def calling(_what: str) -> Iterator[None]:
        yield

    conn = SimpleNamespace(client=SimpleNamespace(api=api), calling=calling, name="lab-1",
                           where="host lab-1 (tcp://10.88.0.2:2375)")  # fmt: skip
    return Swarm(conn, sleep=lambda _s: None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "text"),
    [(409, "network with name backend already exists"),
     (500, "rpc error: code = Unknown desc = name conflicts with an existing object")],
)  # fmt: skip
def test_a_network_created_meanwhile_is_taken_as_made(code: int, text: str) -> None:
    """When another service of the same pass creates the overlay between our look and our
    create, the engine's conflict (409, or Swarm 20.10's 500 "name conflicts") is not an
    error: the network is there, as wanted."""
    assert _swarm(_Api(code, text)).ensure_overlay("backend") is False


def test_a_conflict_without_the_network_is_still_an_error() -> None:
    """A 500 that left no overlay of that name behind is a real failure and is raised."""
    with pytest.raises(docker.errors.APIError):
        _swarm(_Api(500, "name conflicts with an existing object", made=False)).ensure_overlay(
            "backend"
        )


def test_a_network_listed_only_after_the_conflict_settles_is_taken_as_made() -> None:
    """Swarm's allocator can refuse the name before the engine lists the network the other
    create is still making (seen in CI): pipeline looks again for a few seconds and finds it."""
    api = _Api(500, "rpc error: code = Unknown desc = name conflicts with an existing object",
               listed_at=4)  # fmt: skip
    assert _swarm(api).ensure_overlay("backend") is False
    assert api.looks == 4
