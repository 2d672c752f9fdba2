"""An upstream's 401, through the proxy and the WebSocket handshake (respx for the IdP).

``Bearer error="invalid_token"``: the request goes once more with a new token, when its body
can be sent again (none, or read whole and at most 64 KiB); never a streamed body, never twice;
counted per route. ``Bearer error="insufficient_user_authentication"`` (RFC 9470) on a user's
token: ``401 step_up_required`` whose login asks for what the upstream named (a navigation is
redirected there). Any other 401 is the upstream's answer, relayed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import respx
from aiohttp import web
from prometheus_client import generate_latest
from starlette.applications import Starlette

from gateway import create_app
from gateway.errors import IdentityProviderUnavailable
from gateway.proxy import UpstreamResponse
from gateway.routing import Route

from .conftest import API, DISCOVERY, access_token, make_settings
from .fakes import LoopbackAiohttpServer
from .test_tokens import Harness as TokensHarness
from .test_tokens import h
from .test_websocket import TIMEOUT, Browser

pytestmark = pytest.mark.anyio
__all__ = ["h"]  # the TokenBroker fixture of test_tokens

TOKEN_URL = str(DISCOVERY["token_endpoint"])
ORIGIN = "https://app.example.com"
INVALID_TOKEN = 'Bearer realm="api", error="invalid_token", error_description="revoked"'
STEP_UP = (
    'Bearer error="insufficient_user_authentication", '
    'error_description="A different authentication level is required", '
    'acr_values="urn:mfa urn:hw", max_age="300"'
)


@dataclass
class Sent:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes | None

    @property
    def bearer(self) -> str | None:
        values = [v for k, v in self.headers if k.lower() == "authorization"]
        assert len(values) <= 1
        return values[0].removeprefix("Bearer ") if values else None


@dataclass
class ScriptedUpstream:
    """An UpstreamClient answering each request with the next scripted (status, headers);
    200 ``ok`` once the script is done. Records every request with its whole body."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    closed: int = 0

    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        *,
        timeout: float,
        route: str,
    ) -> UpstreamResponse:
        data = None if body is None else b"".join([chunk async for chunk in body])
        self.sent.append(Sent(method, url, list(headers), data))
        status, extra = self.script.pop(0) if self.script else (200, {})
        payload = b'{"error":"nope"}' if status != 200 else b"ok"
        answer = [(k.encode(), v.encode()) for k, v in extra.items()]
        answer.append((b"Content-Length", str(len(payload)).encode()))

        async def chunks() -> AsyncIterator[bytes]:
            yield payload

        return UpstreamResponse(status, tuple(answer), chunks(), close=self._close)

    def _close(self) -> None:
        self.closed += 1

    async def close(self) -> None:
        return None


class Issuer:
    """The token endpoint: a new token on every exchange (refresh or client credentials)."""

    def __init__(self) -> None:
        self.minted: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        sub = "client@clients" if form["grant_type"] == ["client_credentials"] else "auth0|alice"
        token = access_token(API, scope="read:orders", sub=sub, jti=f"t{len(self.minted)}")
        self.minted.append(token)
        return httpx.Response(200, json={"access_token": token, "expires_in": 600})


@pytest.fixture
def issuer(idp: respx.MockRouter) -> Iterator[Issuer]:
    minting = Issuer()
    idp.post(TOKEN_URL).mock(side_effect=minting)
    yield minting


def _settings(upstream_url: str = "http://127.0.0.1:9/", **limits: Any) -> Any:
    route = {"upstream": upstream_url, "websocket": True}
    return make_settings(
        routes=[
            {"prefix": "/api/", "audience": API, "scopes": ["read:orders"], **route},
            {"prefix": "/client/", "auth": "client", "audience": API, **route},
            {"prefix": "/maybe/", "auth": "user_or_none", "audience": API, **route},
        ],
        csrf={"allowed_origins": [ORIGIN]},
        limits=limits or {},
    )


@dataclass
class Gateway:
    app: Starlette
    client: httpx.AsyncClient
    upstream: ScriptedUpstream
    cookie: str

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Cookie": self.cookie, "X-CSRF": "1", "Origin": ORIGIN, **extra}

    def retries(self, route: str) -> float:
        text = generate_latest(self.app.state.services.metrics.registry).decode()
        prefix = f'gateway_token_retries_total{{route="{route}"}} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].removeprefix(prefix)) if lines else 0.0


@asynccontextmanager
async def gateway_with(upstream: ScriptedUpstream, **limits: Any) -> AsyncIterator[Gateway]:
    app = create_app(_settings(**limits), upstream=upstream)
    async with app.router.lifespan_context(app):
        _, set_cookie = await app.state.services.sessions.create(
            sub="auth0|alice", sid=None, refresh_token="rt", id_token=None, claims={}
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
            yield Gateway(app, client, upstream, set_cookie.split(";")[0])


async def test_invalid_token_is_retried_once_with_a_new_token(issuer: Issuer) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": INVALID_TOKEN})])
    async with gateway_with(upstream) as gw:
        response = await gw.client.get("/api/orders?x=1", headers=gw.headers())
        assert response.status_code == 200 and response.text == "ok"
        assert gw.retries("api") == 1
        first, second = upstream.sent
        assert first.bearer == issuer.minted[0] and second.bearer == issuer.minted[1]
        assert first.url == second.url and first.method == second.method == "GET"
        others = [(k, v) for k, v in first.headers if k != "authorization"]
        assert others == [(k, v) for k, v in second.headers if k != "authorization"]
        assert upstream.closed >= 1  # the refused answer was released
        # The new token is the one cached: the next request uses it, no exchange.
        assert (await gw.client.get("/api/orders", headers=gw.headers())).status_code == 200
        assert upstream.sent[-1].bearer == issuer.minted[1] and len(issuer.minted) == 2


async def test_a_small_buffered_body_is_sent_again_whole(issuer: Issuer) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": INVALID_TOKEN})])
    body = json.dumps({"items": list(range(2000))}).encode()
    async with gateway_with(upstream) as gw:
        response = await gw.client.post("/api/orders", content=body, headers=gw.headers())
        assert response.status_code == 200
        assert gw.retries("api") == 1
    assert [s.body for s in upstream.sent] == [body, body]
    assert upstream.sent[0].bearer != upstream.sent[1].bearer


async def _streamed(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


@pytest.mark.parametrize(
    ("size", "limits", "streamed"),
    [
        (5_000, {}, True),  # chunked: read as it comes
        (70_000, {}, False),  # declared, over what is read whole (64 KiB)
        (70_000, {"buffered_body_bytes": 200_000}, False),  # read whole, but over 64 KiB
    ],
    ids=["chunked", "streamed", "buffered-over-64KiB"],
)
async def test_a_body_that_cannot_be_sent_again_is_not_retried(
    issuer: Issuer, size: int, limits: dict[str, int], streamed: bool
) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": INVALID_TOKEN})])
    body = b"x" * size
    async with gateway_with(upstream, **limits) as gw:
        content: Any = _streamed(body) if streamed else body
        response = await gw.client.post("/api/orders", content=content, headers=gw.headers())
        assert gw.retries("api") == 0
    assert response.status_code == 401  # the upstream's answer, relayed
    assert response.headers["www-authenticate"] == INVALID_TOKEN
    assert response.json() == {"error": "nope"}
    assert len(upstream.sent) == 1 and upstream.sent[0].body == body
    assert len(issuer.minted) == 1


async def test_never_a_second_retry(issuer: Issuer) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": INVALID_TOKEN})] * 3)
    async with gateway_with(upstream) as gw:
        response = await gw.client.get("/api/orders", headers=gw.headers())
        assert gw.retries("api") == 1
    assert response.status_code == 401 and response.headers["www-authenticate"] == INVALID_TOKEN
    assert len(upstream.sent) == 2 and len(issuer.minted) == 2


@pytest.mark.parametrize(
    "challenge",
    [
        None,
        'Bearer error="insufficient_scope", scope="write:orders"',
        'Basic realm="api"',
        "Bearer",
        # RFC 9470 naming neither acr_values nor max_age: a login would change nothing.
        'Bearer error="insufficient_user_authentication"',
    ],
)
async def test_other_401s_are_relayed_as_they_are(issuer: Issuer, challenge: str | None) -> None:
    upstream = ScriptedUpstream(
        [(401, {} if challenge is None else {"WWW-Authenticate": challenge})]
    )
    async with gateway_with(upstream) as gw:
        response = await gw.client.get("/api/orders", headers=gw.headers())
        assert gw.retries("api") == 0
    assert response.status_code == 401 and response.json() == {"error": "nope"}
    assert response.headers.get("www-authenticate") == challenge
    assert len(upstream.sent) == 1


async def test_a_client_token_is_renewed_too(issuer: Issuer) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": INVALID_TOKEN})])
    async with gateway_with(upstream) as gw:
        response = await gw.client.get("/client/x")  # no session, no anti-CSRF proof
        assert response.status_code == 200
        assert gw.retries("client") == 1
        assert gw.app.state.services.client_tokens.exchanges == 2
    first, second = upstream.sent
    assert first.bearer == issuer.minted[0] and second.bearer == issuer.minted[1]
    claims = jwt.decode(second.bearer or "", options={"verify_signature": False})
    assert claims["sub"] == "client@clients"


async def test_user_or_none_without_a_session_has_no_token_to_renew(issuer: Issuer) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": INVALID_TOKEN})])
    async with gateway_with(upstream) as gw:
        response = await gw.client.get("/maybe/x")
        assert gw.retries("maybe") == 0
    assert response.status_code == 401 and len(upstream.sent) == 1
    assert upstream.sent[0].bearer is None and issuer.minted == []


async def test_concurrent_refused_requests_share_one_new_token(
    issuer: Issuer, idp: respx.MockRouter
) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return issuer(request)

    idp.post(TOKEN_URL).mock(side_effect=slow)
    upstream = ScriptedUpstream()
    async with gateway_with(upstream) as gw:
        assert (await gw.client.get("/api/warm", headers=gw.headers())).status_code == 200
        upstream.script = [(401, {"WWW-Authenticate": INVALID_TOKEN})] * 8
        responses = await asyncio.gather(
            *(gw.client.get("/api/orders", headers=gw.headers()) for _ in range(8))
        )
        assert gw.retries("api") == 8
    assert [r.status_code for r in responses] == [200] * 8
    assert len(issuer.minted) == 2  # one exchange for all eight refused requests
    assert [s.bearer for s in upstream.sent[1:9]] == [issuer.minted[0]] * 8
    assert {s.bearer for s in upstream.sent[9:]} == {issuer.minted[1]}


# -- RFC 9470 step-up ----------------------------------------------------------------------------


async def test_step_up_challenge_is_401_step_up_required(issuer: Issuer) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": STEP_UP})])
    async with gateway_with(upstream) as gw:
        response = await gw.client.get("/api/orders", headers=gw.headers())
        assert gw.retries("api") == 0
    assert response.status_code == 401
    body = response.json()
    assert body["error"] == "step_up_required"
    login_url = body["login_url"]
    assert login_url.startswith(ORIGIN + "/auth/login?")
    assert parse_qs(urlsplit(login_url).query) == {
        "acr_values": ["urn:mfa urn:hw"],
        "max_age": ["300"],
    }
    assert response.headers["cache-control"] == "no-store"
    assert len(upstream.sent) == 1 and upstream.closed >= 1


async def test_step_up_challenge_redirects_a_navigation(issuer: Issuer) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": STEP_UP})])
    async with gateway_with(upstream) as gw:
        response = await gw.client.get(
            "/api/orders/7?view=full", headers=gw.headers(Accept="text/html,*/*")
        )
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(ORIGIN + "/auth/login?")
    assert parse_qs(urlsplit(location).query) == {
        "acr_values": ["urn:mfa urn:hw"],
        "max_age": ["300"],
        "return_to": ["/api/orders/7?view=full"],
    }


async def test_step_up_challenge_to_a_client_token_is_relayed(issuer: Issuer) -> None:
    upstream = ScriptedUpstream([(401, {"WWW-Authenticate": STEP_UP})])
    async with gateway_with(upstream) as gw:
        response = await gw.client.get("/client/x")
    assert response.status_code == 401 and response.json() == {"error": "nope"}
    assert response.headers["www-authenticate"] == STEP_UP


async def test_a_navigation_without_a_session_goes_to_the_plain_login(
    issuer: Issuer,
) -> None:
    """A navigation without a session still goes to the plain login (nothing to step up)."""
    upstream = ScriptedUpstream()
    async with gateway_with(upstream) as gw:
        response = await gw.client.get("/api/orders", headers={"Accept": "text/html"})
    assert response.status_code == 302
    assert response.headers["location"] == ORIGIN + "/auth/login?return_to=%2Fapi%2Forders"


# -- the WebSocket handshake ---------------------------------------------------------------------


class RefusingWebSocketUpstream(LoopbackAiohttpServer):
    """aiohttp server refusing the first ``refusals`` upgrades with 401 and ``challenge``, then
    accepting; records each upgrade's Authorization."""

    def __init__(self, challenge: str, refusals: int = 1) -> None:
        super().__init__()
        self.challenge = challenge
        self.refusals = refusals
        self.bearers: list[str | None] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        self.bearers.append(authorization.removeprefix("Bearer ") if authorization else None)
        if len(self.bearers) <= self.refusals:
            return web.Response(status=401, headers={"WWW-Authenticate": self.challenge})
        ws = web.WebSocketResponse(protocols=("chat.v1",))
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws


@asynccontextmanager
async def websocket_gateway(
    challenge: str, refusals: int = 1
) -> AsyncIterator[tuple[Starlette, RefusingWebSocketUpstream, str]]:
    upstream = RefusingWebSocketUpstream(challenge, refusals)
    await upstream.start()
    app = create_app(_settings(upstream.url))
    try:
        async with app.router.lifespan_context(app):
            _, set_cookie = await app.state.services.sessions.create(
                sub="auth0|alice", sid=None, refresh_token="rt", id_token=None, claims={}
            )
            yield app, upstream, set_cookie.split(";")[0]
    finally:
        await upstream.stop()


async def _upgrade(app: Starlette, path: str, cookie: str | None) -> tuple[Browser, Any]:
    browser = Browser(path, cookie=cookie, origin=ORIGIN)
    task = asyncio.create_task(app(browser.scope, browser.receive, browser.send))
    async with asyncio.timeout(TIMEOUT):
        while not browser.sent:
            await asyncio.sleep(0.005)
    return browser, task


def _ws_retries(app: Starlette, route: str) -> str:
    text = generate_latest(app.state.services.metrics.registry).decode()
    return next(
        (
            line
            for line in text.splitlines()
            if line.startswith(f'gateway_token_retries_total{{route="{route}"}}')
        ),
        "",
    )


@pytest.mark.parametrize(("path", "route"), [("/api/ws", "api"), ("/client/ws", "client")])
async def test_websocket_upgrade_retried_once_with_a_new_token(
    issuer: Issuer, path: str, route: str
) -> None:
    async with websocket_gateway(INVALID_TOKEN) as (app, upstream, cookie):
        browser, task = await _upgrade(app, path, cookie if route == "api" else None)
        try:
            assert browser.sent[0]["type"] == "websocket.accept"
            assert upstream.bearers == issuer.minted and len(issuer.minted) == 2
            assert upstream.bearers[0] != upstream.bearers[1]
            assert _ws_retries(app, route).endswith(" 1.0")
        finally:
            browser.leave(1000)
            await asyncio.wait_for(task, TIMEOUT)


async def test_websocket_upgrade_never_retried_twice(issuer: Issuer) -> None:
    async with websocket_gateway(INVALID_TOKEN, refusals=5) as (app, upstream, cookie):
        browser, task = await _upgrade(app, "/api/ws", cookie)
        await asyncio.wait_for(task, TIMEOUT)
    assert browser.sent[0]["status"] == 502
    body = json.loads((await browser.wait_for("websocket.http.response.body"))[0]["body"])
    assert body["error"] == "upstream_unavailable"
    assert len(upstream.bearers) == 2 and len(issuer.minted) == 2


async def test_websocket_step_up_from_the_upstreams_401(issuer: Issuer) -> None:
    async with websocket_gateway(STEP_UP) as (app, upstream, cookie):
        browser, task = await _upgrade(app, "/api/ws", cookie)
        await asyncio.wait_for(task, TIMEOUT)
    assert browser.sent[0]["status"] == 401
    body = json.loads((await browser.wait_for("websocket.http.response.body"))[0]["body"])
    assert body["error"] == "step_up_required"
    assert parse_qs(urlsplit(body["login_url"]).query) == {
        "acr_values": ["urn:mfa urn:hw"],
        "max_age": ["300"],
    }
    assert len(upstream.bearers) == 1


async def test_websocket_step_up_challenge_to_a_client_token_is_a_502(issuer: Issuer) -> None:
    async with websocket_gateway(STEP_UP) as (app, upstream, _):
        browser, task = await _upgrade(app, "/client/ws", None)
        await asyncio.wait_for(task, TIMEOUT)
    assert browser.sent[0]["status"] == 502 and len(upstream.bearers) == 1


# -- TokenBroker: not_this -----------------------------------------------------------------------


async def test_broker_not_this_mints_one_new_token_for_every_caller(
    h: TokensHarness, idp: respx.MockRouter
) -> None:
    issued = Issuer()

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return issued(request)

    token_route = idp.post(TOKEN_URL).mock(side_effect=slow)
    refused = await h.token("api")
    renewed = await asyncio.gather(
        *(h.broker.access_token(h.session, _api(h), not_this=refused) for _ in range(16))
    )
    assert token_route.call_count == 2
    assert set(renewed) == {issued.minted[1]} and issued.minted[1] != refused
    assert h.broker.cached_token(h.session.id, _api(h)) == issued.minted[1]
    # An older refused token, named again later: the current one, no exchange.
    assert await h.broker.access_token(h.session, _api(h), not_this=refused) == issued.minted[1]
    assert token_route.call_count == 2


async def test_broker_not_this_ignores_the_same_token_in_the_store(
    h: TokensHarness, idp: respx.MockRouter
) -> None:
    issued = Issuer()
    token_route = idp.post(TOKEN_URL).mock(side_effect=issued)
    refused = await h.token("api")
    h.broker.forget(h.session.id)  # another instance: only the store holds the refused token
    assert await h.broker.access_token(h.session, _api(h), not_this=refused) == issued.minted[1]
    assert token_route.call_count == 2


async def test_broker_never_serves_the_refused_token_while_the_idp_is_down(
    h: TokensHarness, idp: respx.MockRouter
) -> None:
    token_route = idp.post(TOKEN_URL).mock(side_effect=Issuer())
    refused = await h.token("api")
    token_route.mock(side_effect=httpx.ConnectError("down"))
    with pytest.raises(IdentityProviderUnavailable):
        await h.broker.access_token(h.session, _api(h), not_this=refused)
    assert await h.token("api") == refused  # not refused to whoever did not see it refused


def _api(h: TokensHarness) -> Route:
    route = h.routes.by_name("api")
    assert route is not None
    return route
