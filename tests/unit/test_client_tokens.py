"""ClientTokenBroker (gateway/client_tokens.py): the gateway's own client-credentials tokens.

One exchange per (audience, scopes) for the whole gateway, across instances with Redis;
refreshed once due; checked like a user token (fail closed); a cached token served while the
IdP is down; a refusal remembered; ``not_this`` replaces a token an upstream refused.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from prometheus_client import generate_latest

from gateway.client_tokens import ClientTokenBroker
from gateway.errors import (
    AudienceNotPermitted,
    IdentityProviderError,
    IdentityProviderUnavailable,
    InsufficientScope,
)
from gateway.idp_back_off import IdpBackOff
from gateway.metrics import GatewayMetrics
from gateway.oidc import OIDCClient
from gateway.routing import Route, RouteTable
from gateway.sessions import MemorySessionStore, SessionStore
from gateway.settings import Settings

from .conftest import API, BILLING, CLIENT_ID, CLIENT_SECRET, DISCOVERY, access_token, make_settings
from .test_redis_store import redis_store

pytestmark = pytest.mark.anyio
TOKEN_URL = str(DISCOVERY["token_endpoint"])
CLIENT_SUB = CLIENT_ID + "@clients"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def client_settings(**oidc: Any) -> Settings:
    upstream = "http://127.0.0.1:9/"
    return make_settings(
        oidc=oidc,
        routes=[
            {
                "prefix": "/c/",
                "upstream": upstream,
                "auth": "client",
                "audience": API,
                "scopes": ["read:orders"],
            },
            {
                "prefix": "/e/",
                "upstream": upstream,
                "auth": "user_or_client",
                "audience": API,
                "scopes": ["read:orders"],
            },
            {"prefix": "/b/", "upstream": upstream, "auth": "client", "audience": BILLING},
        ],
    )


def form(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode())


class IdP:
    """The token endpoint: counts client-credentials grants, mints a new token each time."""

    def __init__(self, *, ttl: int = 600, delay: float = 0.0) -> None:
        self.ttl = ttl
        self.delay = delay
        self.minted: list[str] = []
        self.answer: Callable[[httpx.Request], httpx.Response] | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.answer is not None:
            return self.answer(request)
        sent = form(request)
        assert sent["grant_type"] == ["client_credentials"]
        audience = (sent.get("audience") or sent["resource"])[0]
        scope = " ".join(sent.get("scope", []))
        token = access_token(
            audience, scope=scope, ttl=self.ttl, sub=CLIENT_SUB, jti=str(len(self.minted))
        )
        self.minted.append(token)
        return httpx.Response(
            200, json={"access_token": token, "expires_in": self.ttl, "token_type": "Bearer"}
        )


class Harness:
    def __init__(
        self, settings: Settings, http: httpx.AsyncClient, store: SessionStore | None = None
    ) -> None:
        self.clock = Clock()
        self.back_off = IdpBackOff(self.clock)  # as Services shares it with the session broker
        self.store = (
            store if store is not None else MemorySessionStore(idle_timeout=3600, clock=self.clock)
        )
        self.metrics = GatewayMetrics()
        self.broker = ClientTokenBroker(
            oidc=OIDCClient(settings, http),
            store=self.store,
            settings=settings.tokens,
            clock=self.clock,
            metrics=self.metrics,
            back_off=self.back_off,
        )
        self.routes = RouteTable(settings.routes)

    def route(self, name: str = "c") -> Route:
        found = self.routes.by_name(name)
        assert found is not None
        return found

    async def token(self, name: str = "c", *, not_this: str | None = None) -> str:
        return await self.broker.access_token(self.route(name), not_this=not_this)

    def metric(self, text: str) -> bool:
        return text in generate_latest(self.metrics.registry).decode()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def h(idp: respx.MockRouter, http: httpx.AsyncClient) -> Harness:
    return Harness(client_settings(), http)


async def test_64_concurrent_first_requests_make_one_exchange(
    h: Harness, idp: respx.MockRouter
) -> None:
    issuer = IdP(delay=0.05)
    token_route = idp.post(TOKEN_URL).mock(side_effect=issuer)
    tokens = await asyncio.gather(*(h.token() for _ in range(64)))
    assert token_route.call_count == 1 and h.broker.exchanges == 1
    assert set(tokens) == {issuer.minted[0]}
    assert h.broker.cached_token(h.route()) == issuer.minted[0]
    # The user_or_client route has the same (audience, scopes): the same token, no exchange.
    assert await h.token("e") == issuer.minted[0] and token_route.call_count == 1
    assert h.metric(f'gateway_client_token_exchanges_total{{audience="{API}",outcome="ok"}} 1.0')


async def test_client_credentials_wire_format_auth0(h: Harness, idp: respx.MockRouter) -> None:
    token_route = idp.post(TOKEN_URL).mock(side_effect=IdP())
    await h.token()
    await h.token("b")
    first, second = (form(call.request) for call in token_route.calls)
    assert first == {
        "grant_type": ["client_credentials"],
        "audience": [API],
        "scope": ["read:orders"],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
    }
    assert second == {  # no scopes: none asked
        "grant_type": ["client_credentials"],
        "audience": [BILLING],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
    }


async def test_client_credentials_wire_format_rfc8707_with_basic_auth(
    idp: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    h = Harness(
        client_settings(dialect="rfc8707", token_endpoint_auth_method="client_secret_basic"),
        http,
    )
    token_route = idp.post(TOKEN_URL).mock(side_effect=IdP())
    await h.token()
    request = token_route.calls[0].request
    assert form(request) == {
        "grant_type": ["client_credentials"],
        "resource": [API],
        "scope": ["read:orders"],
    }
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {basic}"


async def test_refreshed_once_when_due(h: Harness, idp: respx.MockRouter) -> None:
    issuer = IdP(ttl=600, delay=0.02)
    token_route = idp.post(TOKEN_URL).mock(side_effect=issuer)
    first = await h.token()
    h.clock.now += 600 - 60 - 1  # not yet due (skew 60 s)
    assert await h.token() == first and token_route.call_count == 1
    h.clock.now += 2  # inside the skew: due
    assert h.broker.cached_token(h.route()) is None
    renewed = await asyncio.gather(*(h.token() for _ in range(16)))
    assert token_route.call_count == 2 and set(renewed) == {issuer.minted[1]}
    assert issuer.minted[1] != first


ANSWERS: dict[str, tuple[Callable[[], dict[str, Any]], type[Exception]]] = {
    "another audience (Auth0's default)": (
        lambda: {"access_token": access_token(BILLING, scope="read:orders"), "expires_in": 600},
        AudienceNotPermitted,
    ),
    "a scope missing": (
        lambda: {
            "access_token": access_token(API, scope="other"),
            "expires_in": 600,
            "scope": "other",
        },
        InsufficientScope,
    ),
    "an opaque token": (
        lambda: {"access_token": "opaque-token", "expires_in": 600},
        AudienceNotPermitted,
    ),
}


@pytest.mark.parametrize("name", sorted(ANSWERS))
async def test_answer_checked_fail_closed_and_the_refusal_remembered(
    h: Harness, idp: respx.MockRouter, name: str
) -> None:
    body, error = ANSWERS[name]
    token_route = idp.post(TOKEN_URL).mock(side_effect=lambda _r: httpx.Response(200, json=body()))
    with pytest.raises(error):
        await h.token()
    assert h.broker.cached_token(h.route()) is None
    assert await h.store.get_client_token(f"{API} read:orders") is None  # never shared
    with pytest.raises(error) as again:  # remembered: not asked again for a while
        await h.token()
    assert token_route.call_count == 1
    assert again.value.__traceback__ is not None
    h.clock.now += 31  # the refusal is forgotten: asked again
    token_route.mock(side_effect=IdP())
    assert await h.token()
    assert token_route.call_count == 2
    outcome = "refused"
    assert h.metric(
        f'gateway_client_token_exchanges_total{{audience="{API}",outcome="{outcome}"}} 1.0'
    )


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (403, "access_denied", AudienceNotPermitted),
        (400, "invalid_target", AudienceNotPermitted),
        (401, "invalid_client", IdentityProviderError),
        (400, "login_required", IdentityProviderError),  # no user to send to a login
        (403, "mfa_required", IdentityProviderError),
    ],
)
async def test_idp_refusals(
    h: Harness, idp: respx.MockRouter, status: int, error: str, expected: type[Exception]
) -> None:
    token_route = idp.post(TOKEN_URL).respond(status, json={"error": error})
    with pytest.raises(expected) as refused:
        await h.token()
    assert type(refused.value) is expected
    with pytest.raises(expected):
        await h.token()
    assert token_route.call_count == 1


async def test_idp_down_serves_an_unexpired_cached_token(h: Harness, idp: respx.MockRouter) -> None:
    issuer = IdP(ttl=600)
    token_route = idp.post(TOKEN_URL).mock(side_effect=issuer)
    first = await h.token()
    h.clock.now += 580  # due, not expired
    token_route.mock(side_effect=httpx.ConnectError("down"))
    assert await h.token() == first
    h.clock.now += 21  # expired: nothing left to serve
    with pytest.raises(IdentityProviderUnavailable):
        await h.token()


async def test_idp_down_without_a_cached_token_is_a_503_then_backs_off(
    h: Harness, idp: respx.MockRouter
) -> None:
    token_route = idp.post(TOKEN_URL).respond(503, headers={"Retry-After": "10"})
    with pytest.raises(IdentityProviderUnavailable) as down:
        await h.token()
    assert down.value.headers() == {"Retry-After": "10"}
    assert h.metric(
        f'gateway_client_token_exchanges_total{{audience="{API}",outcome="idp_unavailable"}} 1.0'
    )
    h.clock.now += 4
    with pytest.raises(IdentityProviderUnavailable) as waiting:
        await h.token()
    assert waiting.value.headers() == {"Retry-After": "6"}
    assert token_route.call_count == 1


async def test_back_off_ends_at_retry_after_however_often_it_is_hit(
    h: Harness, idp: respx.MockRouter
) -> None:
    """Answering from the back-off must not extend it (each answer's Retry-After is rounded
    up: recorded again, it pushed the end forward on every request)."""
    token_route = idp.post(TOKEN_URL).respond(503, headers={"Retry-After": "10"})
    with pytest.raises(IdentityProviderUnavailable):
        await h.token()
    for _ in range(19):  # t + 0.5 ... t + 9.5
        h.clock.now += 0.5
        with pytest.raises(IdentityProviderUnavailable):
            await h.token()
    assert token_route.call_count == 1
    h.clock.now += 1.0  # t + 10.5
    token_route.mock(side_effect=IdP())
    assert await h.token()
    assert token_route.call_count == 2


async def test_an_idp_failure_a_session_exchange_met_holds_client_exchanges_back_too(
    h: Harness, idp: respx.MockRouter
) -> None:
    """One token endpoint, one back-off: what the session broker recorded stops this one."""
    token_route = idp.post(TOKEN_URL).mock(side_effect=IdP())
    h.back_off.record(
        IdentityProviderUnavailable("the identity provider timed out", retry_after=8),
        "a-session-id",
        BILLING,
        h.clock(),
    )
    with pytest.raises(IdentityProviderUnavailable) as waiting:
        await h.token()
    assert waiting.value.headers() == {"Retry-After": "8"} and token_route.call_count == 0
    h.clock.now += 8
    assert await h.token() and token_route.call_count == 1


async def test_not_this_forces_a_new_token_and_concurrent_callers_coalesce(
    h: Harness, idp: respx.MockRouter
) -> None:
    issuer = IdP(delay=0.05)
    token_route = idp.post(TOKEN_URL).mock(side_effect=issuer)
    refused = await h.token()
    renewed = await asyncio.gather(*(h.token(not_this=refused) for _ in range(32)))
    assert token_route.call_count == 2
    assert set(renewed) == {issuer.minted[1]} and issuer.minted[1] != refused
    assert h.broker.cached_token(h.route()) == issuer.minted[1]
    stored = await h.store.get_client_token(f"{API} read:orders")
    assert stored is not None and stored.access_token == issuer.minted[1]
    # A caller still holding an older refused token gets the current one, no exchange.
    assert await h.token(not_this=refused) == issuer.minted[1]
    assert token_route.call_count == 2


async def test_not_this_is_never_served_while_the_idp_is_down(
    h: Harness, idp: respx.MockRouter
) -> None:
    token_route = idp.post(TOKEN_URL).mock(side_effect=IdP())
    refused = await h.token()
    token_route.mock(side_effect=httpx.ConnectError("down"))
    with pytest.raises(IdentityProviderUnavailable):
        await h.token(not_this=refused)
    assert await h.token() == refused  # still good for whoever did not see it refused


async def test_the_store_shares_a_token_minted_by_another_instance(
    idp: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    settings = client_settings()
    one = Harness(settings, http)
    two = Harness(settings, http, store=one.store)
    token_route = idp.post(TOKEN_URL).mock(side_effect=IdP())
    assert await one.token() == await two.token()
    assert token_route.call_count == 1 and two.broker.exchanges == 0


async def test_idp_down_serves_an_unexpired_token_another_instance_minted(
    idp: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    settings = client_settings()
    one = Harness(settings, http)
    two = Harness(settings, http, store=one.store)
    token_route = idp.post(TOKEN_URL).mock(side_effect=IdP(ttl=600))
    minted = await one.token()
    for instance in (one, two):
        instance.clock.now += 580  # due, not expired
    token_route.mock(side_effect=httpx.ConnectError("down"))
    assert await two.token() == minted  # two never held it: the store's, while it lives
    assert two.broker.exchanges == 1
    for instance in (one, two):
        instance.clock.now += 21  # expired: nothing left to serve
    with pytest.raises(IdentityProviderUnavailable):
        await two.token()


async def test_idp_down_serves_another_instances_token_in_place_of_a_refused_one(
    idp: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    settings = client_settings()
    one = Harness(settings, http)
    two = Harness(settings, http, store=one.store)
    token_route = idp.post(TOKEN_URL).mock(side_effect=IdP(ttl=600))
    refused = await one.token()
    for instance in (one, two):
        instance.clock.now += 5
    replacement = await two.token(not_this=refused)  # two saw the upstream refuse it
    for instance in (one, two):
        instance.clock.now += 580  # both due, neither expired
    token_route.mock(side_effect=httpx.ConnectError("down"))
    assert await one.token(not_this=refused) == replacement


async def test_two_instances_over_one_redis_prefix_make_one_exchange(
    idp: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    settings = client_settings()
    issuer = IdP(delay=0.05)
    token_route = idp.post(TOKEN_URL).mock(side_effect=issuer)
    async with redis_store() as first_store:
        async with redis_store(prefix=first_store._prefix) as second_store:
            one = Harness(settings, http, store=first_store)
            two = Harness(settings, http, store=second_store)
            tokens = await asyncio.gather(
                *(one.token() for _ in range(32)), *(two.token() for _ in range(32))
            )
            assert token_route.call_count == 1
            assert one.broker.exchanges + two.broker.exchanges == 1
            assert set(tokens) == {issuer.minted[0]}
            # The other instance's refused token: one new exchange for both.
            renewed = await asyncio.gather(
                one.token(not_this=issuer.minted[0]), two.token(not_this=issuer.minted[0])
            )
            assert token_route.call_count == 2 and set(renewed) == {issuer.minted[1]}
            shared = await second_store.get_client_token(f"{API} read:orders")
            assert shared is not None and shared.access_token == issuer.minted[1]
