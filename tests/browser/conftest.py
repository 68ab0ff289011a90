"""Headless Chromium for the page tests: Debian's ``chromium``, driven by Playwright.

Playwright's own browser download is never used (``executable_path`` is the system
browser). Without ``/usr/bin/chromium`` or the ``playwright`` package the tests skip,
saying why; CI installs both (``.ci/run``, the dev extra).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).parents[2] / "artifacts"
WAIT_MS = 30_000  # the longest any step waits for the page (Kafka round trips included)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package "
                    "(`apt-get install -y chromium`) to run the browser tests")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is missing (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Any]:
    """Factory of pages in fresh contexts (UTC clock, a phone or desktop viewport)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    contexts: list[Any] = []
    problems: list[str] = []

    def make(width: int = 1280, height: int = 900) -> Any:
        ctx = browser.new_context(viewport={"width": width, "height": height},
                                  timezone_id="UTC", locale="en-US")
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and not _expected(msg.text)
                and problems.append(f"console error: {msg.text}"))
        return page

    yield make
    for ctx in contexts:
        ctx.close()
    assert not problems, problems  # a script error fails the test that caused it


def _expected(text: str) -> bool:
    # Chromium logs every 4xx/5xx answer as a console error; the tests cause some on purpose.
    return "Failed to load resource" in text


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
