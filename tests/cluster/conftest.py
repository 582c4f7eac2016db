"""Fixtures of the cluster lab tests: one lab of 3 hosts made one Swarm per test module (a Swarm
lab is slow to start), and a project deploying to it."""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from cluster_helpers import ClusterProject
from lab_subnets import SECOND_TEST_LAB_SUBNET

from pipeline.lab import manage as lab_mod
from pipeline.lab import net as lab_net
from pipeline.lab.manage import LabState


def _quiet_down(lab_dir: Path) -> None:
    if (lab_dir / lab_mod.STATE_FILE).exists():
        with contextlib.suppress(Exception):
            lab_mod.lab_down(lab_dir)


@pytest.fixture(scope="module")
def swarm_lab(lab_prereqs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    """`pipeline lab up --hosts 3 --swarm` on the worker's second lab subnet (a module at a
    time uses it on a worker, as tests/lab does); its nodes labelled zone=a/b/c by host."""
    lab_dir = tmp_path_factory.mktemp("labswarm")  # "lab*": a dead session's is taken down
    (lab_dir / "session.pid").write_text(str(os.getpid()))
    atexit.register(_quiet_down, lab_dir)
    state = None
    try:
        state = lab_mod.lab_up(
            lab_dir, hosts=3, subnet=SECOND_TEST_LAB_SUBNET, swarm=True, proxy=False
        )
        _label_nodes(state)
        yield state
    finally:
        lab_mod.lab_down(lab_dir)
    # `lab down` leaves nothing behind: no link, namespace or forwarding rule of the lab.
    assert state is not None
    assert not lab_net.link_exists(state.bridge)
    assert not any(lab_net.namespace_exists(f"{state.name}-h{i}") for i in (1, 2, 3))
    rule = ["iptables", "-C", "FORWARD", "-i", state.bridge, "-o", state.bridge, "-j", "ACCEPT"]
    assert subprocess.run(rule, capture_output=True).returncode != 0


def _label_nodes(state: LabState) -> None:
    """Every namespace host has the machine's host name: tell nodes apart by a label."""
    client = docker.DockerClient(base_url=state.hosts[0].docker_url, timeout=30)
    try:
        zones = {h.address: z for h, z in zip(state.hosts, "abc", strict=False)}
        for node in client.nodes.list():
            spec = dict(node.attrs["Spec"])
            spec["Labels"] = {"zone": zones[node.attrs["Status"]["Addr"]]}
            node.update(spec)
    finally:
        client.close()


@pytest.fixture
def cluster_project(
    tmp_path: Path, git_remote: Any, swarm_lab: LabState
) -> Iterator[ClusterProject]:
    """A `ClusterProject` on the Swarm lab; its services, containers and networks are removed
    afterwards, even when the test fails."""
    project = ClusterProject(tmp_path, git_remote, swarm_lab)
    try:
        yield project
    finally:
        project.cleanup()
