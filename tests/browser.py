"""Real headless Chromium (Debian's ``chromium``, driven by Playwright) for the feed tests:
the browser fixture, the skip when Chromium is missing, and logging in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

#: ``pytestmark = needs_chromium`` in a module whose tests drive the browser
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium is not installed (make test installs it)"
)


def launch() -> Iterator[Any]:
    """A headless Chromium browser (the ``browser`` fixture of tests/conftest.py)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        # Playwright gives every launch a fresh, empty profile (--user-data-dir)
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser: Any, timeout_ms: int) -> tuple[Any, list[str]]:
    """A new page and the list that collects its script and console errors."""
    ctx = browser.new_context(viewport={"width": 1360, "height": 820})
    page = ctx.new_page()
    page.set_default_timeout(timeout_ms)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page, errors


def log_in(page: Any, url: str, username: str, password: str) -> None:
    """Open the feed, which sends an anonymous visitor to the login page, and log in."""
    page.goto(url + "/")
    assert "/login" in page.url
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
