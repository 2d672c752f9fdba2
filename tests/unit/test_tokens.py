"""TokenBroker: cache, single flight, rotation order, and checking every token it forwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import httpx
import pytest
import respx

from gateway.errors import (
    AudienceNotPermitted,
    IdentityProviderUnavailable,
    InsufficientScope,
    LoginRequired,
    RefreshTokenRejected,
)
from gateway.oidc import OIDCClient, TokenResponse
from gateway.routing import RouteTable
from gateway.sessions import CachedToken, MemorySessionStore, Session
from gateway.settings import Settings
from gateway.tokens import TokenBroker

from .conftest import API, BILLING, DISCOVERY, access_token, make_settings

pytestmark = pytest.mark.anyio
TOKEN_URL = DISCOVERY["token_endpoint"]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.clock = Clock()
        self.store = MemorySessionStore(idle_timeout=3600, clock=self.clock)
        self.broker = TokenBroker(
            oidc=OIDCClient(settings, http),
            store=self.store,
            settings=settings.tokens,
            clock=self.clock,
        )
        self.routes = RouteTable(settings.routes)
        self.session = Session(
            id="sess-1",
            sub="alice",
            refresh_token="rt-0",
            created_at=self.clock.now,
            absolute_expiry=self.clock.now + 86400,
        )

    async def token(self, name: str) -> str:
        route = self.routes.by_name(name)
        assert route is not None
        return await self.broker.access_token(self.session, route)


@pytest.fixture
async def h(settings: Settings, idp: respx.MockRouter) -> AsyncIterator[Harness]:
    async with httpx.AsyncClient() as http:
        harness = Harness(settings, http)
        await harness.store.save(harness.session)
        yield harness


def _token_answer(request: httpx.Request) -> httpx.Response:
    form = parse_qs(request.content.decode())
    audience = form["audience"][0]
    scope = {API: "read:orders", BILLING: "read:invoices"}[audience]
    return httpx.Response(
        200,
        json={
            "access_token": access_token(audience, scope=scope),
            "expires_in": 600,
            "scope": scope,
        },
    )


async def test_broker_caches_token_until_due(h: Harness, idp: respx.MockRouter) -> None:
    route = idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    first = await h.token("api")
    assert await h.token("api") == first
    assert route.call_count == 1
    h.clock.now += 600 - 60 + 1  # inside the skew: due for refresh
    await h.token("api")
    assert route.call_count == 2


async def test_broker_single_flight_one_exchange_per_audience(
    h: Harness, idp: respx.MockRouter
) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return _token_answer(request)

    route = idp.post(TOKEN_URL).mock(side_effect=slow)
    results = await asyncio.gather(*(h.token("api" if i % 2 else "billing") for i in range(50)))
    assert len(set(results)) == 2
    audiences = sorted(parse_qs(c.request.content.decode())["audience"][0] for c in route.calls)
    assert audiences == [API, BILLING]


async def test_broker_saves_rotated_refresh_token_and_uses_it_next(
    h: Harness, idp: respx.MockRouter
) -> None:
    sent: list[str] = []

    def rotate(request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        sent.append(form["refresh_token"][0])
        response = _token_answer(request)
        body = response.json() | {"refresh_token": f"rt-{len(sent)}"}
        return httpx.Response(200, json=body)

    idp.post(TOKEN_URL).mock(side_effect=rotate)
    await asyncio.gather(h.token("api"), h.token("billing"), h.token("api"))
    stored = await h.store.load("sess-1")
    assert stored is not None
    assert sent == ["rt-0", "rt-1"]
    assert stored.refresh_token == "rt-2" and stored.rt_version == 2


async def test_broker_refuses_token_for_default_audience(h: Harness, idp: respx.MockRouter) -> None:
    # Auth0 answers an audience outside the MRRT policy with a token for the default audience.
    route = idp.post(TOKEN_URL).respond(
        json={"access_token": access_token(API, scope="read:orders"), "expires_in": 600}
    )
    with pytest.raises(AudienceNotPermitted):
        await h.token("billing")
    with pytest.raises(AudienceNotPermitted):  # remembered for a while: no second exchange
        await h.token("billing")
    assert route.call_count == 1


async def test_broker_refuses_token_missing_route_scope(h: Harness, idp: respx.MockRouter) -> None:
    idp.post(TOKEN_URL).respond(
        json={
            "access_token": access_token(API, scope="openid"),
            "expires_in": 600,
            "scope": "openid profile",
        }
    )
    with pytest.raises(InsufficientScope):
        await h.token("api")


async def test_broker_refuses_opaque_token_by_default(h: Harness, idp: respx.MockRouter) -> None:
    idp.post(TOKEN_URL).respond(
        json={"access_token": "opaque-value", "expires_in": 600, "scope": "read:orders"}
    )
    with pytest.raises(AudienceNotPermitted):
        await h.token("api")


async def test_broker_accepts_opaque_token_when_allowed(idp: respx.MockRouter) -> None:
    settings = make_settings(tokens={"allow_opaque": True})
    idp.post(TOKEN_URL).respond(
        json={"access_token": "opaque-value", "expires_in": 600, "scope": "read:orders"}
    )
    async with httpx.AsyncClient() as http:
        h = Harness(settings, http)
        await h.store.save(h.session)
        assert await h.token("api") == "opaque-value"


async def test_broker_invalid_grant_ends_session(h: Harness, idp: respx.MockRouter) -> None:
    idp.post(TOKEN_URL).respond(403, json={"error": "invalid_grant"})
    with pytest.raises(RefreshTokenRejected):
        await h.token("api")
    assert await h.store.load("sess-1") is None


async def test_broker_serves_cached_token_while_idp_down(h: Harness, idp: respx.MockRouter) -> None:
    idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    first = await h.token("api")
    h.clock.now += 600 - 30  # due, not yet expired
    idp.post(TOKEN_URL).respond(503)
    assert await h.token("api") == first
    h.clock.now += 31  # expired now
    with pytest.raises(IdentityProviderUnavailable):
        await h.token("api")


async def test_broker_short_lived_tokens_are_not_refreshed_every_request(
    h: Harness, idp: respx.MockRouter
) -> None:
    def short(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={"access_token": access_token(API, scope="read:orders", ttl=20), "expires_in": 20},
        )

    route = idp.post(TOKEN_URL).mock(side_effect=short)
    await h.token("api")
    h.clock.now += 5
    await h.token("api")
    assert route.call_count == 1  # skew (60 s) is clamped to half the 20 s lifetime
    h.clock.now += 6
    await h.token("api")
    assert route.call_count == 2


async def test_broker_uses_jwt_exp_when_earlier_than_expires_in(
    h: Harness, idp: respx.MockRouter
) -> None:
    def lying(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "access_token": access_token(API, scope="read:orders", ttl=100),
                "expires_in": 86400,
            },
        )

    route = idp.post(TOKEN_URL).mock(side_effect=lying)
    await h.token("api")
    h.clock.now += 99
    await h.token("api")
    assert route.call_count == 2


async def test_broker_waiters_do_not_each_retry_a_failing_idp(
    h: Harness, idp: respx.MockRouter
) -> None:
    async def down(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return httpx.Response(503)

    route = idp.post(TOKEN_URL).mock(side_effect=down)
    results = await asyncio.gather(*(h.token("api") for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, IdentityProviderUnavailable) for r in results)
    assert route.call_count == 1  # the others got the backoff, not another IdP call
    h.clock.now += 6  # past Retry-After (5 s default): the IdP is asked again
    idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    assert await h.token("api")


async def test_broker_cached_refusal_is_a_fresh_exception_each_time(
    h: Harness, idp: respx.MockRouter
) -> None:
    idp.post(TOKEN_URL).respond(400, json={"error": "invalid_target"})
    errors = []
    for _ in range(3):
        with pytest.raises(AudienceNotPermitted) as info:
            await h.token("api")
        errors.append(info.value)
    assert len({id(e) for e in errors}) == 3


async def test_broker_does_not_serve_a_token_that_expired_during_the_idp_call(
    h: Harness, idp: respx.MockRouter
) -> None:
    idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    await h.token("api")
    h.clock.now += 600 - 5  # due, 5 s of life left

    async def slow_failure(request: httpx.Request) -> httpx.Response:
        h.clock.now += 10  # the IdP call outlives the cached token
        return httpx.Response(503)

    idp.post(TOKEN_URL).mock(side_effect=slow_failure)
    with pytest.raises(IdentityProviderUnavailable):
        await h.token("api")


async def test_broker_logout_during_refresh_does_not_revive_the_session(
    h: Harness, idp: respx.MockRouter
) -> None:
    async def rotate_slowly(request: httpx.Request) -> httpx.Response:
        await h.store.delete("sess-1")  # logout lands while the IdP answers
        response = _token_answer(request)
        return httpx.Response(200, json=response.json() | {"refresh_token": "rt-new"})

    idp.post(TOKEN_URL).mock(side_effect=rotate_slowly)
    with pytest.raises(LoginRequired):
        await h.token("api")
    assert await h.store.load("sess-1") is None


def test_token_cache_forget_and_eviction_stay_per_session() -> None:
    from gateway.tokens import _TokenCache

    now = time.time()
    cache = _TokenCache(maxsize=3, clock=lambda: now, due=lambda t: t.expires_at - 10)
    for i in range(5):
        cache.put((f"s{i % 2}", f"aud{i}", ""), CachedToken(f"t{i}", now + 100, f"aud{i}"))
    assert len(cache) == 3  # the two oldest went
    assert cache.get(("s0", "aud0", "")) is None
    cache.forget("s0")
    assert len(cache) == 1 and cache.get(("s1", "aud3", "")) is not None
    # fresh: until due (computed once, at put); get: until expiry.
    cache.put(("s1", "late", ""), CachedToken("t", now + 5, "late"))
    assert cache.fresh(("s1", "late", ""), now) is None
    assert cache.get(("s1", "late", "")) is not None
    assert cache.fresh(("s1", "aud3", ""), now + 89) is not None
    assert cache.fresh(("s1", "aud3", ""), now + 90) is None


async def test_broker_cached_token_is_the_hit_of_access_token_without_a_coroutine(
    h: Harness, idp: respx.MockRouter
) -> None:
    route = h.routes.by_name("api")
    assert route is not None
    exchange = idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    hits = h.broker._metrics.cache_hit_local
    assert h.broker.cached_token(h.session.id, route) is None  # nothing minted yet
    minted = await h.token("api")
    before = hits.value
    assert h.broker.cached_token(h.session.id, route) == minted
    assert hits.value == before + 1  # counted as the local hit it is
    other = h.routes.by_name("billing")
    assert other is not None and h.broker.cached_token(h.session.id, other) is None
    assert h.broker.cached_token("another-session", route) is None
    h.clock.now += 600 - 60 + 1  # due for refresh: the hot path falls back to access_token
    assert h.broker.cached_token(h.session.id, route) is None
    assert hits.value == before + 1
    await h.token("api")
    assert exchange.call_count == 2


# -- back-off scope (review item 5) ------------------------------------------------------------


def _second_session(h: Harness) -> Session:
    return Session(
        id="sess-2",
        sub="bob",
        refresh_token="rt-bob",
        created_at=h.clock.now,
        absolute_expiry=h.clock.now + 86400,
    )


def _rate_limit_alice_for_api(request: httpx.Request) -> httpx.Response:
    """Auth0's wire shape for a refused quota: 429, Retry-After in seconds, an error body."""
    form = parse_qs(request.content.decode())
    if form["refresh_token"] == ["rt-0"] and form["audience"] == [API]:
        return httpx.Response(
            429,
            headers={"Retry-After": "60"},
            json={"error": "too_many_requests", "error_description": "Global limit exceeded"},
        )
    return _token_answer(request)


async def test_broker_429_backs_off_only_the_refused_session_and_audience(
    h: Harness, idp: respx.MockRouter
) -> None:
    bob = _second_session(h)
    await h.store.save(bob)
    api = h.routes.by_name("api")
    assert api is not None
    route = idp.post(TOKEN_URL).mock(side_effect=_rate_limit_alice_for_api)
    with pytest.raises(IdentityProviderUnavailable) as refused:
        await h.token("api")
    assert refused.value.status_code == 503 and refused.value.headers() == {"Retry-After": "60"}
    # Before the fix every other session's first exchange answered 503 for 60 s, unasked.
    assert await h.broker.access_token(bob, api)
    assert await h.token("billing")  # the same session, another audience
    assert route.call_count == 3
    h.clock.now += 30
    with pytest.raises(IdentityProviderUnavailable) as waiting:
        await h.token("api")
    assert waiting.value.headers() == {"Retry-After": "30"}
    assert route.call_count == 3  # not asked again within its Retry-After
    h.clock.now += 31
    idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    assert await h.token("api")
    assert route.call_count == 4


async def test_broker_5xx_backs_off_every_session(h: Harness, idp: respx.MockRouter) -> None:
    bob = _second_session(h)
    await h.store.save(bob)
    api = h.routes.by_name("api")
    assert api is not None
    route = idp.post(TOKEN_URL).respond(503, headers={"Retry-After": "20"})
    with pytest.raises(IdentityProviderUnavailable):
        await h.token("api")
    with pytest.raises(IdentityProviderUnavailable) as other:
        await h.broker.access_token(bob, api)
    assert other.value.headers() == {"Retry-After": "20"}
    assert route.call_count == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_broker_back_off_ends_at_retry_after_however_often_it_is_hit(
    h: Harness, idp: respx.MockRouter, status: int
) -> None:
    """Answering from the back-off must not extend it: requests every 0.5 s used to push its end
    forward by the rounding of each Retry-After they answered with, so it never ended."""
    route = idp.post(TOKEN_URL).respond(status, headers={"Retry-After": "10"})
    with pytest.raises(IdentityProviderUnavailable):
        await h.token("api")
    for _ in range(19):  # t + 0.5 ... t + 9.5
        h.clock.now += 0.5
        with pytest.raises(IdentityProviderUnavailable):
            await h.token("api")
    assert route.call_count == 1
    h.clock.now += 1.0  # t + 10.5
    idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    assert await h.token("api")


async def test_broker_caps_the_idps_retry_after(h: Harness, idp: respx.MockRouter) -> None:
    route = idp.post(TOKEN_URL).respond(503, headers={"Retry-After": "86400"})
    with pytest.raises(IdentityProviderUnavailable) as info:
        await h.token("api")
    assert info.value.headers() == {"Retry-After": "60"}
    h.clock.now += 61  # a day's Retry-After, capped at a minute: the IdP is asked again
    idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    assert await h.token("api")
    assert route.call_count == 2


async def test_broker_adopts_the_login_token_for_its_audience_only(
    h: Harness, idp: respx.MockRouter
) -> None:
    """issue 23: the code exchange's token for the login audience serves that audience's
    routes without a refresh-token exchange; another audience still exchanges."""
    route = idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    login = access_token(API, scope="openid offline_access read:orders write:orders")
    answer = TokenResponse(
        access_token=login,
        expires_in=600,
        refresh_token="rt-0",
        id_token=None,
        scope="openid offline_access read:orders write:orders",
        token_type="Bearer",
    )
    routes = [r for r in h.routes if r.needs_token]
    assert await h.broker.adopt(h.session.id, answer, routes) == 1
    assert await h.token("api") == login
    assert route.call_count == 0
    assert await h.token("billing") != login
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("audience", "scope"),
    [(BILLING, "read:orders"), (API, "openid offline_access")],
    ids=["another audience", "without the route's scope"],
)
async def test_broker_drops_a_login_token_that_fails_a_check(
    h: Harness, idp: respx.MockRouter, audience: str, scope: str
) -> None:
    route = idp.post(TOKEN_URL).mock(side_effect=_token_answer)
    answer = TokenResponse(
        access_token=access_token(audience, scope=scope),
        expires_in=600,
        refresh_token="rt-0",
        id_token=None,
        scope=scope,
        token_type="Bearer",
    )
    api = h.routes.by_name("api")
    assert api is not None
    assert await h.broker.adopt(h.session.id, answer, [api]) == 0
    await h.token("api")
    assert route.call_count == 1
