"""`rollback_service` without hosts: what it hands the rollout (image, settings, the release it
restores) and what it records afterwards (the pin), with the rollout itself replaced by a
recorder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config.load import load
from pipeline.config.model import ServiceSection, decode
from pipeline.deploy.connections import Connections
from pipeline.deploy.operations import restored_spec, rollback_service
from pipeline.deploy.rollout import RolloutResult, Target
from pipeline.deploy.runner import Runner
from pipeline.state.rollbacks import ServiceSettings
from pipeline.state.store import State

CONFIG = """
[pipeline]
data_dir = "data"

[hosts.h1]
docker = "tcp://127.0.0.1:2375"
[hosts.h2]
docker = "tcp://127.0.0.1:2376"

[repos.app]
url = "file:///srv/app.git"

[images.web]
repo = "app"

[services.web]
image = "web"
hosts = ["h1", "h2"]
ports = ["{port}:8080"]
env = {{ GREETING = "{name}" }}
env_file = "web.env"
labels = {{ tier = "{name}" }}
max_parallel = 2
"""


class Recorder:
    """Stands in for `Runner.roll`: remembers what it was asked to roll out."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.calls: list[dict[str, Any]] = []

    def __call__(self, service: str, target: Target, **kw: Any) -> RolloutResult:
        self.calls.append({"service": service, "target": target, **kw})
        return RolloutResult(service, self.ok, 99, None if self.ok else "unhealthy")


def _write(root: Path, name: str, port: int) -> None:
    (root / "pipeline.toml").write_text(CONFIG.format(name=name, port=port))
    (root / "web.env").write_text(f"FROM_FILE={name}\nGREETING=from-file\n")


def _deploy(root: Path, state: State, i: int, name: str, *, settings: bool = True) -> None:
    """Record release i as a succeeded deploy with `name`'s settings, deployed on both hosts."""
    _write(root, name, 18000 + i)
    loaded = load(root / "pipeline.toml")
    svc = loaded.model.services["web"]
    recorded = ServiceSettings(svc, (root / "web.env").read_text()) if settings else None
    rev, digest = str(i) * 40, f"sha256:{str(i) * 64}"
    release = state.start_release(
        "web",
        rev,
        digest,
        f"reg/web@{digest}",
        f"spec{i}",
        kind="deploy",
        reason="x",
        run_id=None,
        settings=recorded,
    )
    state.finish_release(release, "succeeded")
    for host in svc.hosts:
        state.set_deployment(
            "web",
            host,
            revision=rev,
            digest=digest,
            ref=f"reg/web@{digest}",
            spec_hash=f"spec{i}",
            container_id=None,
            release_id=release,
        )


@pytest.fixture
def runner(tmp_path: Path) -> tuple[Runner, Recorder, list[str]]:
    """Releases r1 "one", r2 "two" (no stored settings) and r3 "three", deployed now."""
    state = State.in_dir(tmp_path / "data")
    _deploy(tmp_path, state, 1, "one")
    _deploy(tmp_path, state, 2, "two", settings=False)
    _deploy(tmp_path, state, 3, "three")
    lines: list[str] = []
    loaded = load(tmp_path / "pipeline.toml")
    run = Runner(loaded, state, Connections(loaded), report=lines.append)
    recorder = Recorder()
    run.roll = recorder  # type: ignore[method-assign]
    return run, recorder, lines


def test_rollback_rolls_out_the_stored_settings_and_pins(
    runner: tuple[Runner, Recorder, list[str]],
) -> None:
    """Back to r1: its digest, its env, env file values, labels and port, today's hosts; the
    release records r1's settings and that it restores r1; the service is pinned at r1."""
    run, recorder, _lines = runner
    rollback_service(run, "web", "r1")
    (call,) = recorder.calls
    target, spec = call["target"], call["spec"]
    assert (target.revision, target.digest, target.restores) == ("1" * 40, "sha256:" + "1" * 64, 1)
    assert target.settings == run.state.rollbacks.release_settings(1)
    # The env file travels as the text r1 read, not as the file on disk today.
    assert spec.env == {"GREETING": "one"} and spec.env_file == "web.env"
    assert target.env_file == "FROM_FILE=one\nGREETING=from-file\n"
    assert (spec.ports, spec.labels, spec.hosts) == (["18001:8080"], {"tier": "one"}, ["h1", "h2"])
    assert call["kind"] == "rollback" and call["reason"] == f"rollback to r1 ({'1' * 12})"
    pin = run.state.rollbacks.pins()["web"]
    assert (pin.revision, pin.release_id, pin.reason) == ("1" * 40, 99, "rollback to r1")
    assert pin.head == "3" * 40  # no mirror yet: the revision it rolled away from


def test_release_without_stored_settings_uses_current_ones_and_says_so(
    runner: tuple[Runner, Recorder, list[str]],
) -> None:
    """Back to r2, recorded before settings were: its image with the current settings, and a
    notice saying so."""
    run, recorder, lines = runner
    rollback_service(run, "web")
    (call,) = recorder.calls
    assert call["target"].digest == "sha256:" + "2" * 64
    assert call["spec"] == run.cfg.services["web"]
    assert call["target"].settings.service == run.cfg.services["web"]
    assert any(
        "r2 has no stored settings" in line and "current settings" in line for line in lines
    ), lines


def test_failed_rollback_pins_nothing(runner: tuple[Runner, Recorder, list[str]]) -> None:
    """A rollback whose rollout failed (and was undone) leaves the service unpinned."""
    run, recorder, _lines = runner
    recorder.ok = False
    rollback_service(run, "web", "r1")
    assert run.state.rollbacks.pins() == {}


def test_restored_spec_keeps_the_stored_strategy_when_todays_does_not_fit() -> None:
    """A release with a fixed host port keeps stop-first even when the config now says
    start-first (which cannot publish a fixed port); max_parallel comes from today."""
    stored = decode(ServiceSection, {"image": "web", "hosts": ["h1"], "ports": ["80:8080"]})
    today = decode(
        ServiceSection,
        {"image": "web", "hosts": ["h1", "h2"], "strategy": "start-first", "max_parallel": 2},
    )
    spec = restored_spec(ServiceSettings(stored), today)
    assert (spec.strategy, spec.max_parallel, spec.ports) == ("stop-first", 2, ["80:8080"])


def test_restored_spec_drains_and_keeps_as_todays_config_says() -> None:
    """A rollback of a proxied service drains and keeps the container it leaves as the config
    says now (`retain = "stopped"` set since), while the route (hosts, port) is the release's."""
    proxy = {"hosts": ["old.test"], "port": 8080, "drain": "30s"}
    stored = decode(ServiceSection, {"image": "web", "hosts": ["h1"], "proxy": proxy})
    today = decode(
        ServiceSection,
        {
            "image": "web",
            "hosts": ["h1"],
            "proxy": {"hosts": ["new.test"], "port": 9090, "drain": "2s", "retain": "stopped"},
        },
    )
    spec = restored_spec(ServiceSettings(stored), today)
    assert spec.proxy is not None
    assert (spec.proxy.hosts, spec.proxy.port) == (["old.test"], 8080)
    assert (spec.proxy.drain, spec.proxy.retain) == (2.0, "stopped")
