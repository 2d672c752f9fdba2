"""A real browser's WebSocket through the gateway: Debian's Chromium (driven by Playwright) logs
in at the test IdP, opens ``new WebSocket(...)`` from a page of the gateway's origin, exchanges
text and binary messages with a token-checking upstream, sees an upstream close code, and sees
its socket closed with 4401 when another tab logs out.

Chromium comes from apt (scripts/install), never from ``playwright install``; without it this
test fails rather than skips.
"""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Page, async_playwright

from .browser import TIMEOUT_MS, launch_chromium
from .gateway_harness import run_gateway, start_upstreams
from .servers import API, IdpProcess, start_ws_upstream

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

USER = "alice"

# Runs in the page: open a socket, echo text and binary, then ask the upstream to close.
EXCHANGE_JS = """
async (url) => {
  const ws = new WebSocket(url, ["chat.v1"]);
  ws.binaryType = "arraybuffer";
  const messages = [];
  let waiting = null;
  ws.onmessage = (event) => {
    messages.push(event.data);
    if (waiting) { const resolve = waiting; waiting = null; resolve(); }
  };
  const next = async () => {
    if (!messages.length) await new Promise((resolve) => { waiting = resolve; });
    return messages.shift();
  };
  const closed = new Promise((resolve) => {
    ws.onclose = (event) => resolve([event.code, event.reason]);
  });
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("the WebSocket did not open"));
  });
  ws.send("hello from chromium");
  const text = await next();
  ws.send(new Uint8Array([0, 1, 2, 254, 255]));
  const binary = Array.from(new Uint8Array(await next()));
  const protocol = ws.protocol;
  ws.send("close:4000:upstream done");
  return {text, binary, protocol, close: await closed};
}
"""

# Runs in the page: open a socket to the ticking upstream and keep it for later.
OPEN_TICKS_JS = """
async (url) => {
  const ws = new WebSocket(url);
  window.ticks = 0;
  window.ticksClosed = new Promise((resolve) => {
    ws.onclose = (event) => resolve([event.code, event.reason, window.ticks]);
  });
  ws.onmessage = () => { window.ticks += 1; };
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("the WebSocket did not open"));
  });
  while (window.ticks < 2) await new Promise((resolve) => setTimeout(resolve, 20));
  return window.ticks;
}
"""

LOGOUT_JS = """
async () => {
  const response = await fetch("/auth/logout", {method: "POST", headers: {"X-CSRF": "1"}});
  return response.status;
}
"""


async def login(page: Page, base_url: str, idp: IdpProcess) -> None:
    await page.goto(f"{base_url}/auth/login?return_to=/public/page")
    await page.wait_for_url(f"{idp.issuer}/**")
    await page.fill("input[name=login]", USER)
    await page.fill("input[name=password]", "any-password")
    await page.get_by_role("button", name="Sign-in").click()
    await page.get_by_role("button", name="Continue").click()
    await page.wait_for_url(f"{base_url}/public/page")


async def test_chromium_websocket_through_the_gateway(idp: IdpProcess) -> None:
    with (
        start_ws_upstream(issuer=idp.issuer, audience=API) as ws_upstream,
        start_upstreams(idp) as upstreams,
    ):
        routes: list[dict[str, Any]] = [
            {
                "prefix": "/ws/",
                "upstream": ws_upstream.url,
                "audience": API,
                "scopes": ["read:orders"],
                "websocket": True,
            },
            {"prefix": "/public/", "upstream": upstreams["public"].url, "auth": "none"},
        ]
        with run_gateway(
            idp, upstreams, routes=routes, uvicorn_options={"ws": "websockets-sansio"}
        ) as gw:
            ws_base = gw.base_url.replace("http://", "ws://", 1)
            async with async_playwright() as playwright:
                browser = await launch_chromium(playwright)
                try:
                    context = await browser.new_context()
                    tab = await context.new_page()
                    tab.set_default_timeout(TIMEOUT_MS)
                    await login(tab, gw.base_url, idp)
                    exchanged = await tab.evaluate(EXCHANGE_JS, f"{ws_base}/ws/echo")
                    ticks_before = await tab.evaluate(OPEN_TICKS_JS, f"{ws_base}/ws/ticks")
                    other_tab = await context.new_page()
                    await other_tab.goto(f"{gw.base_url}/public/other")
                    logout_status = await other_tab.evaluate(LOGOUT_JS)
                    code, reason, _ = await tab.evaluate("window.ticksClosed")
                finally:
                    await browser.close()
    assert exchanged["text"] == "hello from chromium"
    assert exchanged["binary"] == [0, 1, 2, 254, 255]
    assert exchanged["protocol"] == "chat.v1"
    assert exchanged["close"] == [4000, "upstream done"]
    assert ticks_before >= 2 and logout_status == 200
    assert (code, reason) == (4401, "session ended")
    echo, ticks = ws_upstream.connections[0], ws_upstream.connections[1]
    assert echo["aud"] == API and echo["sub"] == USER and echo["subprotocol"] == "chat.v1"
    assert echo["headers"]["origin"] == gw.base_url and "cookie" not in echo["headers"]
    assert ticks["path"] == "/ticks"
