"""Rollback on the lab (rollout-safety case 6): a rollback restores a whole release, image and
settings, on every host; a second one goes further back; the service stays pinned there."""

from __future__ import annotations

import json
from typing import Any

import docker
import pytest
from deploy_helpers import Project

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# A secret-looking env value of every release: it must never be printed.
SECRET = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
# r2 runs httpd itself instead of the image's default shell wrapper: a command change.
HTTPD = '["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]'


def _settings(project: Project, name: str, port: int, command: str | None = None) -> None:
    """Configure web for release `name`: its env, env file, label, port and command."""
    (project.root / "web.env").write_text(f"# release {name}\nFROM_FILE={name}\n")
    project.write_config(
        web_ports=f'ports = ["{port}:8080"]',
        web=f'env = {{ GREETING = "{name}", API_KEY = "{SECRET}" }}\nenv_file = "web.env"\n'
        f'labels = {{ tier = "{name}" }}\n' + (f"command = {command}\n" if command else ""),
    )


def _running(project: Project) -> list[dict[str, Any]]:
    """`docker inspect` of web's running container on every host (exactly one per host)."""
    out = []
    for host in project.lab.hosts:
        client = docker.DockerClient(base_url=host.docker_url)
        try:
            (container,) = client.containers.list(
                filters={"label": f"dev.pipeline.service={project.web}"}
            )
            out.append(client.api.inspect_container(container.id))
        finally:
            client.close()
    return out


def _web_status(project: Project) -> list[dict[str, Any]]:
    rows = json.loads(project.cli("status", "--json").stdout)
    return [r for r in rows if r["service"] == project.web]


def _assert_release(
    project: Project, digest: str, name: str, port: int, *, httpd: bool, content: str
) -> None:
    for i, attrs in enumerate(_running(project)):
        assert attrs["Config"]["Image"].endswith("@" + digest), attrs["Config"]["Image"]
        env = attrs["Config"]["Env"]
        assert f"GREETING={name}" in env and f"FROM_FILE={name}" in env, env
        assert attrs["Config"]["Labels"]["tier"] == name
        assert list(attrs["HostConfig"]["PortBindings"]) == ["8080/tcp"]
        assert attrs["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostPort"] == str(port)
        assert (attrs["Config"]["Cmd"][1] == "httpd") is httpd, attrs["Config"]["Cmd"]
        assert project.get(i, port) == content


def test_rollback_restores_whole_releases_twice_back_and_pins(project: Project) -> None:
    """From r3, `pipeline rollback` restores r2's image, env, env file, labels, port and command
    on every host, a second one r1's; passes then leave the pinned service alone until a newer
    commit deploys it and ends the pin (as `pipeline deploy` does after another rollback)."""
    port_a, port_b = project.web_port, project.web_port + 2000
    _settings(project, "one", port_a)
    first = project.initial_commit()
    assert project.run().ok
    digests = {"one": _web_status(project)[0]["digest"]}

    _settings(project, "two", port_b, command=HTTPD)
    project.remote.write("web/www/index.html", "web v2")
    second = project.push("v2")
    assert project.run().ok
    digests["two"] = _web_status(project)[0]["digest"]

    _settings(project, "three", port_b)
    project.remote.write("web/www/index.html", "web v3")
    project.push("v3")
    assert project.run().ok
    _assert_release(project, _web_status(project)[0]["digest"], "three", port_b,
                    httpd=False, content="web v3")

    res = project.cli("rollback", project.web)
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_release(project, digests["two"], "two", port_b, httpd=True, content="web v2")
    assert {r["revision"] for r in _web_status(project)} == {second}

    res = project.cli("rollback", project.web)
    assert res.returncode == 0, res.stdout + res.stderr
    printed = res.stdout + res.stderr
    _assert_release(project, digests["one"], "one", port_a, httpd=False, content="web v1")

    # Pinned: a pass leaves it on r1 although the config now says "three".
    before = project.containers(project.web)
    again = project.run()
    assert again.ok, again.errors
    assert project.web not in {r.service for r in again.plan.rollouts}
    assert any(
        p.subject == f"services.{project.web}" and p.message.startswith(f"pinned at {first[:12]}")
        for p in again.plan.problems
    ), again.plan.problems
    assert project.containers(project.web) == before
    pins = {json.dumps(r["pinned"], sort_keys=True) for r in _web_status(project)}
    (pin,) = [json.loads(p) for p in pins]
    assert pin["revision"] == first and "rollback" in pin["reason"] and pin["since"]
    human = project.cli("status")
    assert f"pinned at {first[:12]}" in human.stdout, human.stdout
    history = project.cli("history", project.web, "--json").stdout
    assert [h["kind"] for h in json.loads(history)[:2]] == ["rollback", "rollback"]
    for text in (printed, human.stdout, history, project.cli("status", "--json").stdout):
        assert SECRET not in text

    # A newer commit releases the pin: deployed with the current settings.
    project.remote.write("web/www/index.html", "web v4")
    project.push("v4")
    result = project.run()
    assert result.ok, result.errors
    assert project.web in {r.service for r in result.plan.rollouts}
    rows = _web_status(project)
    assert {r["pinned"] for r in rows} == {None}
    _assert_release(project, rows[0]["digest"], "three", port_b, httpd=False, content="web v4")

    # Back again: below r4's release lies r1 (r2 and r3 were rolled back from); then
    # `pipeline deploy` unpins it and deploys the newest commit with the current settings.
    res = project.cli("rollback", project.web)
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_release(project, digests["one"], "one", port_a, httpd=False, content="web v1")
    res = project.cli("deploy", project.web)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = _web_status(project)
    assert {r["pinned"] for r in rows} == {None}
    _assert_release(project, rows[0]["digest"], "three", port_b, httpd=False, content="web v4")
