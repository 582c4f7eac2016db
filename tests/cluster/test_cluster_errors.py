"""What only the engines can tell, refused at plan time with the key named: a cluster whose engine
is not a Swarm manager, an overlay network on hosts that are not members of one Swarm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.lab.manage import LabState
from pipeline.lab.sample_app import write_sample_app

pytestmark = [pytest.mark.lab]


def test_plan_refuses_non_manager_cluster_and_overlay_off_swarm(
    tmp_path: Path, git_remote: Any, lab: LabState
) -> None:
    """`pipeline plan` on the session's lab (plain engines, no Swarm) names
    `clusters.NAME.docker` (not a Swarm manager) and `services.NAME.network` (an overlay a
    cluster service lists, on hosts not in one Swarm), each with file:line, and changes
    nothing."""
    h1, h2 = lab.hosts[0], lab.hosts[1]
    config = tmp_path / "pipeline.toml"
    config.write_text(
        f'{lab.toml}\n[pipeline]\ndata_dir = "data"\n\n'
        f'[clusters.plain]\ndocker = "{h1.docker_url}"\naddress = "{h1.address}"\n\n'
        f'[repos.shop]\nurl = "{git_remote.url}"\nbranch = "main"\n\n'
        '[images.api]\nrepo = "shop"\ncontext = "api"\n\n'
        '[services.capi]\nimage = "api"\ncluster = "plain"\nnetworks = ["backend"]\n\n'
        f'[services.hapi]\nimage = "api"\nhosts = ["{h1.name}", "{h2.name}"]\n'
        'network = "backend"\n'
    )
    write_sample_app(git_remote.work, "api", "api v1")
    git_remote.commit("initial")
    git_remote.push()
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", "-c", str(config)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    lines = config.read_text().splitlines()
    docker_line = lines.index(f'docker = "{h1.docker_url}"', lines.index("[clusters.plain]")) + 1
    network_line = lines.index('network = "backend"') + 1
    assert (
        f"pipeline.toml:{docker_line}: clusters.plain.docker: {h1.docker_url} is not a Swarm "
        "manager" in out.stderr
    ), out.stderr
    assert (
        f"pipeline.toml:{network_line}: services.hapi.network: 'backend' is an overlay network"
        in out.stderr
    ), out.stderr
    assert "not members of one Swarm" in out.stderr
    assert not (tmp_path / "data" / "pipeline.db").exists() or "rolling out" not in out.stdout
