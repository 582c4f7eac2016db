"""The dashboard in a real browser, as an operator meets it: `pipeline serve` as a child process
on the lab (real hosts, registry, git pushes and webhooks), headless Chromium driven by
Selenium, a screenshot of each page under test-artifacts/screenshots/."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait
from serve_helpers import Serve, ServeProcesses, ServeProject, github_push, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(240)]

DEPLOY_DEADLINE = 60.0


@pytest.fixture(autouse=True)
def _web_only(sp: ServeProject) -> None:
    """Only the web service: one build and one rollout per pass keep the tests short."""
    sp.apps = [sp.web]
    sp.write_config()


def _secret(sp: ServeProject) -> str:
    """Give repo shop a webhook secret (in the env var the config names); return it."""
    env = f"PIPELINE_DASH_SECRET_{uuid.uuid4().hex[:8].upper()}"
    sp.env[env] = secrets.token_hex(16)
    sp.repos["shop"].secret_env = env
    sp.write_config()
    return sp.env[env]


def _change_web(sp: ServeProject, text: str) -> str:
    """Commit and push web's page saying `text`; return the commit's sha."""
    sp.project.remote.write("web/www/index.html", text)
    return sp.project.push(text)


def _deployed(sp: ServeProject, serve: ServeProcesses) -> tuple[str, Serve]:
    """The first commit deployed by `pipeline run`, then `pipeline serve` started with only
    webhooks to trigger it (no poll, no watch); return the commit and the serve process."""
    first = sp.project.initial_commit()
    res = sp.cli("run")
    assert res.returncode == 0, res.stdout + res.stderr
    return first, serve(sp, watch_repos=False)


def _text(browser: Any, css: str) -> str:
    return str(browser.find_element(By.CSS_SELECTOR, css).text)


def _submit_confirmed(browser: Any, button: str) -> None:
    """Click `button` and accept the confirmation the page asks for."""
    browser.find_element(By.CSS_SELECTOR, button).click()
    alert = WebDriverWait(browser, 5).until(expected_conditions.alert_is_present())
    alert.accept()


def _outcome(browser: Any, expected: str, timeout: float = DEPLOY_DEADLINE) -> list[str]:
    """Wait (no reload) until the live page's outcome line says `expected`; return the run's
    statuses seen on the page meanwhile."""
    seen: list[str] = []

    def look() -> bool:
        status = browser.execute_script(
            "var r = document.querySelector('#live .run'); return r && r.dataset.status;"
        )
        if status and (not seen or seen[-1] != status):
            seen.append(status)
        outcomes = browser.find_elements(By.CSS_SELECTOR, "#live .outcomes li")
        return any(expected in li.text for li in outcomes)

    wait_for(look, timeout, f"{expected!r} on the live page", every=0.1)
    return seen


def _run_status(browser: Any, expected: str) -> list[str]:
    """Wait until the live page's run shows status `expected`; return it."""
    script = "var r = document.querySelector('#live .run'); return r && r.dataset.status;"
    wait_for(lambda: browser.execute_script(script) == expected, 30, f"run {expected}")
    return [expected]


def test_overview_shows_both_hosts_the_service_its_revision_and_health(
    sp: ServeProject, serve: ServeProcesses, browser: Any, shot: Any
) -> None:
    """After `pipeline run`, Chromium at `pipeline serve`'s / shows web on lab-1 and lab-2 with
    the deployed revision, its commit subject, a running container that passed its health
    check, and the repo's head; the plan page says nothing is to do; no sideways scroll on a
    phone."""
    first, srv = _deployed(sp, serve)
    browser.set_window_size(1280, 900)
    browser.get(srv.url + "/")
    shot("overview")
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#grid thead th")]
    assert headers == ["Service", "lab-1", "lab-2"], headers
    for host in ("lab-1", "lab-2"):
        cell = _text(browser, f'#grid td[data-service="{sp.web.name}"][data-host="{host}"]')
        assert first[:12] in cell and "initial" in cell, cell
        assert "running · healthy at deploy" in cell, cell
        assert "deployed" in cell and "ago" in cell, cell
    assert _text(browser, "#grid tbody th a") == sp.web.name
    assert first[:12] in _text(browser, "#repos")
    problems = [
        e["message"]
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]
    ]
    assert problems == [], problems  # a script or style refused by the CSP, a missing asset
    browser.get(srv.url + "/plan")
    shot("plan")
    assert "Nothing to do: every service is up to date." in _text(browser, "main")
    browser.get(srv.url + "/")
    browser.set_window_size(390, 844)  # a phone
    shot("overview-phone")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400, f"the page scrolls sideways at phone width ({width}px)"
    browser.set_window_size(1280, 900)


def test_live_page_shows_a_webhook_deploys_steps_without_reload(
    sp: ServeProject, serve: ServeProcesses, browser: Any, shot: Any
) -> None:
    """A live run page opened before a webhook push shows the deploy's steps per host as they
    happen and ends on "healthy on lab-1, lab-2", without reloading."""
    secret = _secret(sp)
    first, srv = _deployed(sp, serve)
    browser.get(srv.url + "/runs/latest")
    browser.execute_script("window.notReloaded = true;")
    sha = _change_web(sp, "web v2")
    answer = github_push(srv, "shop", secret, before=first, after=sha)
    assert answer.status_code == 202, answer.text
    seen = _outcome(browser, f"{sp.web.name}: {sha[:12]} healthy on lab-1, lab-2")
    seen += _run_status(browser, "succeeded")
    shot("live-run")
    assert browser.execute_script("return window.notReloaded === true;")
    assert seen[0] == "succeeded" and "running" in seen and seen[-1] == "succeeded", seen
    for host in ("lab-1", "lab-2"):
        kinds = [
            row.get_attribute("data-kind")
            for row in browser.find_elements(By.CSS_SELECTOR, f'#live tr[data-host="{host}"]')
        ]
        assert {"pull", "start", "health"} <= set(kinds), (host, kinds)
    assert "webhook" in _text(browser, "#live h2")


def test_deploy_and_rollback_from_the_page_need_login_and_csrf(
    sp: ServeProject, serve: ServeProcesses, browser: Any, shot: Any
) -> None:
    """Deploy and rollback submitted from the service page are refused without a login and
    with a forged CSRF token (nothing queued, nothing changed); after login they deploy the
    chosen revision and roll it back on every host."""
    env = f"PIPELINE_DASH_TOKEN_{uuid.uuid4().hex[:8].upper()}"
    sp.env[env] = token = secrets.token_urlsafe(24)
    text = sp.render().replace("[server]\n", f'[server]\napi_token_env = "{env}"\n', 1)
    sp.write_config(text)
    first, srv = _deployed(sp, serve)
    v2 = _change_web(sp, "web v2")  # pushed; with no poll and no webhook nothing deploys it

    def dashboard_events() -> list[dict[str, Any]]:
        return [e for e in srv.events() if e["source"] == "dashboard"]

    browser.delete_all_cookies()
    browser.get(srv.url + f"/services/{sp.web.name}")
    browser.find_element(By.ID, "revision").send_keys(v2)
    _submit_confirmed(browser, "#deploy")
    assert "log in first" in _text(browser, "#why")
    shot("refused-without-login")

    browser.get(srv.url + f"/login?next=/services/{sp.web.name}")
    shot("login")
    browser.find_element(By.ID, "secret").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 10).until(expected_conditions.url_contains(f"/services/{sp.web.name}"))
    assert token not in browser.page_source and token not in browser.current_url
    browser.execute_script(
        "document.querySelectorAll('input[name=csrf]').forEach(i => i.value = 'forged');"
    )
    Select(browser.find_element(By.ID, "to")).select_by_index(0)
    _submit_confirmed(browser, "#rollback")
    assert "CSRF" in _text(browser, "#why")
    shot("refused-forged-csrf")
    time.sleep(0.5)
    assert dashboard_events() == []
    assert sp.serves(sp.web.port, "web v1")

    browser.get(srv.url + f"/services/{sp.web.name}")
    browser.find_element(By.ID, "revision").send_keys(v2)
    _submit_confirmed(browser, "#deploy")
    _outcome(browser, f"{sp.web.name}: {v2[:12]} healthy on lab-1, lab-2")
    shot("deployed-from-page")
    assert sp.serves(sp.web.port, "web v2")

    browser.get(srv.url + f"/services/{sp.web.name}")
    shot("service")
    Select(browser.find_element(By.ID, "to")).select_by_index(0)  # the release before
    _submit_confirmed(browser, "#rollback")
    _outcome(browser, f"{sp.web.name}: {first[:12]} healthy on lab-1, lab-2")
    assert sp.serves(sp.web.port, "web v1")
    assert [(e["kind"], e["status"]) for e in dashboard_events()] == [
        ("deploy", "done"),
        ("rollback", "done"),
    ]


def test_failed_rollout_page_shows_host_probe_result_and_log_lines(
    sp: ServeProject, serve: ServeProcesses, browser: Any, shot: Any
) -> None:
    """A rollout whose health check fails has a run page naming the failing host, the probe's
    last result (GET /health -> 404) and the container's last log lines."""
    secret = _secret(sp)
    sp.web.health = 'interval = "200ms"\ntimeout = "2s"'
    sp.write_config()
    first, srv = _deployed(sp, serve)
    remote = sp.project.remote
    (remote.work / "web" / "www" / "health").unlink()
    dockerfile = remote.work / "web" / "Dockerfile"
    dockerfile.write_text(
        dockerfile.read_text().replace(
            '"/bin/busybox httpd -f',
            '"echo web v3 starting without /health >&2; /bin/busybox httpd -f',
        )
    )
    sha = _change_web(sp, "web broken")
    assert github_push(srv, "shop", secret, before=first, after=sha).status_code == 202

    def failed() -> list[dict[str, Any]]:
        history = srv.get(f"/api/history?service={sp.web.name}")
        return [r for r in history if r["revision"] == sha and r["finished_at"]]

    (release,) = wait_for(failed, DEPLOY_DEADLINE, "the broken rollout to end")
    assert release["status"] == "rolled_back", release
    browser.get(f"{srv.url}/runs/{release['run_id']}")
    shot("failed-run")
    outcome = _text(browser, "#live .outcomes")
    assert f"{sp.web.name}: {sha[:12]} ROLLED BACK on lab-1" in outcome, outcome
    health = browser.find_element(
        By.CSS_SELECTOR, '#live tr[data-host="lab-1"][data-kind="health"] pre.error'
    ).text
    assert re.search(r"GET http://[0-9.]+:\d+/health -> 404", health), health
    assert "log lines of" in health and "web v3 starting without /health" in health, health
    browser.get(f"{srv.url}/services/{sp.web.name}")
    shot("failed-service")
    assert "web v3 starting without /health" in _text(browser, f"#r{release['id']} pre.error")
