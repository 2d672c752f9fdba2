"""Metrics move exactly as a scripted run says, against the real IdP and upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .processes import SHARED_REDIS_URL, redis_key_prefix
from .servers import API, BILLING, OUTSIDE, IdpProcess

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ROUTES = {"api": "/api/orders", "billing": "/billing/invoices", "public": "/public/ping"}


class Scrape:
    """One parsed ``GET /metrics``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def requests(self, route: str, status: int) -> float | None:
        return self("gateway_requests_total", route=route, status=str(status))


async def scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return Scrape(response.text)


@pytest.fixture
def gw(idp: IdpProcess) -> Iterator[GatewayUnderTest]:
    with start_upstreams(idp) as upstreams, run_gateway(idp, upstreams) as running:
        yield running


async def test_scripted_run_moves_each_metric_by_exactly_what_happened(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client() as client:
        await gw.login(client)
        for _ in range(3):
            for path in ROUTES.values():
                response = await client.get(path, headers=CSRF)
                assert response.status_code == 200, response.text
        refused = await client.get("/outside/secrets", headers=CSRF)
        assert refused.status_code == 403
        m = await scrape(client)
        logout = await client.post("/auth/logout", headers=CSRF)
        assert logout.status_code == 200
        after = await scrape(client)

    # Requests: by configured route name and status; login + callback are the gateway's own.
    for route in ROUTES:
        assert m.requests(route, 200) == 3
        assert m("gateway_upstream_duration_seconds_count", route=route) == 3
        assert m("gateway_request_duration_seconds_count", route=route) == 3
    assert m.requests("outside", 403) == 1
    assert m("gateway_upstream_duration_seconds_count", route="outside") == 0
    assert m.requests("gateway", 302) == 2
    seen = [("api", "200"), ("billing", "200"), ("public", "200"), ("outside", "403")]
    assert {labels for (name, labels) in m.samples if name == "gateway_requests_total"} == {
        frozenset({("route", r), ("status", s)}) for r, s in [*seen, ("gateway", "302")]
    }
    # Token exchanges: one per audience; the audience outside the MRRT policy is refused.
    assert m("gateway_token_exchanges_total", audience=API, outcome="ok") == 1
    assert m("gateway_token_exchanges_total", audience=BILLING, outcome="ok") == 1
    assert m("gateway_token_exchanges_total", audience=OUTSIDE, outcome="refused") == 1
    exchanges = [
        value for (name, _), value in m.samples.items() if name == "gateway_token_exchanges_total"
    ]
    assert sum(exchanges) == 3
    # Token cache: the first request per audience misses, the next two hit this process's cache.
    assert m("gateway_token_cache_total", result="miss") == 3
    assert m("gateway_token_cache_total", result="hit_local") == 4
    assert m("gateway_token_cache_total", result="hit_shared") == 0
    assert m("gateway_token_coalesced_total") == 0
    # IdP: discovery and JWKS once at startup; token = the code + three refresh grants.
    assert m("gateway_idp_duration_seconds_count", endpoint="discovery") == 1
    assert m("gateway_idp_duration_seconds_count", endpoint="jwks") == 1
    assert m("gateway_idp_duration_seconds_count", endpoint="token") == 4
    assert m("gateway_idp_duration_seconds_count", endpoint="revoke") == 0
    assert m("gateway_active_sessions") == 1
    # Logout: one revocation, no session left; the first scrape is now counted.
    assert after("gateway_idp_duration_seconds_count", endpoint="revoke") == 1
    assert after("gateway_active_sessions") == 0
    assert after.requests("gateway", 200) == 2  # the first /metrics and the logout
    assert after.requests("api", 200) == 3


async def test_concurrent_first_requests_wait_for_one_exchange_and_are_counted_coalesced(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client() as client:
        await gw.login(client)
        responses = await asyncio.gather(*(client.get("/api/x", headers=CSRF) for _ in range(10)))
        assert [r.status_code for r in responses] == [200] * 10
        m = await scrape(client)
    assert m("gateway_token_exchanges_total", audience=API, outcome="ok") == 1
    misses = m("gateway_token_cache_total", result="miss")
    hits = m("gateway_token_cache_total", result="hit_local")
    assert misses is not None and hits is not None
    assert misses + hits == 10
    # Every miss but the one that exchanged waited for it and used its token.
    assert m("gateway_token_coalesced_total") == misses - 1
    assert m.requests("api", 200) == 10


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with redis_key_prefix("metrics") as prefix:
        yield prefix


async def test_token_minted_by_one_instance_is_a_shared_hit_on_another(
    idp: IdpProcess, redis_prefix: str
) -> None:
    session = {"store": "redis", "redis_url": SHARED_REDIS_URL, "redis_key_prefix": redis_prefix}
    with (
        start_upstreams(idp) as upstreams,
        run_gateway(idp, upstreams, session=session) as first,
        run_gateway(idp, upstreams, session=session) as second,
    ):
        async with first.client() as client_a:
            await first.login(client_a)
            assert (await client_a.get("/api/a", headers=CSRF)).status_code == 200
            async with second.client(cookies=client_a.cookies) as client_b:
                assert (await client_b.get("/api/b", headers=CSRF)).status_code == 200
                m_b = await scrape(client_b)
            m_a = await scrape(client_a)
    assert m_a("gateway_token_exchanges_total", audience=API, outcome="ok") == 1
    assert m_a("gateway_token_cache_total", result="miss") == 1
    assert m_b("gateway_token_cache_total", result="hit_shared") == 1
    assert m_b("gateway_token_exchanges_total", audience=API, outcome="ok") == 0
    assert m_b("gateway_idp_duration_seconds_count", endpoint="token") == 0
    # A shared store's session count is Redis's business, not one instance's gauge.
    assert m_a("gateway_active_sessions") is None and "gateway_active_sessions" not in m_b.text
