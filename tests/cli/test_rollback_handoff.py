"""`pipeline rollback` handed to a running `pipeline serve` (here a stand-in answering its
API, a double for the service whose real counterpart
`tests/deploy/test_proxy.py::test_rollback_with_serve_running_is_done_by_serve` drives): the
exit codes and the `--json` document are those of a rollback done in the command, and a
stopped wait says the rollback goes on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import stand_in_serve

CONFIG = """
[pipeline]
data_dir = "data"

[repos.app]
url = "file:///nowhere"

[images.web]
repo = "app"
context = "web"

[hosts.h]
docker = "unix:///nowhere.sock"

[services.web]
image = "web"
hosts = ["h"]
"""
OK = {"service": "web", "ok": True, "locked": False, "bad_input": False, "refused": False,
      "error": None, "releases": []}  # fmt: skip


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(CONFIG)
    return path


def _rollback(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "rollback", "web", "-c", str(config), *args],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("answer", "code", "said"),
    [
        (OK, 0, None),
        ({**OK, "ok": False, "locked": True, "error": "service:web is locked by x:1"}, 3,
         "rollback failed: service:web is locked by x:1"),
        ({**OK, "ok": False, "refused": True, "bad_input": True,
          "error": "no release r9 of web"}, 2, "no release r9 of web"),
        ({**OK, "ok": False, "error": "lab-1: health check failed"}, 1,
         "rollback failed: lab-1: health check failed"),
    ],
)  # fmt: skip
def test_a_handed_rollback_exits_and_prints_as_one_done_here(
    tmp_path: Path, answer: dict[str, object], code: int, said: str | None
) -> None:
    """The service's answer becomes the command's exit code (0, 3 locked, 2 bad `--to`, 1
    failed), its error on stderr, and the `--json` document a rollback done here prints."""
    config = _config(tmp_path)
    with stand_in_serve(config, answer):
        done = _rollback(config, "--to", "r9")
        as_json = _rollback(config, "--to", "r9", "--json")
    assert done.returncode == code, done.stderr
    if said:
        assert said in done.stderr
    assert as_json.returncode == code
    document = json.loads(as_json.stdout)
    assert document == {"service": "web", "ok": answer["ok"], "exit_code": code,
                        "error": answer["error"], "releases": []}  # fmt: skip


def test_stopping_the_wait_says_the_rollback_goes_on_in_serve(tmp_path: Path) -> None:
    """SIGTERM (or Ctrl-C) while the service rolls back ends the command with exit 1 and says
    the rollback goes on there, instead of rolling back a second time in the command."""
    config = _config(tmp_path)
    with stand_in_serve(config, OK, lines=("web: rolling back to r1",), delay=5) as got:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "rollback", "web", "-c", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        shown = [proc.stderr.readline(), proc.stderr.readline()]  # before the answer's end
        assert got, "the command never reached the service"
        assert shown[1] == "web: rolling back to r1\n", shown  # lines are shown as they come
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "goes on in pipeline serve" in err
    assert "rolling back here" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "healthz",
    [None, (501, b"<!DOCTYPE HTML><html>Unsupported method</html>")],
    ids=["stopped", "another-program"],
)
def test_a_service_that_does_not_answer_its_health_is_handed_nothing(
    tmp_path: Path, healthz: tuple[int, bytes] | None
) -> None:
    """A serve.json whose process is stopped (SIGSTOP: its port still accepts) or whose port
    another program answers gets no rollback: within about a second the command says so and
    rolls back itself."""
    config = _config(tmp_path)
    with stand_in_serve(config, OK, healthz=healthz) as got:
        began = time.monotonic()
        done = _rollback(config)
        took = time.monotonic() - began
    assert got == []  # nothing was sent to it
    assert "did not take it (not answering); rolling back here" in done.stderr, done.stderr
    assert took < 10, took
    # rolled back here: this config's host does not exist, and the command says what it found
    assert "rolling back in pipeline serve" not in done.stderr
