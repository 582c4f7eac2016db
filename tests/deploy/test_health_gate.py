"""The health gate on the lab: a revision whose container crashes never counts as healthy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from deploy_helpers import TEST_MONITOR, Project

from pipeline.lab.sample_app import APP_PORT

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# The sample app's Dockerfile with another CMD: a revision that serves a while, then crashes.
_FROM = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www/ /www/\n"
SERVES_THEN_EXITS = _FROM + (
    'CMD ["/bin/busybox", "sh", "-c", '
    f'"/bin/busybox httpd -f -p {APP_PORT} -h /www & /bin/busybox sleep 2; exit 1"]\n'
)
FATAL_AT_ONCE = _FROM + (
    'CMD ["/bin/busybox", "sh", "-c", "echo \'FATAL: DATABASE_URL is not set\' >&2; exit 1"]\n'
)


def _history(project: Project) -> list[dict[str, Any]]:
    return list(json.loads(project.cli("history", project.web, "--json").stdout))


def test_crash_loop_without_health_table_is_rolled_back(project: Project) -> None:
    """A revision that exits 1 two seconds after start, with no [health] table and the default
    restart policy, fails `pipeline run`, is recorded rolled_back, and v1 serves on both hosts."""
    # v1 goes out quickly (a short window); the broken revision meets the defaults.
    project.write_config(web_health=f'[services.{project.web}.health]\nmonitor = "{TEST_MONITOR}"')
    project.initial_commit()
    assert project.run().ok
    project.write_config(web_health="")
    project.remote.write("web/Dockerfile", SERVES_THEN_EXITS)
    project.remote.write("web/www/index.html", "web crashing")
    project.push("serve, then crash after 2 s")
    res = project.cli("run")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "crashed" in res.stderr and "code 1" in res.stderr, res.stderr
    for i in range(2):
        assert project.get(i, project.web_port) == "web v1"
    latest = _history(project)[0]
    assert latest["status"] == "rolled_back", latest
    # The failed revision is not retried until a newer commit arrives.
    again = project.run()
    assert again.ok and not again.rollouts


@pytest.mark.parametrize(
    ("restart", "health"),
    [
        ('restart = "no"', 'http = "/health"'),
        ("", f"tcp = {APP_PORT}"),  # the default restart policy, unless-stopped
    ],
    ids=["restart-no-http", "default-restart-tcp"],
)
def test_app_that_dies_at_once_shows_its_fatal_line(
    project: Project, restart: str, health: str
) -> None:
    """An app that prints a FATAL line and exits 1 at once fails the run with that line and its
    exit code in the error (not "port not published"); the previous revision serves on both
    hosts."""
    web_health = (
        f'[services.{project.web}.health]\n{health}\ninterval = "200ms"\ntimeout = "10s"\n'
        f'monitor = "{TEST_MONITOR}"'
    )
    project.write_config(web=restart, web_health=web_health)
    project.initial_commit()
    assert project.run().ok
    project.remote.write("web/Dockerfile", FATAL_AT_ONCE)
    project.remote.write("web/www/index.html", "web fatal")
    project.push("needs DATABASE_URL")
    res = project.cli("run")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FATAL: DATABASE_URL is not set" in res.stderr, res.stderr
    assert "exit code 1" in res.stderr, res.stderr
    assert "not published" not in res.stderr, res.stderr
    for i in range(2):
        assert project.get(i, project.web_port) == "web v1"
    latest = _history(project)[0]
    assert latest["status"] == "rolled_back", latest
    assert "FATAL: DATABASE_URL is not set" in latest["error"]
