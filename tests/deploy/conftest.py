"""Fixtures of the deploy-flow lab tests: a project (config, repo and runner) on the lab."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import Project

from pipeline.lab.manage import LabState


@pytest.fixture
def project(tmp_path: Path, git_remote: Any, lab: LabState) -> Iterator[Project]:
    """A `deploy_helpers.Project` (config, git repo, runner) on the session's lab hosts; what it
    deployed is removed afterwards, even when the test fails."""
    proj = Project(tmp_path, git_remote, lab)
    try:
        yield proj
    finally:
        proj.cleanup()
