"""A real headless browser for the inspector page: Debian's `chromium`, driven by Playwright for Python.

Nothing is downloaded: Playwright launches the system binary (`playwright install` is never run). Without it, a
developer's run skips the page tests with a loud reason; CI (`.ci/run` installs the package and sets
MEMORY_PROXY_REQUIRE_BROWSER=1) fails instead, so a green CI always means the page was driven.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = os.environ.get("MEMORY_PROXY_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("MEMORY_PROXY_REQUIRE_BROWSER") == "1"
# No network of its own (updates, safe browsing, QUIC probes, sync): the page may reach only the proxy.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """The browser binary, or a skip (a failure when MEMORY_PROXY_REQUIRE_BROWSER=1) naming how to get it."""
    found = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if found:
        return found
    reason = (f"NO BROWSER: {CHROMIUM} not found, the inspector page is NOT tested. Install Debian's chromium "
              "(apt-get install -y chromium) or set MEMORY_PROXY_CHROMIUM to a Chromium binary.")
    if REQUIRED:
        pytest.fail(reason + " MEMORY_PROXY_REQUIRE_BROWSER=1 makes this a failure.", pytrace=False)
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium with a fresh profile (Playwright gives each launch a new temporary user-data-dir)."""
    path = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
