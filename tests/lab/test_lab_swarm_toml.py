"""`pipeline lab up --swarm` prints a `[clusters.lab]` table naming the Swarm's manager."""

from __future__ import annotations

import tomllib

from pipeline.lab.manage import LabHost, render_toml

HOSTS = [LabHost(f"lab-{i}", f"tcp://10.88.0.{i + 1}:2375", f"10.88.0.{i + 1}") for i in (1, 2, 3)]


def test_swarm_lab_toml_has_the_cluster_table() -> None:
    """With swarm, the tables gain `[clusters.lab]` at the first host (the manager); without,
    there is no cluster."""
    tables = tomllib.loads(render_toml("10.88.0.1:5000", False, HOSTS, swarm=True))
    assert tables["clusters"] == {"lab": {"docker": "tcp://10.88.0.2:2375", "address": "10.88.0.2"}}
    assert set(tables["hosts"]) == {"lab-1", "lab-2", "lab-3"}
    assert "clusters" not in tomllib.loads(render_toml("10.88.0.1:5000", False, HOSTS))
