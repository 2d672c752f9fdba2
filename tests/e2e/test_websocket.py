"""End to end: WebSockets and event streams through the gateway, and the session's end.

Real test IdP, a real WebSocket upstream that verifies each token's signature and audience,
the gateway under uvicorn with WebSockets on; the browser is the ``websockets`` client (the
gateway itself uses aiohttp's, so neither side tests itself).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import IdpFactory
from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .processes import redis_key_prefix
from .servers import API, IdpProcess, WebSocketUpstream, start_ws_upstream

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

WS = {"ws": "websockets-sansio"}  # uvicorn's `websockets` implementation is deprecated
FIVE_MIB = 5 * 1024 * 1024
SESSION_END_BOUND = 2.0  # seconds from logout to closed socket and ended stream
EVIL_ORIGIN = "https://evil.example"


def _routes(ws: WebSocketUpstream, **ws_route: Any) -> list[dict[str, Any]]:
    return [
        {
            "prefix": "/ws/",
            "upstream": ws.url,
            "audience": API,
            "scopes": ["read:orders"],
            "websocket": True,
            **ws_route,
        },
        # EventSource cannot send the anti-CSRF header: SSE routes are GET-only reads.
        {"prefix": "/events/", "upstream": ws.url, "audience": API, "csrf": False},
    ]


@pytest.fixture(scope="module")
def ws_upstream(idp: IdpProcess) -> Iterator[WebSocketUpstream]:
    with start_ws_upstream(issuer=idp.issuer, audience=API) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gw(idp: IdpProcess, ws_upstream: WebSocketUpstream) -> Iterator[GatewayUnderTest]:
    with (
        start_upstreams(idp) as upstreams,
        run_gateway(idp, upstreams, routes=_routes(ws_upstream), uvicorn_options=WS) as running,
    ):
        yield running


def ws_url(gw: GatewayUnderTest, path: str) -> str:
    return gw.base_url.replace("http://", "ws://", 1) + path


def cookie_header(gw: GatewayUnderTest, client: httpx.AsyncClient) -> str:
    name = gw.gateway.sessions.cookie_name
    return f"{name}={client.cookies[name]}"


@asynccontextmanager
async def open_ws(
    gw: GatewayUnderTest,
    path: str,
    *,
    cookie: str | None,
    origin: str | None = "",
    subprotocols: list[str] | None = None,
) -> AsyncIterator[ClientConnection]:
    headers = {"Cookie": cookie} if cookie else {}
    async with connect(
        ws_url(gw, path),
        additional_headers=headers,
        origin=gw.base_url if origin == "" else origin,  # type: ignore[arg-type]
        subprotocols=subprotocols,  # type: ignore[arg-type]
        max_size=None,
        open_timeout=10,
        close_timeout=5,
    ) as websocket:
        yield websocket


async def refused(gw: GatewayUnderTest, path: str, **options: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(gw, path, **options):
            pass
    return info.value


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait (bounded) for something another thread does; the caller asserts the outcome."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def closed_code(websocket: ClientConnection, timeout: float) -> tuple[int | None, str]:
    """Drain the socket until it closes; the close code and reason the client received."""
    async with asyncio.timeout(timeout):
        with pytest.raises(ConnectionClosed):
            while True:
                await websocket.recv()
    assert websocket.close_code is not None
    return websocket.close_code, websocket.close_reason or ""


async def test_websocket_echoes_text_and_binary_with_the_routes_token(
    gw: GatewayUnderTest, ws_upstream: WebSocketUpstream
) -> None:
    async with gw.client() as client:
        await gw.login(client)
        cookie = cookie_header(gw, client)
    before = len(ws_upstream.connections)
    async with open_ws(gw, "/ws/echo", cookie=cookie, subprotocols=["x.v0", "chat.v1"]) as ws:
        assert ws.subprotocol == "chat.v1"
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary\xff")
        assert await ws.recv() == b"\x00\x01binary\xff"
        await ws.send("héllo ✓")
        assert await ws.recv() == "héllo ✓"
    seen = ws_upstream.connections[before]
    assert seen["aud"] == API and seen["sub"] == "alice" and seen["subprotocol"] == "chat.v1"
    headers = seen["headers"]
    assert "cookie" not in headers
    assert headers["authorization"].startswith("Bearer ")
    assert headers["origin"] == gw.base_url
    assert headers["x-forwarded-host"] == gw.base_url.split("://")[1]
    await eventually(lambda: seen["close_code"] is not None)
    assert seen["close_code"] == 1000  # the browser's normal close reached the upstream


async def test_websocket_relays_a_five_mib_message_both_ways(gw: GatewayUnderTest) -> None:
    payload = bytes(range(256)) * (FIVE_MIB // 256)
    async with gw.client() as client:
        await gw.login(client)
        cookie = cookie_header(gw, client)
    async with open_ws(gw, "/ws/echo", cookie=cookie) as ws:
        started = time.perf_counter()
        await ws.send(payload)
        echoed = await ws.recv()
        elapsed = time.perf_counter() - started
        await ws.send("x" * FIVE_MIB)
        assert await ws.recv() == "x" * FIVE_MIB
    assert echoed == payload
    assert elapsed < 10


async def test_cross_origin_upgrade_is_refused_before_the_upgrade(
    gw: GatewayUnderTest, ws_upstream: WebSocketUpstream
) -> None:
    async with gw.client() as client:
        await gw.login(client)
        cookie = cookie_header(gw, client)
    before = len(ws_upstream.connections)
    evil = await refused(gw, "/ws/echo", cookie=cookie, origin=EVIL_ORIGIN)
    missing = await refused(gw, "/ws/echo", cookie=cookie, origin=None)
    for refusal in (evil, missing):
        assert refusal.response.status_code == 403
        assert json.loads(refusal.response.body or b"{}")["error"] == "csrf_failed"
    assert len(ws_upstream.connections) == before  # never reached the upstream


async def test_upgrade_without_session_is_refused_with_401_before_the_upgrade(
    gw: GatewayUnderTest, ws_upstream: WebSocketUpstream
) -> None:
    before = len(ws_upstream.connections)
    refusal = await refused(gw, "/ws/echo", cookie=None)
    forged = await refused(gw, "/ws/echo", cookie="gw_session=forged.value")
    for answer in (refusal, forged):
        assert answer.response.status_code == 401
        body = json.loads(answer.response.body or b"{}")
        assert body["error"] == "login_required" and body["login_url"].endswith("/auth/login")
    not_ws = await refused(gw, "/events/sse", cookie=None)
    assert not_ws.response.status_code == 404  # a route without `websocket: true`
    assert len(ws_upstream.connections) == before


async def test_upstream_close_code_and_reason_reach_the_browser(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        cookie = cookie_header(gw, client)
    async with open_ws(gw, "/ws/echo", cookie=cookie) as ws:
        await ws.send("close:4000:upstream says bye")
        code, reason = await closed_code(ws, timeout=5)
    assert (code, reason) == (4000, "upstream says bye")


async def test_browser_close_code_reaches_the_upstream(
    gw: GatewayUnderTest, ws_upstream: WebSocketUpstream
) -> None:
    async with gw.client() as client:
        await gw.login(client)
        cookie = cookie_header(gw, client)
    before = len(ws_upstream.connections)
    async with open_ws(gw, "/ws/echo", cookie=cookie) as ws:
        await ws.send("ping")
        assert await ws.recv() == "ping"
        await ws.close(4123, "tab closed")
    entry = ws_upstream.connections[before]
    await eventually(lambda: entry["close_code"] is not None)
    assert (entry["close_code"], entry["close_reason"]) == (4123, "tab closed")


async def _sse_events(client: httpx.AsyncClient, url: str, seen: list[str]) -> float:
    """Read an event stream until it ends; return when it ended."""
    try:
        async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    seen.append(line)
    except httpx.RemoteProtocolError:
        pass  # a truncated body ends the stream too
    return time.monotonic()


async def test_logout_in_another_tab_closes_the_socket_and_the_stream_within_2s(
    gw: GatewayUnderTest, ws_upstream: WebSocketUpstream
) -> None:
    async with gw.client() as tab_a, gw.client() as tab_b:
        await gw.login(tab_a)
        cookie = cookie_header(gw, tab_a)
        name = gw.gateway.sessions.cookie_name
        tab_b.cookies.set(name, tab_a.cookies[name])
        events: list[str] = []
        stream = asyncio.create_task(_sse_events(tab_a, "/events/sse", events))
        async with open_ws(gw, "/ws/ticks", cookie=cookie) as ws:
            assert str(await ws.recv()).startswith("tick ")
            await eventually(lambda: len(events) >= 2)  # the stream is flowing too
            assert gw.gateway.connections.count(_session_id(gw, cookie)) == 2
            logout = await tab_b.post("/auth/logout", headers=CSRF)
            logged_out = time.monotonic()
            assert logout.status_code == 200 and logout.json()["logged_out"] is True
            code, reason = await closed_code(ws, timeout=SESSION_END_BOUND)
            socket_closed = time.monotonic()
            stream_ended = await asyncio.wait_for(stream, timeout=SESSION_END_BOUND)
    assert code == 4401 and reason == "session ended"
    assert socket_closed - logged_out < SESSION_END_BOUND
    assert stream_ended - logged_out < SESSION_END_BOUND
    assert gw.gateway.connections.count(_session_id(gw, cookie)) == 0
    ticks = ws_upstream.connections[-1]
    await eventually(lambda: ticks["close_code"] is not None and ws_upstream.sse_open == 0)
    assert ticks["close_code"] == 1001  # the gateway closed the upstream side too
    assert ws_upstream.sse_open == 0


def _session_id(gw: GatewayUnderTest, cookie: str) -> str:
    session_id = gw.gateway.sessions.session_id_from_cookie(cookie)
    assert session_id is not None
    return str(session_id)


async def test_websocket_token_expiry_close_and_reconnect_policies(
    idp_factory: IdpFactory,
) -> None:
    idp = idp_factory(at_ttl=4)
    with (
        start_ws_upstream(issuer=idp.issuer, audience=API) as ws_upstream,
        start_upstreams(idp) as upstreams,
    ):
        routes = [
            *_routes(ws_upstream, websocket_token_expiry="reconnect"),
            {**_routes(ws_upstream)[0], "prefix": "/ws-close/", "websocket_token_expiry": "close"},
        ]
        with run_gateway(idp, upstreams, routes=routes, uvicorn_options=WS) as gw:
            async with gw.client() as client:
                await gw.login(client)
                cookie = cookie_header(gw, client)
            async with (
                open_ws(gw, "/ws/echo?renew", cookie=cookie) as renewing,
                open_ws(gw, "/ws-close/echo", cookie=cookie) as closing,
            ):
                opened = time.monotonic()
                code, reason = await closed_code(closing, timeout=10)
                closed_after = time.monotonic() - opened
                await renewing.send("still there?")
                assert await renewing.recv() == "still there?"
    assert (code, reason) == (4401, "access token expired")
    assert 1.0 < closed_after < 8.0
    renewed = [c for c in ws_upstream.connections if c["query"] == "renew"]
    assert len(renewed) >= 2  # a second upstream connection, with a newer token
    assert renewed[1]["exp"] > renewed[0]["exp"]
    assert renewed[0]["close_code"] == 1000


async def test_logout_on_another_instance_closes_the_socket_through_redis(
    idp: IdpProcess, ws_upstream: WebSocketUpstream
) -> None:
    with redis_key_prefix("ws") as prefix, start_upstreams(idp) as upstreams:
        shared: dict[str, Any] = {
            "routes": _routes(ws_upstream),
            "session": {"store": "redis", "redis_key_prefix": prefix},
            "uvicorn_options": WS,
        }
        with run_gateway(idp, upstreams, **shared) as a, run_gateway(idp, upstreams, **shared) as b:
            async with a.client() as tab_a, b.client() as tab_b:
                await a.login(tab_a)
                cookie = cookie_header(a, tab_a)
                name = a.gateway.sessions.cookie_name
                tab_b.cookies.set(name, tab_a.cookies[name])
                async with open_ws(a, "/ws/ticks", cookie=cookie) as ws:
                    assert str(await ws.recv()).startswith("tick ")
                    logout = await tab_b.post("/auth/logout", headers=CSRF)
                    logged_out = time.monotonic()
                    assert logout.status_code == 200 and logout.json()["logged_out"] is True
                    code, _ = await closed_code(ws, timeout=SESSION_END_BOUND)
                    assert time.monotonic() - logged_out < SESSION_END_BOUND
    assert code == 4401
