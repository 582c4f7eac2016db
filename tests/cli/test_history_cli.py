"""`pipeline history`: each release with why it failed, as JSON and as a table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.state.store import State

CONFIG = """
[pipeline]
data_dir = "data"

[hosts.web-1]
docker = "tcp://10.88.0.2:2375"

[repos.shop]
url = "https://git.example.com/acme/shop.git"

[images.web]
repo = "shop"
context = "web"

[services.web]
image = "web"
hosts = ["web-1"]
"""


def _state_with_releases(tmp_path: Path) -> Path:
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    state = State.in_dir(tmp_path / "data")
    for revision, status, kind in [
        ("a" * 40, "succeeded", None),
        ("b" * 40, "rolled_back", "infrastructure"),
        ("c" * 40, "rolled_back", "unhealthy"),
    ]:
        rel = state.start_release(
            "web",
            revision,
            "sha256:x",
            "r@sha256:x",
            "h",
            kind="deploy",
            reason="test",
            run_id=None,
        )
        state.finish_release(
            rel, status, None if status == "succeeded" else "it failed", failure_kind=kind
        )  # type: ignore[arg-type]
    return config


def _history(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "history", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_history_json_carries_failure_kind(tmp_path: Path) -> None:
    """`history --json` gives each release's failure_kind, null for the one that succeeded."""
    config = _state_with_releases(tmp_path)
    result = _history(config, "web", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["revision"][0], r["status"], r["failure_kind"]) for r in rows] == [
        ("c", "rolled_back", "unhealthy"),
        ("b", "rolled_back", "infrastructure"),
        ("a", "succeeded", None),
    ]


def test_history_table_shows_failure_kind(tmp_path: Path) -> None:
    """The human table has a FAILURE_KIND column next to the status."""
    config = _state_with_releases(tmp_path)
    result = _history(config)
    assert result.returncode == 0, result.stderr
    header, *lines = (line.split() for line in result.stdout.splitlines())
    column = header.index("FAILURE_KIND")
    assert header[column - 1] == "STATUS"
    assert [line[column] for line in lines] == ["unhealthy", "infrastructure", "-"]


def test_history_of_a_name_never_seen_is_bad_input_but_a_removed_service_keeps_its_history(
    tmp_path: Path,
) -> None:
    """`history nosuch` (in neither the config nor the records) exits 2 naming the known
    services; a service since removed from the config still shows its releases."""
    config = _state_with_releases(tmp_path)
    typo = _history(config, "nosuch")
    assert typo.returncode == 2 and "unknown service 'nosuch' (known: web)" in typo.stderr
    config.write_text(CONFIG.replace("[services.web]", "[services.api]"))
    removed = _history(config, "web", "--json")
    assert removed.returncode == 0, removed.stderr
    assert len(json.loads(removed.stdout)) == 3
