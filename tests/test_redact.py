"""Secrets never reach output: URL credentials and configured secret values are masked."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from pipeline import logs
from pipeline.config.load import read_secret
from pipeline.redact import redact, redact_url, url_secrets


def test_url_credentials_are_masked() -> None:
    """`https://user:token@host` prints as `https://***@host`, wherever it sits in a message."""
    text = "fetch of https://deploy:ghp_s3cr3t@git.example.com/x.git failed"
    assert redact(text) == "fetch of https://***@git.example.com/x.git failed"
    assert redact("ssh://git:pw@host/x") == "ssh://***@host/x"


def test_secret_read_from_env_is_masked_in_json_logs(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A secret read through *_env is masked in JSON log lines, even inside nested values."""
    monkeypatch.setenv("PL_TEST_REGISTRY_PASSWORD", "hunter2-registry")
    assert read_secret("PL_TEST_REGISTRY_PASSWORD") == "hunter2-registry"
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    try:
        structlog.get_logger("t").info(
            "push failed", service="web", error="auth hunter2-registry refused",
            detail={"args": ["--password", "hunter2-registry"]},
        )
    finally:
        logs.configure("console", "info")
    line = json.loads(out.getvalue().strip())
    assert line["service"] == "web" and line["event"] == "push failed"
    assert "hunter2-registry" not in out.getvalue()
    assert line["error"] == "auth *** refused"


def test_validate_errors_do_not_echo_url_credentials(tmp_path: Path) -> None:
    """A config error about a repo URL with credentials never prints the credentials."""
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text('[repos.x]\nurl = "http://bob:tok3n-value@example.com/x.git"\n')
    res = subprocess.run([sys.executable, "-m", "pipeline", "validate", "-c", str(cfg)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert "tok3n-value" not in res.stderr + res.stdout
    assert "repos.x.url" in res.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:token@host/x.git", "https://***@host/x.git"),
        ("https://ghp_abc123@github.com/o/r.git", "https://***@github.com/o/r.git"),
        ("ssh://user:pw@host:22/r.git", "ssh://***@host:22/r.git"),
        ("https://u:p@ss@host/x", "https://***@host/x"),
        ("git@github.com:o/r.git", "git@github.com:o/r.git"),
        ("https://host/path@x.git", "https://host/path@x.git"),
        (
            "fatal: 'https://a:b@h/x' and http://c:d@h/y",
            "fatal: 'https://***@h/x' and http://***@h/y",
        ),
        ("tcp://u:it's@host:2375", "tcp://***@host:2375"),
        ('{"url":"https://h/x","mail":"a@b"}', '{"url":"https://h/x","mail":"a@b"}'),
        ("https://:pw-only@host/x", "https://***@host/x"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    """redact_url hides user-info of scheme URLs and leaves scp-like and plain URLs intact."""
    assert redact_url(url) == expected


def test_url_secrets_are_the_literal_credentials_raw_and_decoded() -> None:
    """The user-info's password, user:password and their percent-decoded forms are masked
    literally; short fragments (under 4 characters) and URLs without user-info give none."""
    assert url_secrets("https://bob:p%40ss-word@h/x") == [
        "bob:p%40ss-word", "bob:p@ss-word", "p%40ss-word", "p@ss-word"
    ]
    assert url_secrets("https://ghp_token@h/x") == ["ghp_token"]
    assert url_secrets("https://h/x") == [] and url_secrets("git@h:x") == []
