"""Launching Debian's Chromium under Playwright, the one way every browser test does it."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, Playwright

CHROMIUM = Path("/usr/bin/chromium")
# Playwright gives every launch a fresh, temporary --user-data-dir. Without the networking
# flags Chromium keeps dialling Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


async def launch_chromium(playwright: Playwright) -> Browser:
    """Debian's Chromium (installed by scripts/install; never `playwright install`)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install (apt-get install chromium)")
    return await playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
    )
