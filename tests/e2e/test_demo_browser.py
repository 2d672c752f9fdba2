"""The demo in a real browser: Debian's Chromium driven by Playwright through login, the three
API buttons and logout, against the test IdP, the demo APIs and the gateway on loopback.

The stack is the one scripts/demo starts (config/demo.yaml, demo/apis.py, demo/web), on
ephemeral ports. Chromium comes from apt (scripts/install), never from ``playwright install``;
without it this test fails rather than skips.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright, expect

from demo.apis import DEMO_APIS, create_api
from demo.run import demo_settings
from gateway import create_app

from .browser import TIMEOUT_MS, launch_chromium
from .servers import API, BILLING, CLIENT_SECRET, IdpProcess, reserve_socket, run_asgi

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
USER = "alice"


@contextlib.contextmanager
def demo_stack(idp: IdpProcess) -> Iterator[str]:
    """The demo APIs and the gateway (config/demo.yaml) on ephemeral ports; yields its URL."""
    with contextlib.ExitStack() as stack:
        upstreams = {
            api.name: stack.enter_context(
                run_asgi(create_api(api.name, issuer=idp.issuer, audience=api.audience))
            )
            + "/"
            for api in DEMO_APIS
        }
        sock = reserve_socket()
        public_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = demo_settings(
            public_url=public_url,
            issuer=idp.issuer,
            upstreams=upstreams,
            client_secret=CLIENT_SECRET,
        )
        yield stack.enter_context(run_asgi(create_app(settings), sock=sock, proxy_headers=False))


async def call_api(page: Page, name: str) -> dict[str, Any]:
    """Press "Call <name> API"; return the JSON the page shows once the call is done."""
    await page.get_by_role("button", name=f"Call {name} API").click()
    verdict = page.locator(f"#verdict-{name}")
    await expect(verdict).to_contain_text("HTTP ", timeout=TIMEOUT_MS)
    shown: dict[str, Any] = json.loads(await page.locator(f"#result-{name}").inner_text())
    return shown


async def test_demo_page_login_call_each_api_logout_in_chromium(idp: IdpProcess) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with demo_stack(idp) as base_url:
        async with async_playwright() as playwright:
            browser = await launch_chromium(playwright)
            page = await browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            # Script errors and CSP refusals; the expected 401/403 answers log "Failed to load".
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
            page.on(
                "console",
                lambda msg: (
                    problems.append(f"{msg.type}: {msg.text}")
                    if msg.type == "error" and not msg.text.startswith("Failed to load resource")
                    else None
                ),
            )
            try:
                await page.goto(f"{base_url}/")
                await expect(page.locator("body")).to_have_attribute("data-session", "out")
                await expect(page.locator("#status")).to_contain_text("Not logged in")
                assert (await call_api(page, "orders"))["error"] == "login_required"

                # Log in at the IdP (dev interactions: any login and password), then consent.
                await page.get_by_role("link", name="Log in").click()
                await page.wait_for_url(f"{idp.issuer}/**")
                await page.fill("input[name=login]", USER)
                await page.fill("input[name=password]", "any-password")
                await page.get_by_role("button", name="Sign-in").click()
                await page.get_by_role("button", name="Continue").click()
                await page.wait_for_url(f"{base_url}/")
                await expect(page.locator("body")).to_have_attribute("data-session", "in")
                await expect(page.locator("#status")).to_contain_text(f"sub {USER}")

                orders = await call_api(page, "orders")
                billing = await call_api(page, "billing")
                outside = await call_api(page, "outside")
                await expect(page.locator("#verdict-orders")).to_contain_text(f"aud {API}")
                await expect(page.locator("#verdict-billing")).to_contain_text(f"aud {BILLING}")
                await expect(page.locator("#verdict-outside")).to_contain_text("HTTP 403")
                await page.screenshot(path=str(ARTIFACTS / "demo-page.png"), full_page=True)

                assert orders["api"] == "orders" and orders["aud"] == API, orders
                assert orders["sub"] == USER and "read:orders" in orders["scope"].split()
                assert orders["path"] == "/whoami"
                assert billing["api"] == "billing" and billing["aud"] == BILLING, billing
                assert "read:invoices" in billing["scope"].split()
                assert outside["error"] == "audience_not_permitted", outside

                # Log out: the gateway ends the session, the IdP asks to confirm, then back here.
                await page.get_by_role("button", name="Log out").click()
                await page.get_by_role("button", name="Yes, sign me out").click()
                await page.wait_for_url(f"{base_url}/")
                await expect(page.locator("body")).to_have_attribute("data-session", "out")
                assert (await call_api(page, "billing"))["error"] == "login_required"
                assert problems == []
            except BaseException:
                # Best effort: a screenshot that times out must not hide the failure itself.
                with contextlib.suppress(Exception):
                    await page.screenshot(
                        path=str(ARTIFACTS / "demo-failure.png"), full_page=True, timeout=5000
                    )
                raise
            finally:
                await browser.close()
