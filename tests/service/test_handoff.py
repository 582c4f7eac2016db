"""Handing `pipeline rollback` to a running `pipeline serve`: the `serve.json` a service
publishes and a command finds, the API's `wait` rollback with the local token, and the owner
a handed rollback holds leases as. The whole path with a real service, proxy and hosts is
`tests/deploy/test_proxy.py::test_rollback_with_serve_running_is_done_by_serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pipeline.config.load import parse
from pipeline.service import handoff
from pipeline.service.server import ServerContext, create_app
from pipeline.state.leases import default_owner, owner_alive_local, process_of
from pipeline.state.queue import EventQueue
from pipeline.state.store import State

CONFIG = '[services.web]\nimage = "web"\nhosts = ["h"]\n'
FULL = (
    '[repos.app]\nurl = "file:///nowhere"\n[images.web]\nrepo = "app"\ncontext = "web"\n'
    '[hosts.h]\ndocker = "unix:///nowhere.sock"\n' + CONFIG
)


def test_a_published_handoff_is_private_and_found_only_for_the_same_config(
    tmp_path: Path,
) -> None:
    """serve.json is created 0600 and found by a command of the same config file only; one
    naming a dead process is ignored, and a service withdraws only its own file."""
    data, config = tmp_path / "data", tmp_path / "pipeline.toml"
    config.write_text("")
    mine = handoff.describe("0.0.0.0", 8700, config)
    assert mine.url == "http://127.0.0.1:8700"  # every address: reached through loopback
    handoff.publish(data, mine)
    path = data / handoff.HANDOFF_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert handoff.find(data, config) == mine
    other = tmp_path / "other.toml"
    other.write_text("")
    assert handoff.find(data, other) is None  # a service following another file
    newer = handoff.describe("127.0.0.1", 8701, config)
    handoff.publish(data, newer)
    handoff.withdraw(data, mine)  # not its file any more: left alone
    assert handoff.find(data, config) == newer
    handoff.withdraw(data, newer)
    assert not path.exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    handoff.publish(data, handoff.Handoff(newer.url, gone.pid, newer.config, newer.token))
    assert handoff.find(data, config) is None  # its process is gone


def test_post_to_a_port_nobody_listens_on_sends_nothing(tmp_path: Path) -> None:
    """A service that does not accept the connection is reported as None (the command then
    does the work itself), not as an error."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dead = handoff.Handoff(f"http://127.0.0.1:{port}", os.getpid(), "/x", "t")
    assert handoff.post(dead, "/api/rollback/web", {}) is None


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, list[tuple[str, str | None]]]]:
    """The app with no `[server] api_token_env`, a local token and a recording rollback."""
    loaded = parse(FULL, tmp_path / "pipeline.toml")
    state = State.in_dir(tmp_path / "data")
    calls: list[tuple[str, str | None]] = []

    def rollback_now(service: str, to: str | None, on_line: Any) -> dict[str, Any]:
        calls.append((service, to))
        on_line("web: rolling back to r1")
        return {"service": service, "ok": True, "locked": False, "bad_input": False,
                "refused": False, "error": None, "releases": []}  # fmt: skip

    ctx = ServerContext(
        loaded=lambda: loaded,
        state=state,
        queue=EventQueue(state),
        status=lambda: [],
        wake=lambda: None,
        started_at=time.time(),
        rollback_now=rollback_now,
        local_token="local-token-of-serve-json",
    )
    with TestClient(create_app(ctx)) as client:
        yield client, calls


def test_a_wait_rollback_with_the_local_token_runs_now(
    api: tuple[TestClient, list[tuple[str, str | None]]],
) -> None:
    """With serve.json's token (and no API token configured), `"wait": true` rolls back now
    and streams its progress lines, then how it went; without `wait` the rollback is queued
    (202); a wrong token is refused and rolls nothing back."""
    client, calls = api
    auth = {"Authorization": "Bearer local-token-of-serve-json"}
    done = client.post("/api/rollback/web", json={"to": "r1", "wait": True}, headers=auth)
    assert done.status_code == 200, done.text
    assert done.headers["content-type"] == "application/x-ndjson"
    stream = [json.loads(line) for line in done.text.splitlines()]
    assert stream[0] == {"line": "web: rolling back to r1"}  # progress first, as it comes
    assert stream[1]["done"]["ok"] is True and len(stream) == 2
    assert calls == [("web", "r1")]
    queued = client.post("/api/rollback/web", json={}, headers=auth)
    assert queued.status_code == 202 and "event_id" in queued.json()
    wrong = client.post("/api/rollback/web", json={"wait": True},
                        headers={"Authorization": "Bearer guessed"})  # fmt: skip
    assert wrong.status_code == 403  # no API token configured: only serve.json's is taken
    unknown = client.post("/api/rollback/nope", json={"wait": True}, headers=auth)
    assert unknown.status_code == 404
    assert calls == [("web", "r1")]


def test_a_handed_rollbacks_owner_lives_and_dies_with_its_process() -> None:
    """A handed rollback's owner ("HOST:PID/rollback-N") is alive while its process is and
    dead once it is gone, so a `pipeline serve` killed mid-rollback has that rollback put
    back and its lease freed like its own work; the tag never makes it immortal."""
    me = default_owner()
    assert process_of(f"{me}/rollback-3") == me
    assert owner_alive_local(f"{me}/rollback-3")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = me.rpartition(":")[0]
    assert not owner_alive_local(f"{host}:{gone.pid}/rollback-1")
    assert owner_alive_local("other-machine:1/rollback-1")  # only its lease's expiry frees it


def test_serve_keeps_pinging_every_service_host_so_connections_stay_up(tmp_path: Path) -> None:
    """A running service pings the engine of every host a service runs on every `keep_warm`
    seconds (a stand-in for the engines records the pings), so a connection that went away
    while idle is made again before a rollback handed over needs it; it stops when asked."""
    from pipeline.service.daemon import Service

    config = tmp_path / "pipeline.toml"
    config.write_text(FULL.replace('hosts = ["h"]', 'hosts = ["h", "g"]')
                      + '[hosts.g]\ndocker = "unix:///nowhere-2.sock"\n')  # fmt: skip
    pinged: list[str] = []

    class Engines:
        loaded = parse(config.read_text(), config)

        def engine(self, host: str) -> Any:
            class Pinged:
                def ping(self) -> None:
                    pinged.append(host)

            return Pinged()

    service = Service(config, keep_warm=0.05)
    service._observer = Engines()  # type: ignore[assignment]
    keeper = threading.Thread(target=service._keep_warm)
    keeper.start()
    try:
        deadline = time.monotonic() + 10
        while min(pinged.count("h"), pinged.count("g")) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pinged.count("h") >= 3 and pinged.count("g") >= 3, pinged
    finally:
        service.request_stop()
        keeper.join(5)
    assert not keeper.is_alive()
