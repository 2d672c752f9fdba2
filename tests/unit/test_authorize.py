"""The one authorization policy (gateway/authorize.py), through each of its three entries.

The same cases run through the proxy, forward-auth and the WebSocket handshake of one real app
(IdP mocked by respx, a real WebSocket upstream on loopback) and must end the same way. The
anti-CSRF proof differs by kind of request, not by entry: on HTTP the header (plus Origin on
unsafe methods), on a WebSocket upgrade the Origin (a page cannot set a header on one).

The cases cover every token mode (user, none, client, user_or_client, user_or_none), claim
rules and step-up (the route's acr_values and max_age, and Auth0's ``mfa_required``): each
entry answers the same status and error, sends the same kind of token (the user's, the
gateway's client token, or none), and every step-up names a login URL asking for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import respx
from starlette.applications import Starlette

from gateway import create_app

from .conftest import API, BILLING, DISCOVERY, ISSUER, access_token, jwks, make_settings
from .fakes import RecordingUpstream
from .test_websocket import TIMEOUT, Browser, Upstream

pytestmark = pytest.mark.anyio

ORIGIN = "https://app.example.com"
EVIL = "https://evil.example"
SECRET = "forward-auth-secret-forward-auth-secret-0123"
TOKEN_URL = str(DISCOVERY["token_endpoint"])
PASSED = (200, None)


@dataclass(frozen=True)
class Case:
    """One request as a browser would make it, and the IdP's state meanwhile."""

    path: str = "/api/x"
    method: str = "GET"
    cookie: bool = True  # the user's session cookie
    forged_cookie: bool = False
    csrf_proof: bool = True  # X-CSRF on HTTP, Origin on a WebSocket upgrade
    origin: str | None = None  # an Origin sent with the request (HTTP); the upgrade's Origin
    idp: str = "up"  # up | discovery-down | token-down | token-down-after-one
    expected: tuple[int, str | None] = PASSED
    token: str | None = "user"  # the token a passed request carries: user | client | None
    login_asks: str | None = None  # what a step-up's login_url must ask for


CASES = {
    "no session": Case(cookie=False, expected=(401, "login_required")),
    "bad cookie": Case(forged_cookie=True, expected=(401, "login_required")),
    "anti-CSRF proof missing": Case(csrf_proof=False, expected=(403, "csrf_failed")),
    "cross-site unsafe request": Case(method="POST", origin=EVIL, expected=(403, "csrf_failed")),
    "audience outside the MRRT policy": Case(
        path="/billing/x", expected=(403, "audience_not_permitted")
    ),
    "public route while the IdP is down": Case(
        path="/public/x", cookie=False, idp="discovery-down", token=None
    ),
    "token route while the IdP is down, no cached token": Case(
        idp="token-down", expected=(503, "idp_unavailable")
    ),
    "token route while the IdP is down, a cached token": Case(idp="token-down-after-one"),
    "allowed": Case(),
    "client route, no session": Case(path="/client/x", cookie=False, token="client"),
    "client route, a session": Case(path="/client/x", token="client"),
    "user_or_client, no session": Case(path="/either/x", cookie=False, token="client"),
    "user_or_client, a session": Case(path="/either/x"),
    "user_or_none, no session": Case(path="/maybe/x", cookie=False, token=None),
    "user_or_none, no session, the IdP down": Case(
        path="/maybe/x", cookie=False, token=None, idp="discovery-down"
    ),
    "user_or_none, a session": Case(path="/maybe/x"),
    "user_or_none, a session without the anti-CSRF proof": Case(
        path="/maybe/x", csrf_proof=False, expected=(403, "csrf_failed")
    ),
    "claim rule passes (list claim, any of)": Case(path="/staff/x"),
    "claim rule fails": Case(path="/admin/x", expected=(403, "forbidden")),
    "acr too weak": Case(
        path="/secure/x", expected=(401, "step_up_required"), login_asks="acr_values=urn%3Amfa"
    ),
    "authenticated too long ago": Case(
        path="/fresh/x", expected=(401, "step_up_required"), login_asks="max_age=600"
    ),
    "the IdP answers mfa_required": Case(
        path="/mfa/x",
        expected=(401, "step_up_required"),
        login_asks="acr_values=http%3A%2F%2Fschemas.openid.net%2Fpape%2Fpolicies%2F2007%2F06"
        "%2Fmulti-factor",
    ),
}
MFA = "https://mfa.example.com"
USER_TOKEN_SUB = "auth0|alice"
CLIENT_TOKEN_SUB = "client-id@clients"


def _token_answer(request: httpx.Request) -> httpx.Response:
    form = dict(httpx.QueryParams(request.content.decode()))
    audience = form["audience"]
    if audience == BILLING:
        return httpx.Response(403, json={"error": "access_denied"})
    if audience == MFA:  # Auth0's answer when the MFA policy wants a second factor
        return httpx.Response(
            403,
            json={
                "error": "mfa_required",
                "error_description": "Multifactor authentication required",
                "mfa_token": "Fe26.2*mfa-token",
            },
        )
    sub = CLIENT_TOKEN_SUB if form["grant_type"] == "client_credentials" else USER_TOKEN_SUB
    return httpx.Response(
        200,
        json={"access_token": access_token(API, scope="read:orders", sub=sub), "expires_in": 600},
    )


@dataclass
class Gateway:
    app: Starlette
    cookie: str
    upstream: RecordingUpstream
    ws_upstream: Upstream
    token_route: respx.Route
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    login_urls: list[str] = field(default_factory=list)  # of each 401
    bearers: list[str | None] = field(default_factory=list)  # each passed request's token


Entry = Callable[[Gateway, Case], Awaitable[tuple[int, str | None]]]


def _cookie(gateway: Gateway, case: Case) -> str | None:
    if case.forged_cookie:
        return "gw_session=" + "A" * 43 + ".forged"
    return gateway.cookie if case.cookie else None


def _http_headers(gateway: Gateway, case: Case) -> dict[str, str]:
    headers: dict[str, str] = {}
    cookie = _cookie(gateway, case)
    if cookie is not None:
        headers["Cookie"] = cookie
    if case.csrf_proof:
        headers["X-CSRF"] = "1"
    if case.origin is not None:
        headers["Origin"] = case.origin
    return headers


def _client(gateway: Gateway, client: tuple[str, int] = ("127.0.0.1", 50000)) -> Any:
    transport = httpx.ASGITransport(app=gateway.app, client=client)
    return httpx.AsyncClient(transport=transport, base_url=ORIGIN)


async def through_the_proxy(gateway: Gateway, case: Case) -> tuple[int, str | None]:
    async with _client(gateway) as client:
        response = await client.request(
            case.method, case.path, headers=_http_headers(gateway, case)
        )
    if response.status_code == 200:
        gateway.bearers.append(_bearer(gateway.upstream.calls[-1][1]))
        return PASSED
    body = response.json()
    if response.status_code == 401:  # every 401 says where to log in
        assert body["login_url"].startswith(ORIGIN + "/auth/login")
        gateway.login_urls.append(body["login_url"])
    return response.status_code, body["error"]


def _bearer(headers: Any) -> str | None:
    """The subject of the bearer token in forwarded headers, or None without one."""
    values = [v for k, v in headers if k.lower() == "authorization"]
    if not values:
        return None
    (value,) = values
    claims = jwt.decode(value.removeprefix("Bearer "), options={"verify_signature": False})
    return "user" if claims["sub"] == USER_TOKEN_SUB else "client"


async def through_forward_auth(gateway: Gateway, case: Case) -> tuple[int, str | None]:
    headers = {
        **_http_headers(gateway, case),
        "X-Forward-Auth-Secret": SECRET,
        "X-Forwarded-Uri": case.path,
        "X-Forwarded-Method": case.method,
    }
    async with _client(gateway) as client:
        response = await client.get("/auth/forward", headers=headers)
    if response.status_code == 200:
        gateway.bearers.append(_bearer(response.headers.items()))
        return PASSED
    if response.status_code == 401:  # login, then back to the original URI
        assert response.headers["x-auth-login-url"].startswith(ORIGIN + "/auth/login?return_to=")
        gateway.login_urls.append(response.headers["x-auth-login-url"])
    return response.status_code, response.headers["x-auth-error"]


async def through_the_websocket_handshake(gateway: Gateway, case: Case) -> tuple[int, str | None]:
    # The upgrade's Origin is its anti-CSRF proof: missing, or the cross-site one.
    origin = (case.origin or ORIGIN) if case.csrf_proof else None
    browser = Browser(case.path, cookie=_cookie(gateway, case), origin=origin)
    task = asyncio.create_task(gateway.app(browser.scope, browser.receive, browser.send))
    gateway.tasks.append(task)
    async with asyncio.timeout(TIMEOUT):
        while not browser.sent:  # the accept, or the refusal's start
            await asyncio.sleep(0.005)
    first = browser.sent[0]
    if first["type"] == "websocket.accept":
        async with asyncio.timeout(TIMEOUT):  # recorded just after the upstream's accept
            while not gateway.ws_upstream.seen:
                await asyncio.sleep(0.005)
        gateway.bearers.append(_bearer(gateway.ws_upstream.seen[-1]["headers"].items()))
        browser.leave(1000)
        await asyncio.wait_for(task, TIMEOUT)
        return PASSED
    body = json.loads((await browser.wait_for("websocket.http.response.body"))[0]["body"])
    if first["status"] == 401:
        assert body["login_url"].startswith(ORIGIN + "/auth/login")
        gateway.login_urls.append(body["login_url"])
    return first["status"], body["error"]


ENTRIES: dict[str, Entry] = {
    "proxy": through_the_proxy,
    "forward-auth": through_forward_auth,
    "websocket": through_the_websocket_handshake,
}


@pytest.fixture
async def ws_upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


async def _gateway(case: Case, ws_upstream: Upstream, router: respx.MockRouter) -> Gateway:
    discovery = router.get(ISSUER + ".well-known/openid-configuration")
    if case.idp == "discovery-down":
        discovery.mock(side_effect=httpx.ConnectError("down"))
    else:
        discovery.respond(json=DISCOVERY)
    router.get(str(DISCOVERY["jwks_uri"])).respond(json=jwks())
    token_route = router.post(TOKEN_URL)
    if case.idp == "token-down":
        token_route.mock(side_effect=httpx.ConnectError("down"))
    else:
        token_route.mock(side_effect=_token_answer)
    route = {"upstream": ws_upstream.url, "websocket": True}
    settings = make_settings(
        routes=[
            {"prefix": "/api/", "audience": API, "scopes": ["read:orders"], **route},
            {"prefix": "/billing/", "audience": BILLING, **route},
            {"prefix": "/public/", "auth": "none", **route},
            {"prefix": "/client/", "auth": "client", "audience": API, **route},
            {"prefix": "/either/", "auth": "user_or_client", "audience": API, **route},
            {"prefix": "/maybe/", "auth": "user_or_none", "audience": API, **route},
            {"prefix": "/staff/", "audience": API, "require": {"roles": ["staff", "x"]}, **route},
            {"prefix": "/admin/", "audience": API, "require": {"roles": "admin"}, **route},
            {"prefix": "/secure/", "audience": API, "acr_values": ["urn:mfa"], **route},
            {"prefix": "/fresh/", "audience": API, "max_age": "10m", **route},
            {"prefix": "/mfa/", "audience": MFA, **route},
        ],
        forward_auth={"enabled": True, "secret": SECRET},
        csrf={"allowed_origins": [ORIGIN]},
    )
    upstream = RecordingUpstream()
    app = create_app(settings, upstream=upstream)
    services = app.state.services
    claims = {"roles": ["staff"], "acr": "urn:pwd", "auth_time": int(time.time()) - 3600}
    _, set_cookie = await services.sessions.create(
        sub="auth0|alice", sid=None, refresh_token="rt", id_token=None, claims=claims
    )
    return Gateway(app, set_cookie.split(";")[0], upstream, ws_upstream, token_route)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", CASES)
async def test_every_entry_decides_the_same_way(
    entry: str, name: str, ws_upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    case = CASES[name]
    caplog.set_level(logging.WARNING, logger="gateway.error")
    with respx.mock(assert_all_called=False) as router:
        gateway = await _gateway(case, ws_upstream, router)
        try:
            if case.idp == "token-down-after-one":
                assert await ENTRIES[entry](gateway, Case()) == PASSED  # mints and caches
                gateway.token_route.mock(side_effect=httpx.ConnectError("down"))
            outcome = await ENTRIES[entry](gateway, case)
        finally:
            for task in gateway.tasks:
                task.cancel()
            await asyncio.gather(*gateway.tasks, return_exceptions=True)
            await gateway.app.state.services.shutdown()
    assert outcome == case.expected
    if outcome == PASSED:
        assert gateway.bearers[-1] == case.token
    if case.login_asks is not None:
        assert len(gateway.login_urls) == 1 and case.login_asks in gateway.login_urls[0]
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.error"]
    if case.expected[0] >= 500:  # logged the same way from every entry: the route, no path
        assert logged == ["idp_unavailable on route api: the identity provider is unreachable"]
    else:
        assert logged == []
    if case.idp == "discovery-down":  # a public route never asked the IdP for anything
        assert not gateway.token_route.called
