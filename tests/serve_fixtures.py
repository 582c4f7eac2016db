"""The fixtures of `pipeline serve` lab tests, shared by tests/service and tests/dashboard:
a project on the lab and the serve processes started for it, both cleaned up at teardown even
when the test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import ServeProcesses, ServeProject

from pipeline.lab.manage import LabState
from pipeline.lab.workrepo import WorkRepo


@pytest.fixture
def sp(tmp_path: Path, git_remote: WorkRepo, lab: LabState) -> Iterator[ServeProject]:
    """The lab project; its containers are removed at teardown (after `serve` stopped)."""
    project = ServeProject.make(tmp_path, git_remote, lab)
    try:
        yield project
    finally:
        project.cleanup()


@pytest.fixture
def serve(tmp_path: Path, sp: ServeProject) -> Iterator[ServeProcesses]:
    """`serve(sp, watch_repos=...)` starts `pipeline serve`; all are stopped at teardown."""
    processes = ServeProcesses(tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()
