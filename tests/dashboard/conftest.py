"""Fixtures of the dashboard's browser tests: one headless Debian Chromium per module, driven by
Selenium through the system's chromedriver, and a screenshot of each page under
test-artifacts/screenshots/. Reuses the service tests' `sp` and `serve` fixtures."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_fixtures import serve, sp

__all__ = ["browser", "serve", "shot", "sp"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
# No network but loopback and the lab: nothing of Chromium's own reaches out.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A headless Chromium for the module's tests, on a fresh profile removed afterwards.
    Chromium missing is a failure, not a skip: `.ci/setup` installs it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert path.exists(), f"{path} is missing: apt-get install chromium chromium-driver"
    profile = tempfile.mkdtemp(prefix="pipeline-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def shot(browser: object, request: pytest.FixtureRequest) -> object:
    """`shot(name)`: save a screenshot of the current page as
    test-artifacts/screenshots/TEST-NAME.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    test = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)

    def take(name: str) -> Path:
        path = SCREENSHOTS / f"{test}-{name}.png"
        browser.save_screenshot(str(path))  # type: ignore[attr-defined]
        return path

    return take
