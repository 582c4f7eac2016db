"""The deploy flow on the lab: real git, real engines, a real registry, real hosts."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

import docker
import pytest
from deploy_helpers import Project

from pipeline.config.load import load
from pipeline.deploy.connections import Connections
from pipeline.deploy.runner import Runner
from pipeline.lab.manage import LabState
from pipeline.lab.workrepo import git
from pipeline.plan.planner import service_spec_hash
from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def test_first_run_builds_and_deploys_both(project: Project) -> None:
    """The first run builds both images, pushes them and deploys both services on every host."""
    project.initial_commit()
    result = project.run()
    assert result.ok, result.errors
    assert sorted(b.image for b in result.plan.builds) == sorted([project.web, project.api])
    for i in range(2):
        assert project.get(i, project.web_port) == "web v1"
        assert project.get(i, project.api_port) == "api v1"
    status = json.loads(project.cli("status", "--json").stdout)
    assert {(r["service"], r["state"]) for r in status} == {
        (project.web, "running"), (project.api, "running")}
    assert all(len(r["revision"]) == 40 and r["digest"].startswith("sha256:") for r in status)


def test_change_to_web_rebuilds_only_web(project: Project) -> None:
    """A commit touching only web/ plans, builds and restarts only web; api keeps its container."""
    project.initial_commit()
    assert project.run().ok
    api_before = project.containers(project.api)
    project.remote.write("web/www/index.html", "web v2")
    project.push("web v2")
    plan = json.loads(project.cli("plan", "--json").stdout)
    assert [b["image"] for b in plan["builds"]] == [project.web]
    assert [r["service"] for r in plan["rollouts"]] == [project.web]
    result = project.run()
    assert result.ok, result.errors
    assert [b.image for b in result.plan.builds] == [project.web]
    assert project.get(0, project.web_port) == "web v2"
    assert project.get(1, project.web_port) == "web v2"
    assert project.containers(project.api) == api_before


def test_dockerignored_change_does_nothing(project: Project) -> None:
    """A commit touching only a file web's .dockerignore excludes builds and restarts nothing."""
    project.initial_commit()
    assert project.run().ok
    before = project.containers(project.web)
    project.remote.write("web/NOTES.md", "not part of the image")
    project.push("notes")
    result = project.run()
    assert result.ok and result.plan.empty, result.plan
    assert project.containers(project.web) == before


def test_unhealthy_revision_rolls_back_everywhere(project: Project) -> None:
    """A failing health check exits 1; the old revision serves everywhere; history says why."""
    project.initial_commit()
    assert project.run().ok
    (project.remote.work / "web" / "www" / "health").unlink()
    project.remote.write("web/www/index.html", "web broken")
    project.push("break health")
    project.write_config(web_timeout="2s")
    res = project.cli("run")
    assert res.returncode == 1, res.stdout + res.stderr
    for i in range(2):
        assert project.get(i, project.web_port) == "web v1"
    history = json.loads(project.cli("history", project.web, "--json").stdout)
    assert history[0]["status"] == "rolled_back"
    assert "unhealthy" in history[0]["error"] and "404" in history[0]["error"]
    # The failed revision is not retried until a newer commit arrives.
    again = project.run()
    assert again.ok and not again.rollouts
    assert any("failed its health check" in p.message for p in again.plan.problems)


def test_rollback_command_restores_previous_revision(project: Project) -> None:
    """`pipeline rollback` puts the previous revision back on every host; status says so."""
    first = project.initial_commit()
    assert project.run().ok
    project.remote.write("web/www/index.html", "web v2")
    project.push("v2")
    assert project.run().ok
    assert project.get(0, project.web_port) == "web v2"
    res = project.cli("rollback", project.web)
    assert res.returncode == 0, res.stderr
    for i in range(2):
        assert project.get(i, project.web_port) == "web v1"
    status = json.loads(project.cli("status", "--json").stdout)
    web = [r for r in status if r["service"] == project.web]
    assert {r["revision"] for r in web} == {first}
    assert {r["state"] for r in web} == {"running"}


def test_second_host_cannot_pull_so_both_roll_back(project: Project) -> None:
    """With max_parallel 1, when host 2 cannot pull, both hosts end on the previous revision."""
    project.initial_commit()
    assert project.run().ok
    first_host_before = project.containers(project.web)[project.host_names[0]]
    project.remote.write("web/www/index.html", "web v2")
    project.push("v2")
    blocked = _block_registry(project.lab, 1)
    try:
        result = project.run()
    finally:
        _unblock_registry(project.lab, 1, blocked)
    assert not result.ok
    assert "pull" in " ".join(result.errors), result.errors
    for i in range(2):
        assert project.get(i, project.web_port) == "web v1"
    # The first host went to v2 and back: it runs its previous container again.
    assert project.containers(project.web)[project.host_names[0]] == first_host_before


def test_registry_down_fails_before_any_host_is_touched(project: Project) -> None:
    """With the registry unreachable the run fails after its retries and no host is touched."""
    project.initial_commit()
    assert project.run().ok
    before = project.containers(project.web)
    project.remote.write("web/www/index.html", "web v2")
    project.push("v2")
    dead = project.lab.registry.rsplit(":", 1)[0] + ":5999"
    project.registry = dead
    project.write_config()
    result = project.run()
    assert not result.ok
    assert "push" in " ".join(result.errors)
    assert project.containers(project.web) == before
    assert project.get(0, project.web_port) == "web v1"


def test_memory_and_env_change_rolls_out_without_build(project: Project) -> None:
    """Changing only a service's memory and env rolls it out with the same image and no build."""
    project.initial_commit()
    assert project.run().ok
    project.write_config(web='memory = "64m"\nenv = { MODE = "canary" }')
    result = project.run()
    assert result.ok, result.errors
    assert result.plan.builds == ()
    assert [r.service for r in result.plan.rollouts] == [project.web]
    host = project.lab.hosts[0]
    client = docker.DockerClient(base_url=host.docker_url)
    try:
        (cid,) = project.containers(project.web)[host.name]
        attrs = client.containers.get(cid).attrs
    finally:
        client.close()
    assert attrs["HostConfig"]["Memory"] == 64 * 1024 * 1024
    assert "MODE=canary" in attrs["Config"]["Env"]


def test_release_tags_are_followed(tmp_path: Path, git_remote: Any, lab: LabState) -> None:
    """Following v*: tag v1.2.0 deploys its commit, tagged 1.2.0; an untagged commit does not."""
    proj = Project(tmp_path, git_remote, lab)
    try:
        proj.initial_commit()
        proj.config.write_text(proj.config.read_text().replace('branch = "main"', 'tags = "v*"'))
        result = proj.run()
        assert result.ok and result.plan.empty  # no release tag yet
        sha = proj.remote.tag("v1.2.0")
        git("push", "origin", "refs/tags/v1.2.0:refs/tags/v1.2.0", cwd=proj.remote.work)
        result = proj.run()
        assert result.ok, result.errors
        assert {b.revision for b in result.plan.builds} == {sha}
        assert proj.get(0, proj.web_port) == "web v1"
        tags = docker.from_env().images.get(f"{lab.registry}/{proj.web}:1.2.0").attrs
        assert tags["Config"]["Labels"]["org.opencontainers.image.revision"] == sha
        proj.remote.write("web/www/index.html", "web v2")
        proj.push("untagged")
        later = proj.run()
        assert later.ok and later.plan.empty
        assert proj.get(0, proj.web_port) == "web v1"
    finally:
        proj.cleanup()


def _netns(lab: LabState, index: int) -> str:
    return str(json.loads((lab.dir / "lab.json").read_text())["hosts"][index]["namespace"])


def _block_registry(lab: LabState, index: int) -> list[str]:
    rule = ["OUTPUT", "-p", "tcp", "--dport", lab.registry.rsplit(":", 1)[1], "-j", "REJECT"]
    subprocess.run(["nsenter", f"--net=/var/run/netns/{_netns(lab, index)}", "iptables", "-I",
                    *rule], check=True)
    return rule


def _unblock_registry(lab: LabState, index: int, rule: list[str]) -> None:
    subprocess.run(["nsenter", f"--net=/var/run/netns/{_netns(lab, index)}", "iptables", "-D",
                    *rule], check=False)


def test_without_registry_each_host_builds(tmp_path: Path, git_remote: Any, lab: LabState) -> None:
    """Without a [registry], every target host builds the image itself and runs it."""
    proj = Project(tmp_path, git_remote, lab, no_registry=True)
    try:
        sha = proj.initial_commit()
        result = proj.run()
        assert result.ok, result.errors
        for i, host in enumerate(lab.hosts):
            assert proj.get(i, proj.web_port) == "web v1"
            client = docker.DockerClient(base_url=host.docker_url)
            try:
                image = client.images.get(f"pipeline/{proj.web}:{sha[:12]}")
            finally:
                client.close()
            assert image.labels["org.opencontainers.image.revision"] == sha
    finally:
        proj.cleanup()


def test_start_first_and_runtime_options(project: Project) -> None:
    """start-first keeps one container serving; network, volume, command, labels and restart
    policy reach the container."""
    net, vol = f"plnet{project.suffix}", f"plvol{project.suffix}"
    project.write_config(
        web_ports='ports = ["8080"]',
        web=f'strategy = "start-first"\nnetwork = "{net}"\nvolumes = ["{vol}:/data"]\n'
        'command = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]\n'
        'labels = { team = "shop" }\nrestart = "always"',
    )
    project.initial_commit()
    try:
        result = project.run()
        assert result.ok, result.errors
        host = project.lab.hosts[0]
        client = docker.DockerClient(base_url=host.docker_url)
        try:
            (cid,) = project.containers(project.web)[host.name]
            attrs = client.containers.get(cid).attrs
            assert net in attrs["NetworkSettings"]["Networks"]
            assert any(m.get("Name") == vol for m in attrs["Mounts"])
            assert attrs["Config"]["Cmd"][1] == "httpd"
            assert attrs["Config"]["Labels"]["team"] == "shop"
            assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "always"
            project.remote.write("web/www/index.html", "web v2")
            project.push("v2")
            assert project.run().ok
            (new_id,) = project.containers(project.web)[host.name]
            port = client.containers.get(new_id).ports["8080/tcp"][0]["HostPort"]
            assert new_id != cid
            assert project.get(0, int(port)) == "web v2"
        finally:
            client.close()
    finally:
        project.cleanup()
        for h in project.lab.hosts:
            client = docker.DockerClient(base_url=h.docker_url)
            try:
                with contextlib.suppress(docker.errors.NotFound):
                    client.networks.get(net).remove()
                with contextlib.suppress(docker.errors.NotFound):
                    client.volumes.get(vol).remove(force=True)
            finally:
                client.close()


def test_env_file_is_read_once_per_pass(project: Project) -> None:
    """The env_file deployed is the one planned: rewritten as the rollout starts, the containers
    still get the content read at the start of the pass, the content the release's hash covers."""
    planned = 'GREETING=planned\nQUOTED="kept whole"\n'
    env_file = project.root / "web.env"
    env_file.write_text(planned)
    project.write_config(web='env_file = "web.env"')
    project.initial_commit()
    loaded = load(project.config)
    state = State.in_dir(loaded.data_dir)

    def rewrite_when_rolling_out(line: str) -> None:
        if line.startswith(f"{project.web}: rolling out"):
            env_file.write_text("GREETING=changed later\n")

    connections = Connections(loaded)
    runner = Runner(loaded, state, connections, sleep=lambda _s: None,
                    report=rewrite_when_rolling_out)
    try:
        result = runner.run_pass()
    finally:
        connections.close()
    assert result.ok, result.errors
    assert env_file.read_text() == "GREETING=changed later\n"  # rewritten before any start
    (release,) = state.releases(project.web)
    assert release.spec_hash == service_spec_hash(loaded.model.services[project.web], planned)
    for host in project.lab.hosts[:2]:
        client = docker.DockerClient(base_url=host.docker_url)
        try:
            (container,) = client.containers.list(
                filters={"label": f"dev.pipeline.service={project.web}"})
            env = container.attrs["Config"]["Env"]
        finally:
            client.close()
        assert "GREETING=planned" in env and "QUOTED=kept whole" in env
