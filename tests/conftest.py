"""Shared fixtures: the session's lab of real Docker hosts, the local engine, real git remotes
and the sample app. Each fixture removes what it made, even when a test fails."""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from lab_subnets import TEST_LAB_SUBNET
from pg_helpers import PgServer, pg_missing, pg_server

from pipeline.lab import manage as lab_mod
from pipeline.lab.sample_app import write_sample_app
from pipeline.lab.workrepo import WorkRepo

LOCAL_DOCKER = "unix:///var/run/docker.sock"


# -- the lab --------------------------------------------------------------------------------


def lab_skip_reason() -> str | None:
    """Why lab tests cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, a bridge, extra dockerds)"
    missing = lab_mod.missing_tools()
    if missing:
        return f"lab tests need {', '.join(missing)} on PATH (see .ci/run)"
    return None


@pytest.fixture(scope="session")
def lab_prereqs() -> None:
    """Skip the test when this machine cannot run a lab."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)


def _down_stale_test_labs(basetemp_parent: Path) -> None:
    # A session killed with SIGKILL skips its finalizers and atexit: its lab would hold the
    # test subnet and make every later session fail. pytest keeps the old basetemps around.
    # Only labs whose session is gone: another session may be running on this machine now.
    # Under pytest-xdist a worker's basetemp is one level down (pytest-N/popen-gwK/).
    states = [*basetemp_parent.glob("pytest-*/lab*/lab.json")]
    states += basetemp_parent.glob("pytest-*/popen-gw*/lab*/lab.json")
    for state in states:
        owner = state.parent / "session.pid"
        with contextlib.suppress(OSError, ValueError):
            if Path(f"/proc/{int(owner.read_text())}").exists():
                continue
        with contextlib.suppress(Exception):
            lab_mod.lab_down(state.parent)


@pytest.fixture(scope="session")
def lab(lab_prereqs: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab_mod.LabState]:
    """A lab of 2 hosts on 10.88.200.0/24 for the session: `.hosts` (name, docker_url,
    address) tuples, `.registry` ("10.88.200.1:5000"), `.toml`, `.dir`."""
    basetemp = tmp_path_factory.getbasetemp()
    under_xdist = basetemp.name.startswith("popen-gw")
    _down_stale_test_labs(basetemp.parent.parent if under_xdist else basetemp.parent)
    lab_dir = tmp_path_factory.mktemp("lab")
    (lab_dir / "session.pid").write_text(str(os.getpid()))
    atexit.register(_quiet_down, lab_dir)  # when the session dies without finalizers
    try:
        yield lab_mod.lab_up(lab_dir, hosts=2, subnet=TEST_LAB_SUBNET)
    finally:
        lab_mod.lab_down(lab_dir)


def _quiet_down(lab_dir: Path) -> None:
    if not (lab_dir / lab_mod.STATE_FILE).exists():
        return  # the fixture's finalizer already took it down
    with contextlib.suppress(Exception):
        lab_mod.lab_down(lab_dir)


# -- the local engine -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_engine() -> Iterator[docker.DockerClient]:
    """A client of the machine's own engine; skips the test when it does not answer."""
    try:
        client = docker.DockerClient(base_url=LOCAL_DOCKER, timeout=60)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine answers at {LOCAL_DOCKER}: {exc}")
    try:
        yield client
    finally:
        client.close()


# -- git ------------------------------------------------------------------------------------

# The bare remote and working clone every git-driven test pushes through.
GitRemote = WorkRepo


@pytest.fixture
def git_remote(tmp_path: Path) -> GitRemote:
    """A fresh bare repo with a working clone, for tests that need a real remote."""
    return GitRemote(tmp_path)


# -- the sample app -------------------------------------------------------------------------


@pytest.fixture
def sample_app(tmp_path: Path) -> Callable[..., Path]:
    """`sample_app(subdir="web", content="hello v1")` writes the app's context under tmp_path."""

    def make(subdir: str = "web", content: str = "hello v1") -> Path:
        return write_sample_app(tmp_path, subdir, content)

    return make


# -- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """A throwaway PostgreSQL server for this xdist worker, stopped and removed at its end."""
    reason = pg_missing()
    if reason:  # CI installs it (.ci/setup): a missing server fails, it never hides tests
        pytest.fail(reason)
    with pg_server() as server:
        yield server


@pytest.fixture
def pg_url(pg: PgServer) -> str:
    """The URL (password included) of a new, empty database on the session's server."""
    return pg.url(pg.create_database())
