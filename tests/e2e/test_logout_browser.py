"""Logout and HTML injection, in a real browser (adversarial review, item 3): Debian's Chromium,
driven by Playwright, logs in at the test IdP and opens a page of the gateway's own origin
whose HTML holds ``<img src="/auth/logout">`` (what a markdown image or an avatar URL becomes).
The image load must not end the session; following a logout link on the same page must.

Chromium comes from apt (scripts/install), never from ``playwright install``; without it this
test fails rather than skips.
"""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Page, async_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from .browser import TIMEOUT_MS, launch_chromium
from .gateway_harness import run_gateway, start_upstreams
from .servers import IdpProcess, run_asgi

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

USER = "alice"

# An upstream page with injected HTML: an image pointing at the logout endpoint, and a real
# logout link (a top-level navigation the user asks for).
INJECTED_PAGE = """<!doctype html>
<html><head><title>comments</title></head><body>
<p>A comment with an "image":</p>
<img id="injected" src="/auth/logout" alt="">
<a id="logout" href="/auth/logout">Log out</a>
</body></html>
"""

# Runs in the page: wait until the injected image's request has ended (it is no image, so it
# errors either way), then ask the gateway whether the session is still there.
IMAGE_THEN_ME_JS = """
async () => {
  const img = document.getElementById("injected");
  if (!img.complete) {
    await new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; });
  }
  const me = await fetch("/auth/me");
  return me.status;
}
"""


def page_server() -> Starlette:
    async def page(request: Request) -> Response:
        return HTMLResponse(INJECTED_PAGE)

    return Starlette(routes=[Route("/comments", page)])


async def login(page: Page, base_url: str, idp: IdpProcess) -> None:
    await page.goto(f"{base_url}/auth/login?return_to=/pages/comments")
    await page.wait_for_url(f"{idp.issuer}/**")
    await page.fill("input[name=login]", USER)
    await page.fill("input[name=password]", "any-password")
    await page.get_by_role("button", name="Sign-in").click()
    await page.get_by_role("button", name="Continue").click()
    await page.wait_for_url(f"{base_url}/pages/comments")


async def test_chromium_injected_logout_image_keeps_the_session_a_logout_link_ends_it(
    idp: IdpProcess,
) -> None:
    with start_upstreams(idp) as upstreams, run_asgi(page_server()) as pages_url:
        routes: list[dict[str, Any]] = [
            {"prefix": "/pages/", "upstream": pages_url + "/", "auth": "none"},
        ]
        with run_gateway(idp, upstreams, routes=routes) as gw:
            async with async_playwright() as playwright:
                browser = await launch_chromium(playwright)
                try:
                    page = await browser.new_page()
                    page.set_default_timeout(TIMEOUT_MS)
                    logout_requests: list[dict[str, str]] = []
                    page.on(
                        "request",
                        lambda request: (
                            logout_requests.append(request.headers)
                            if request.url == f"{gw.base_url}/auth/logout"
                            else None
                        ),
                    )
                    await login(page, gw.base_url, idp)
                    idp.reset_stats()
                    me_after_image = await page.evaluate(IMAGE_THEN_ME_JS)
                    # Before the fix the image's GET (Sec-Fetch-Site: same-origin) was taken
                    # for a logout: the refresh token was revoked and /auth/me answered 401.
                    assert me_after_image == 200
                    assert idp.stats()["revocations"] == 0
                    # The user clicks the logout link: the gateway ends the session, the IdP
                    # asks to confirm, then sends the browser back to the gateway.
                    await page.click("#logout")
                    await page.get_by_role("button", name="Yes, sign me out").click()
                    await page.wait_for_url(f"{gw.base_url}/")
                    # The browser's cookies, asked from outside the page: the gateway's own
                    # pages forbid scripts their fetch() (CSP default-src 'none').
                    me_after_link = (await page.request.get(f"{gw.base_url}/auth/me")).status
                finally:
                    await browser.close()
    assert me_after_link == 401
    assert idp.stats()["revocations"] == 1
    assert len(logout_requests) == 2  # the image's request, then the link's navigation
