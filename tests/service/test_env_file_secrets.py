"""A service's env_file on `pipeline serve`: its values are secrets from the moment they are
read, and a file that cannot be read fails only its own service."""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

import httpx
import pytest
from serve_helpers import ServeProcesses, ServeProject, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(240)]

# Prints the token from its env_file, then serves a directory without /health: unhealthy.
LEAKY_APP = (
    'command = ["/bin/busybox", "sh", "-c", '
    '"echo auth failed for token $API_TOKEN; exec /bin/busybox httpd -f -p 8080 -h /bin"]'
)


def test_env_file_secret_printed_by_a_failing_app_is_masked_everywhere(
    sp: ServeProject, serve: ServeProcesses
) -> None:
    """An app that prints `auth failed for token $API_TOKEN` from its env_file while failing its
    health check: the token is in no log line of the service (JSON), no `history` entry (table
    or JSON) and no API answer, while the line itself is there with `***`; another service whose
    env_file is missing fails with FILE:LINE and key, and no run is left running."""
    token = "tok-" + secrets.token_hex(16)
    (sp.config.parent / "web.env").write_text(
        f'# web\'s credentials\nexport API_TOKEN="{token}"\nLOG_LEVEL=info\n'
    )
    api_env = f"PIPELINE_E2E_API_TOKEN_{uuid.uuid4().hex[:8].upper()}"
    api_token = secrets.token_hex(16)
    sp.env[api_env] = api_token
    sp.repos["shop"].poll = "1s"
    sp.web.service_extra = f'env_file = "web.env"\n{LEAKY_APP}'
    sp.web.health = 'interval = "200ms"\ntimeout = "2s"\nmonitor = "300ms"'
    api = sp.apps[1]
    api.service_extra = 'env_file = "api.env"'  # never written
    text = sp.render().replace("[server]\n", f'[server]\napi_token_env = "{api_env}"\n', 1)
    sp.write_config(text)
    api_line = text.splitlines().index('env_file = "api.env"') + 1
    sp.project.initial_commit()
    srv = serve(sp, watch_repos=False, options=("--log-format", "json"))

    def get(path: str) -> Any:
        res = httpx.get(
            srv.url + path,
            headers={"Authorization": f"Bearer {api_token}"},
            timeout=10,
            trust_env=False,
        )
        assert res.status_code == 200, f"GET {path}: {res.status_code} {res.text}"
        assert token not in res.text, f"GET {path} leaks the env_file's token"
        return res.json()

    def rolled_back() -> list[dict[str, Any]]:
        return [r for r in get("/api/history") if r["service"] == sp.web.name and r["finished_at"]]

    (release,) = wait_for(rolled_back, 90, "web's release to end")
    assert release["status"] == "rolled_back", release
    assert "auth failed for token ***" in release["error"], release["error"]
    wait_for(lambda: all(r["status"] != "running" for r in get("/api/runs")), 30, "runs ended")
    run = get(f"/api/runs/{release['run_id']}")
    assert run["status"] == "failed", run
    assert [r["id"] for r in run["releases"]] == [release["id"]]
    missing = (
        f"{sp.config}:{api_line}: services.{api.name}.env_file: cannot read "
        f"{sp.config.parent / 'api.env'}: No such file or directory"
    )
    assert missing in run["error"], run["error"]
    for path in ("/api/status", "/api/events"):
        get(path)

    history = sp.cli("history", "--json")
    assert token not in history.stdout + history.stderr
    (entry,) = [h for h in json.loads(history.stdout) if h["service"] == sp.web.name]
    assert "auth failed for token ***" in entry["error"]
    table = sp.cli("history")
    assert table.returncode == 0 and token not in table.stdout + table.stderr

    log = srv.log()
    assert token not in log and "auth failed for token ***" in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and all(line.get("level") in {"debug", "info", "warning", "error"}
                         for line in lines), "a level word must not be masked"  # fmt: skip
