"""Headless Chromium (Debian's package) driven by Playwright, for the web UI tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots, kept after the run
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def chromium_path() -> str:
    found = os.environ.get("ZIMAGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    return found


@dataclass
class Watched:
    """What a page did that a person would notice: failed requests, error answers, console errors."""

    page: Any
    bad: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@contextmanager
def browser_page(locale: str = "en-US") -> Iterator[Watched]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 900})
            page = context.new_page()
            watched = Watched(page)
            page.on("response", lambda r: watched.bad.append((r.status, r.url)) if r.status >= 400 else None)
            page.on("requestfailed", lambda r: watched.failed.append((r.url, str(r.failure))))
            page.on("console", lambda m: watched.errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: watched.errors.append(f"page error: {e}"))
            yield watched
        finally:
            browser.close()
