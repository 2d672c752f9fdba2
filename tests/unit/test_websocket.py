"""The WebSocket handshake and relay (gateway/websocket/): refusals, the relay, its limits,
close codes and token-expiry policies.

The browser is a fake ASGI server (two queues); the upstream is a real aiohttp WebSocket server
on loopback in the same event loop; the gateway is the real endpoint on real services with a
real memory-store session, whose token broker hands out unsigned JWTs (the broker has its own
tests). Deadlines (idle, lifetime, token expiry) run on a fake clock that the tests move.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import jwt
import pytest
from aiohttp import WSMsgType, web

from gateway.authorize import Authorizer
from gateway.errors import CSRFCheckFailed
from gateway.security import check_websocket_origin
from gateway.services import Services
from gateway.settings import Settings
from gateway.websocket import WebSocketEndpoint
from gateway.websocket.relay import sendable_code, short_reason, token_times

from .conftest import API, make_settings
from .fakes import LoopbackAiohttpServer

pytestmark = pytest.mark.anyio

ORIGIN = "https://app.example.com"
TIMEOUT = 5.0


class FakeClock:
    """The relay's clock, moved by the test: ``sleep_until`` returns once ``advance`` reaches
    its deadline."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._wall = time.time()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall + (self._now - 1000.0)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (deadline, future)
        self._sleepers.append(entry)
        try:
            await future
        finally:
            self._sleepers.remove(entry)

    async def advance(self, seconds: float) -> None:
        """Move on; wake every sleeper due by then, and let them run."""
        self._now += seconds
        for due, future in list(self._sleepers):
            if due <= self._now and not future.done():
                future.set_result(None)
        for _ in range(20):  # a few loop turns: the relay reacts to its deadline
            await asyncio.sleep(0)


def fake_token(ttl: float, *, n: int = 0, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"aud": API, "sub": "alice", "iat": int(now), "exp": now + ttl, "n": n}
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


# -- the upstream: a real WebSocket server ---------------------------------------------------


class Upstream(LoopbackAiohttpServer):
    """aiohttp WebSocket server: /echo, /ticks (every 20 ms), /close (4000 "bye"), /big (2 KiB),
    /refuse (403, no upgrade)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.closes: list[tuple[int | None, str]] = []
        self.ticks_sent = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/refuse":
            return web.Response(status=403)
        ws = web.WebSocketResponse(protocols=("chat.v1",), max_msg_size=0)
        await ws.prepare(request)
        self.seen.append({"path": request.path, "headers": dict(request.headers)})
        path = request.path
        if path == "/close":
            await ws.close(code=4000, message=b"bye")
        elif path == "/big":
            await ws.send_bytes(b"x" * 2048)
        elif path == "/ticks":
            ticker = asyncio.create_task(self._tick(ws))
            try:
                await self._read(ws, echo=False)
            finally:
                ticker.cancel()
        else:
            await self._read(ws, echo=True)
        return ws

    async def _tick(self, ws: web.WebSocketResponse) -> None:
        while not ws.closed:
            await ws.send_str(f"tick {self.ticks_sent}")
            self.ticks_sent += 1
            await asyncio.sleep(0.02)

    async def _read(self, ws: web.WebSocketResponse, *, echo: bool) -> None:
        async for msg in ws:
            if echo and msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif echo and msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.closes.append((ws.close_code, ""))


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


# -- the browser: a fake ASGI server ---------------------------------------------------------


class Browser:
    def __init__(
        self,
        path: str,
        *,
        cookie: str | None,
        origin: str | None = ORIGIN,
        extension: bool = True,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        headers = [(b"host", b"app.example.com"), *extra]
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        if cookie is not None:
            headers.append((b"cookie", cookie.encode()))
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
            "subprotocols": ["chat.v1"],
            "client": ("127.0.0.1", 50000),
            "extensions": {"websocket.http.response": {}} if extension else {},
        }
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inbox.put_nowait({"type": "websocket.connect"})
        self.sent: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        return await self._inbox.get()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(dict(message))
        self._changed.set()

    def say(self, value: str | bytes) -> None:
        key = "text" if isinstance(value, str) else "bytes"
        self._inbox.put_nowait({"type": "websocket.receive", key: value})

    def leave(self, code: int, reason: str = "") -> None:
        self._inbox.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})

    async def wait_for(self, kind: str, count: int = 1) -> list[dict[str, Any]]:
        async with asyncio.timeout(TIMEOUT):
            while len(found := [m for m in self.sent if m["type"] == kind]) < count:
                self._changed.clear()
                await self._changed.wait()
        return found

    async def closed(self) -> tuple[int, str]:
        close = (await self.wait_for("websocket.close"))[0]
        return close["code"], close.get("reason", "")

    @property
    def received(self) -> list[str | bytes]:
        return [
            m.get("text") or m.get("bytes") or b""
            for m in self.sent
            if m["type"] == "websocket.send"
        ]


# -- the gateway ------------------------------------------------------------------------------


class Harness:
    def __init__(self, gateway: Services, endpoint: WebSocketEndpoint, cookie: str) -> None:
        self.gateway = gateway
        self.endpoint = endpoint
        self.clock = FakeClock()
        endpoint._clock = self.clock
        self.cookie = cookie
        self.tokens: list[str] = []
        self.ttl = 3600.0
        self.tasks: list[asyncio.Task[None]] = []

    async def access_token(self, session: Any, route: Any) -> str:
        token = fake_token(self.ttl, n=len(self.tokens), now=self.clock.wall())
        self.tokens.append(token)
        return token

    def open(self, path: str, **options: Any) -> Browser:
        browser = Browser(path, cookie=options.pop("cookie", self.cookie), **options)
        self.tasks.append(
            asyncio.create_task(self.endpoint(browser.scope, browser.receive, browser.send, path))
        )
        return browser

    @property
    def session_id(self) -> str:
        session_id = self.gateway.sessions.session_id_from_cookie(self.cookie)
        assert session_id is not None
        return session_id


def ws_settings(upstream_url: str, **route: Any) -> Settings:
    return make_settings(
        routes=[
            {
                "prefix": "/ws/",
                "upstream": upstream_url,
                "audience": API,
                "websocket": True,
                **route,
            },
            {"prefix": "/public/", "upstream": upstream_url, "auth": "none", "websocket": True},
            {"prefix": "/api/", "upstream": upstream_url, "audience": API},
            {
                "prefix": "/down/",
                "upstream": "http://127.0.0.1:9/",
                "auth": "none",
                "websocket": True,
            },
        ]
    )


async def start_harness(
    monkeypatch: pytest.MonkeyPatch, upstream: Upstream, **route: Any
) -> Harness:
    settings = ws_settings(upstream.url, **route)
    gateway = Services(settings)
    gateway.started = True  # no IdP here: the broker is replaced below
    endpoint = WebSocketEndpoint(
        routes=gateway.routes,
        authorizer=Authorizer.from_services(gateway),
        connections=gateway.connections,
        gateway_cookies=gateway.sessions.cookie_names_bytes,
        max_header_bytes=settings.limits.max_header_bytes,
        public_scheme=gateway.public_scheme,
        public_host=gateway.public_host,
        login_url=gateway.login_url,
        token_skew=settings.tokens.skew,
    )
    _, set_cookie = await gateway.sessions.create(
        sub="alice", sid=None, refresh_token="rt", id_token=None, claims={}
    )
    harness = Harness(gateway, endpoint, set_cookie.split(";")[0])
    monkeypatch.setattr(gateway.broker, "cached_token", lambda *args: None)
    monkeypatch.setattr(gateway.broker, "access_token", harness.access_token)
    return harness


@pytest.fixture
async def make_harness(monkeypatch: pytest.MonkeyPatch, upstream: Upstream) -> AsyncIterator[Any]:
    made: list[Harness] = []

    async def factory(**route: Any) -> Harness:
        harness = await start_harness(monkeypatch, upstream, **route)
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        for task in harness.tasks:
            task.cancel()
        await asyncio.gather(*harness.tasks, return_exceptions=True)
        await harness.endpoint.close()
        await harness.gateway.idp_http.aclose()


# -- pure helpers -----------------------------------------------------------------------------

SENDABLE: list[tuple[int | None, int]] = [
    (1000, 1000),
    (1001, 1001),
    (4000, 4000),
    (3000, 3000),
    (4999, 4999),
]
NOT_SENDABLE: list[tuple[int | None, int]] = [
    (1005, 1000),
    (1006, 1000),
    (1015, 1000),
    (999, 1000),
    (5000, 1000),
    (None, 1000),
]


@pytest.mark.parametrize(("code", "expected"), SENDABLE + NOT_SENDABLE)
def test_sendable_code_keeps_codes_a_close_frame_may_carry(code: Any, expected: int) -> None:
    assert sendable_code(code, 1000) == expected


def test_short_reason_fits_123_bytes_without_splitting_a_character() -> None:
    reason = short_reason("é" * 100)
    assert len(reason.encode()) <= 123 and reason == "é" * 61
    assert short_reason(None) == ""


def test_token_times_reads_jwt_claims_and_ignores_opaque_tokens() -> None:
    token = fake_token(60)
    times = token_times(token)
    assert times is not None and times[1] - times[0] == pytest.approx(60, abs=1.5)
    assert token_times("opaque-token") is None
    assert token_times(None) is None


ORIGINS = [
    (ORIGIN, True, True),
    ("https://evil.example", True, False),
    ("null", True, False),
    (None, True, False),  # a token route needs an Origin
    (None, False, True),  # a public route does not
]


@pytest.mark.parametrize(("origin", "required", "allowed"), ORIGINS)
def test_check_websocket_origin(origin: str | None, required: bool, allowed: bool) -> None:
    if allowed:
        check_websocket_origin(origin, [ORIGIN], required=required)
    else:
        with pytest.raises(CSRFCheckFailed):
            check_websocket_origin(origin, [ORIGIN], required=required)


# -- the handshake ----------------------------------------------------------------------------

REFUSALS = [
    ("/ws/echo", {"origin": "https://evil.example"}, 403, "csrf_failed"),
    ("/ws/echo", {"origin": None}, 403, "csrf_failed"),
    ("/ws/echo", {"cookie": None}, 401, "login_required"),
    ("/ws/echo", {"cookie": "gw_session=forged.sig"}, 401, "login_required"),
    ("/api/echo", {}, 404, "not_found"),
    ("/nowhere", {}, 404, "not_found"),
]


@pytest.mark.parametrize(("path", "options", "status", "error"), REFUSALS)
async def test_handshake_refused_with_http_answer_before_accept(
    make_harness: Any,
    upstream: Upstream,
    path: str,
    options: dict[str, Any],
    status: int,
    error: str,
) -> None:
    harness = await make_harness()
    browser = harness.open(path, **options)
    start = (await browser.wait_for("websocket.http.response.start"))[0]
    body = (await browser.wait_for("websocket.http.response.body"))[0]
    assert start["status"] == status and error.encode() in body["body"]
    assert not [m for m in browser.sent if m["type"] == "websocket.accept"]
    assert upstream.seen == [] and harness.tokens == []


async def test_handshake_refused_with_close_code_without_the_extension(
    make_harness: Any,
) -> None:
    harness = await make_harness()
    no_session = harness.open("/ws/echo", cookie=None, extension=False)
    cross_site = harness.open("/ws/echo", origin="https://evil.example", extension=False)
    assert (await no_session.closed())[0] == 4401
    assert (await cross_site.closed())[0] == 4403


async def test_upstream_refusing_or_unreachable_is_a_502(make_harness: Any) -> None:
    harness = await make_harness()
    refusing = harness.open("/ws/refuse")  # the upstream answers 403 instead of upgrading
    down = harness.open("/down/echo")  # nothing listens there
    for browser in (refusing, down):
        start = (await browser.wait_for("websocket.http.response.start"))[0]
        body = (await browser.wait_for("websocket.http.response.body"))[0]
        assert start["status"] == 502 and b"upstream_unavailable" in body["body"]
        assert b"Bearer" not in body["body"]


# -- the relay --------------------------------------------------------------------------------


async def test_relay_forwards_text_binary_subprotocol_and_bearer(
    make_harness: Any, upstream: Upstream
) -> None:
    harness = await make_harness()
    browser = harness.open("/ws/echo")
    accept = (await browser.wait_for("websocket.accept"))[0]
    assert accept["subprotocol"] == "chat.v1"
    browser.say("hi")
    browser.say(b"\x00\xff")
    await browser.wait_for("websocket.send", 2)
    assert browser.received == ["hi", b"\x00\xff"]
    headers = upstream.seen[0]["headers"]
    assert headers["Authorization"] == f"Bearer {harness.tokens[0]}"
    assert "Cookie" not in headers and headers["Origin"] == ORIGIN
    assert harness.gateway.connections.websockets == 1
    browser.leave(4321, "bye")
    await asyncio.wait_for(harness.tasks[0], TIMEOUT)
    assert upstream.closes == [(4321, "")]
    assert harness.gateway.connections.websockets == 0


@pytest.mark.parametrize(
    ("sent", "kept"), [(b"rid-1.a_b", True), (b"bad id!", False), (None, False)]
)
async def test_upstream_gets_a_valid_request_id(
    make_harness: Any, upstream: Upstream, sent: bytes | None, kept: bool
) -> None:
    harness = await make_harness()
    extra = ((b"x-request-id", sent),) if sent is not None else ()
    browser = harness.open("/public/echo", cookie=None, origin=None, extra=extra)
    browser.say("open")
    await browser.wait_for("websocket.send")
    request_id = upstream.seen[0]["headers"]["X-Request-ID"]
    if kept:
        assert request_id == "rid-1.a_b"
    else:
        assert len(request_id) == 32 and request_id != "bad id!"
    browser.leave(1000, "")
    await asyncio.wait_for(harness.tasks[0], TIMEOUT)


async def test_relay_passes_the_upstream_close_code(make_harness: Any) -> None:
    harness = await make_harness()
    browser = harness.open("/ws/close")
    assert await browser.closed() == (4000, "bye")


async def test_relay_public_route_needs_no_session_or_token(make_harness: Any) -> None:
    harness = await make_harness()
    browser = harness.open("/public/echo", cookie=None, origin=None)
    browser.say("open")
    await browser.wait_for("websocket.send")
    assert browser.received == ["open"] and harness.tokens == []


async def test_session_end_closes_with_4401_and_relays_no_frame_after(
    make_harness: Any, upstream: Upstream
) -> None:
    harness = await make_harness()
    browser = harness.open("/ws/ticks")
    await browser.wait_for("websocket.send", 3)
    ended = harness.gateway.connections.close_session(harness.session_id)
    relayed_at_end = len(browser.received)
    assert ended == 1
    assert await browser.closed() == (4401, "session ended")
    ticks_at_close = upstream.ticks_sent
    await asyncio.sleep(0.1)
    assert len(browser.received) == relayed_at_end  # nothing after the end
    assert upstream.ticks_sent == ticks_at_close  # the upstream side is closed too
    await asyncio.wait_for(harness.tasks[0], TIMEOUT)
    assert upstream.closes and upstream.closes[0][0] == 1001


async def test_gateway_end_session_reaches_open_websockets(make_harness: Any) -> None:
    harness = await make_harness()
    browser = harness.open("/ws/echo")
    await browser.wait_for("websocket.accept")
    await harness.gateway.end_session(harness.session_id)
    assert (await browser.closed())[0] == 4401


async def test_message_over_the_limit_closes_with_1009(
    make_harness: Any, upstream: Upstream
) -> None:
    harness = await make_harness(websocket_max_message_bytes=1024)
    browser = harness.open("/ws/echo")
    browser.say("a" * 1024)
    await browser.wait_for("websocket.send")
    browser.say(b"b" * 1025)
    assert (await browser.closed())[0] == 1009
    from_upstream = harness.open("/ws/big")  # the upstream sends 2048 bytes
    assert (await from_upstream.closed())[0] == 1009


async def test_idle_timeout_closes_with_4408(make_harness: Any) -> None:
    harness = await make_harness(websocket_idle_timeout="200ms")
    browser = harness.open("/ws/echo")
    await browser.wait_for("websocket.accept")
    for count in range(1, 4):  # activity keeps it open past the idle time
        await harness.clock.advance(0.15)
        browser.say("still here")
        await browser.wait_for("websocket.send", count)
    assert not [m for m in browser.sent if m["type"] == "websocket.close"]
    await harness.clock.advance(0.1)  # 0.1 s since the last message: still open
    assert not [m for m in browser.sent if m["type"] == "websocket.close"]
    await harness.clock.advance(0.15)
    assert (await browser.closed()) == (4408, "idle timeout")


async def test_max_lifetime_closes_with_1001(make_harness: Any) -> None:
    harness = await make_harness(websocket_max_lifetime="300ms")
    browser = harness.open("/ws/echo")
    await browser.wait_for("websocket.accept")
    await harness.clock.advance(0.25)
    assert not [m for m in browser.sent if m["type"] == "websocket.close"]
    await harness.clock.advance(0.1)
    code, reason = await browser.closed()
    assert (code, reason) == (1001, "maximum connection lifetime reached")


async def test_token_expiry_keep_leaves_the_connection_open(make_harness: Any) -> None:
    harness = await make_harness()
    harness.ttl = 0.3
    browser = harness.open("/ws/echo")
    await browser.wait_for("websocket.accept")
    await harness.clock.advance(0.6)
    browser.say("after expiry")
    await browser.wait_for("websocket.send")
    assert not [m for m in browser.sent if m["type"] == "websocket.close"]


async def test_token_expiry_close_closes_with_4401(make_harness: Any) -> None:
    harness = await make_harness(websocket_token_expiry="close")
    harness.ttl = 0.5
    browser = harness.open("/ws/echo")
    await browser.wait_for("websocket.accept")
    await harness.clock.advance(0.4)
    assert not [m for m in browser.sent if m["type"] == "websocket.close"]
    await harness.clock.advance(0.2)
    assert await browser.closed() == (4401, "access token expired")


async def test_token_expiry_reconnect_swaps_in_a_fresh_upstream(
    make_harness: Any, upstream: Upstream
) -> None:
    harness = await make_harness(websocket_token_expiry="reconnect")
    harness.ttl = 1.0  # due for refresh at half its life
    browser = harness.open("/ws/echo")
    await browser.wait_for("websocket.accept")
    await harness.clock.advance(0.6)
    async with asyncio.timeout(TIMEOUT):
        while len(upstream.seen) < 2:
            await asyncio.sleep(0.01)
    browser.say("on the new connection")
    await browser.wait_for("websocket.send")
    assert browser.received == ["on the new connection"]
    assert upstream.seen[1]["headers"]["Authorization"] == f"Bearer {harness.tokens[1]}"
    async with asyncio.timeout(TIMEOUT):
        while not upstream.closes:
            await asyncio.sleep(0.01)
    assert upstream.closes[0][0] == 1000  # the old upstream connection, closed normally
    assert not [m for m in browser.sent if m["type"] == "websocket.close"]


async def test_relay_cancelled_by_the_server_closes_both_sides_with_1001(
    make_harness: Any, upstream: Upstream
) -> None:
    harness = await make_harness()
    browser = harness.open("/ws/echo")
    await browser.wait_for("websocket.accept")
    harness.tasks[0].cancel()
    assert await browser.closed() == (1001, "going away")
    with pytest.raises(asyncio.CancelledError):
        await harness.tasks[0]
    async with asyncio.timeout(TIMEOUT):
        while not upstream.closes:
            await asyncio.sleep(0.01)
    assert upstream.closes[0][0] == 1001
    assert harness.gateway.connections.websockets == 0
