"""Cluster services on a real Swarm of lab hosts: deploy by digest behind pipeline's own check,
Swarm's rollback of a failing revision, `pipeline rollback`, overlay networks across hosts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cluster_helpers import ClusterProject, health

from pipeline.lab.sample_app import write_sample_app
from pipeline.state.store import State

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REQUEST = "GET / HTTP/1.0\\r\\n\\r\\n"  # printf turns the escapes into CR LF


def cluster_service(p: ClusterProject, *, monitor: str = "300ms") -> str:
    return (
        f'[services.{p.api}]\nimage = "{p.api}"\ncluster = "lab"\nreplicas = 3\n'
        f'ports = ["{p.port}:8080"]\nendpoint_mode = "dnsrr"\nstop_timeout = "1s"\n'
        f"max_parallel = 3\n\n[services.{p.api}.health]\n{health(monitor)}"
    )


def digest_of(p: ClusterProject) -> str:
    state = State.in_dir(p.root / "data")
    build = state.last_build(p.api)
    assert build is not None
    return build.digest


def test_lab_swarm_and_cluster_deploy_by_digest(cluster_project: ClusterProject) -> None:
    """`lab up --hosts 3 --swarm` prints a [clusters.lab] table; a service with `cluster` and
    `replicas = 3` deploys by digest, each node runs a task and answers on the published port,
    and `status --json` shows per node its task, revision and state."""
    p = cluster_project
    assert "[clusters.lab]" in p.lab.toml
    p.write(cluster_service(p))
    sha = p.initial_commit()
    result = p.run()
    assert result.ok, result.errors
    digest = digest_of(p)
    tasks = p.tasks(p.api)
    assert len(tasks) == 3
    assert {t["node"] for t in tasks} == set(p.addresses)  # host-mode port: one per node
    assert all(t["image"].endswith("@" + digest) and t["state"] == "running" for t in tasks)
    for address in p.addresses:
        assert p.get(address, p.port) == "api v1"
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", "--json", "-c", str(p.config)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    rows = [r for r in json.loads(out.stdout) if r["service"] == p.api]
    assert {r["node"]["address"] for r in rows} == set(p.addresses)
    for row in rows:
        assert row["cluster"] == "lab" and row["revision"] == sha
        assert [t["state"] for t in row["tasks"]] == ["running"]


def test_failing_revision_is_rolled_back_by_swarm(cluster_project: ClusterProject) -> None:
    """A revision whose health check fails on its new tasks is rolled back by Swarm: every task
    ends on the previous digest, and history shows the failing task's node, the probe's result
    and the task's log lines."""
    p = cluster_project
    p.write(cluster_service(p))
    p.initial_commit()
    assert p.run().ok
    good = digest_of(p)
    # The broken revision serves no /health and says so in its log.
    write_sample_app(p.remote.work, "api", "api v2")
    (p.remote.work / "api" / "www" / "health").unlink()
    dockerfile = p.remote.work / "api" / "Dockerfile"
    dockerfile.write_text(
        dockerfile.read_text().replace(
            '"/bin/busybox httpd', '"echo api v2 has no health endpoint; /bin/busybox httpd'
        )
    )
    p.push("broken")
    result = p.run()
    assert not result.ok
    tasks = p.tasks(p.api)
    assert len(tasks) == 3
    assert all(t["image"].endswith("@" + good) and t["state"] == "running" for t in tasks), tasks
    rel = State.in_dir(p.root / "data").releases(p.api, limit=1)[0]
    assert rel.status == "rolled_back" and rel.failure_kind == "unhealthy"
    error = rel.error or ""
    assert "task " in error and "on node " in error
    assert any(f"({a})" in error for a in p.addresses), error
    assert "/health -> 404" in error, error
    assert "api v2 has no health endpoint" in error, error
    for address in p.addresses:
        assert p.get(address, p.port) == "api v1"


def test_rollback_of_cluster_service_restores_previous_digest(
    cluster_project: ClusterProject,
) -> None:
    """`pipeline rollback` of a cluster service puts every task back on the previous digest."""
    p = cluster_project
    p.write(cluster_service(p))
    p.initial_commit()
    assert p.run().ok
    first = digest_of(p)
    write_sample_app(p.remote.work, "api", "api v2")
    p.push("v2")
    assert p.run().ok
    assert digest_of(p) != first
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "rollback", p.api, "-c", str(p.config)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    tasks = p.tasks(p.api)
    assert len(tasks) == 3
    assert all(t["image"].endswith("@" + first) and t["state"] == "running" for t in tasks), tasks
    for address in p.addresses:
        assert p.get(address, p.port) == "api v1"


def _call(p: ClusterProject, address: str, container: str, name: str) -> str:
    """An HTTP GET of `name`:8080 from inside a container (busybox nc: its wget crashes here)."""
    code, out = p.exec(
        address,
        container,
        [
            "/bin/busybox",
            "sh",
            "-c",
            f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 5 {name} 8080",
        ],
    )
    assert code == 0, out
    return out


def test_overlay_network_across_nodes_and_hosts(cluster_project: ClusterProject) -> None:
    """Two cluster services on one overlay network, placed on different nodes, reach each other
    by name (web calls api); two plain-host services on Swarm-member hosts naming an overlay
    network in `network` do the same across their hosts."""
    p = cluster_project
    net = f"backend{p.sfx}"
    plain = f"plain{p.sfx}"
    p.write(
        f'[services.{p.api}]\nimage = "{p.api}"\ncluster = "lab"\nreplicas = 1\n'
        f'networks = ["{net}"]\nplacement = ["node.labels.zone == b"]\n'
        f'endpoint_mode = "dnsrr"\nstop_timeout = "1s"\n\n'
        f'[services.{p.web}]\nimage = "{p.web}"\ncluster = "lab"\nreplicas = 1\n'
        f'networks = ["{net}"]\nplacement = ["node.labels.zone == c"]\n'
        f'endpoint_mode = "dnsrr"\nstop_timeout = "1s"\n\n'
        f'[services.h{p.api}]\nimage = "{p.api}"\nhosts = ["lab-2"]\nnetwork = "{plain}"\n'
        f'stop_timeout = "1s"\n\n'
        f'[services.h{p.web}]\nimage = "{p.web}"\nhosts = ["lab-3"]\nnetwork = "{plain}"\n'
        f'stop_timeout = "1s"\n'
    )
    p.initial_commit()
    result = p.run()
    assert result.ok, result.errors
    (web_task,) = p.tasks(p.web)
    (api_task,) = p.tasks(p.api)
    assert web_task["node"] != api_task["node"]
    assert "api v1" in _call(p, web_task["node"], web_task["container"], p.api)
    web_host = p.containers_of(f"h{p.web}", 2)
    assert "api v1" in _call(p, p.addresses[2], web_host, f"h{p.api}")
