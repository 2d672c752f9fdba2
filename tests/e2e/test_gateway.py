"""End to end, no mocks: login through the gateway, then correctly-audienced tokens upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from .conftest import IdpFactory
from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .servers import API, BILLING, IdpProcess, big_pattern

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def gw(idp: IdpProcess) -> Iterator[GatewayUnderTest]:
    with start_upstreams(idp) as upstreams, run_gateway(idp, upstreams) as running:
        yield running


async def test_login_sets_opaque_httponly_cookie_and_redirects_home(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        response = await gw.login(client, return_to="/app/orders")
        assert response.headers["location"] == "/app/orders"
        set_cookies = response.headers.get_list("set-cookie")
        session_cookie = next(c for c in set_cookies if c.startswith("gw_session="))
        assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie
        value = session_cookie.split(";")[0].split("=", 1)[1]
        assert value.count(".") == 1 and len(value) < 120  # opaque id + signature, no token
        me = await client.get("/auth/me")
        assert me.status_code == 200
        assert me.json()["sub"] == "alice"
        assert {r["audience"] for r in me.json()["routes"]} >= {API, BILLING}


async def test_each_route_reaches_its_upstream_with_exactly_its_audience(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client() as client:
        await gw.login(client)
        client.headers["Authorization"] = "Bearer client-supplied-must-not-pass"
        client.headers["X-Forwarded-For"] = "6.6.6.6"
        orders = await client.get("/api/orders?x=1", headers=CSRF)
        invoices = await client.post("/billing/invoices", headers=CSRF, json={"n": 1})
    assert orders.status_code == 200, orders.text
    assert (
        orders.json()["aud"] == API
        and orders.json()["path"] == "/orders"
        and orders.json()["query"] == "x=1"
    )
    assert "read:orders" in orders.json()["scope"]
    assert invoices.status_code == 200, invoices.text
    assert invoices.json()["aud"] == BILLING and invoices.json()["method"] == "POST"
    for answer in (orders, invoices):  # the upstream's Date gives way to the server's own
        assert len(answer.headers.get_list("date")) == 1, answer.headers
    for upstream in (gw.upstreams["api"], gw.upstreams["billing"]):
        for seen in upstream.requests:
            headers = seen["headers"]
            assert "cookie" not in headers, headers
            assert "client-supplied" not in headers.get("authorization", "")
            assert headers["x-forwarded-for"] == "127.0.0.1"
            assert headers["x-forwarded-host"] == gw.base_url.split("://")[1]


async def test_fifty_concurrent_first_requests_make_one_exchange_per_audience(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client() as client:
        await gw.login(client)
        gw.idp.reset_stats()
        paths = ["/api/orders" if i % 2 else "/billing/invoices" for i in range(50)]
        responses = await asyncio.gather(*(client.get(p, headers=CSRF) for p in paths))
    assert [r.status_code for r in responses] == [200] * 50
    stats = gw.idp.stats()
    assert stats["refresh_by_resource"] == {API: 1, BILLING: 1}


async def test_expired_token_is_refreshed_transparently(idp_factory: IdpFactory) -> None:
    idp = idp_factory(at_ttl=4)
    with start_upstreams(idp) as upstreams, run_gateway(idp, upstreams, tokens={"skew": 1}) as gw:
        async with gw.client() as client:
            await gw.login(client)
            first = await client.get("/api/a", headers=CSRF)
            await asyncio.sleep(3.2)  # past exp - skew
            second = await client.get("/api/b", headers=CSRF)
        assert first.status_code == second.status_code == 200
        assert idp.stats()["refresh_by_resource"][API] == 2
        tokens = [r["headers"]["authorization"] for r in upstreams["api"].requests]
        assert tokens[0] != tokens[1]


async def test_rotation_fifty_concurrent_requests_never_break_the_session(
    idp_factory: IdpFactory,
) -> None:
    idp = idp_factory(rotate=True, at_ttl=5)
    with start_upstreams(idp) as upstreams, run_gateway(idp, upstreams, tokens={"skew": 1}) as gw:
        async with gw.client() as client:
            await gw.login(client)
            for round_ in range(2):
                if round_:
                    await asyncio.sleep(4.2)  # every cached token is due: a second rotation round
                paths = ["/api/x" if i % 2 else "/billing/y" for i in range(50)]
                responses = await asyncio.gather(*(client.get(p, headers=CSRF) for p in paths))
                assert [r.status_code for r in responses] == [200] * 50
            me = await client.get("/auth/me")
        assert me.status_code == 200
        stats = idp.stats()
        assert stats["refresh_errors"] == {}
        assert stats["refresh_by_resource"] == {API: 2, BILLING: 2}


async def test_audience_outside_policy_answers_403_json(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        response = await client.get("/outside/secrets", headers=CSRF)
    assert response.status_code == 403
    assert response.json()["error"] == "audience_not_permitted"
    assert gw.upstreams["outside"].requests == []


@pytest.mark.parametrize(
    "cookie",
    ["garbage", "a.b", "x" * 300, "Zm9v.YmFy", "%00%01", "\u00e9t\u00e9"],
)
async def test_garbage_cookie_answers_401_not_500(gw: GatewayUnderTest, cookie: str) -> None:
    async with gw.client() as client:
        raw_cookie = f"gw_session={cookie}".encode()
        headers = {name.encode(): value.encode() for name, value in CSRF.items()}
        response = await client.get("/api/orders", headers={**headers, b"Cookie": raw_cookie})
    assert response.status_code == 401
    assert response.json()["error"] == "login_required"
    assert response.json()["login_url"].endswith("/auth/login")


async def test_tampered_cookie_answers_401(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        value = client.cookies["gw_session"]
        token, signature = value.split(".")
        tampered = token[:-1] + ("A" if token[-1] != "A" else "B") + "." + signature
        client.cookies.clear()
        response = await client.get(
            "/api/orders", headers={**CSRF, "Cookie": f"gw_session={tampered}"}
        )
    assert response.status_code == 401


async def test_missing_csrf_header_is_403(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        response = await client.post("/api/orders", json={})
    assert response.status_code == 403 and response.json()["error"] == "csrf_failed"


async def test_navigation_without_session_redirects_to_login(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        response = await client.get("/api/page?q=1", headers={"Accept": "text/html"})
    assert response.status_code == 302
    assert response.headers["location"].endswith("/auth/login?return_to=%2Fapi%2Fpage%3Fq%3D1")


async def test_bodies_stream_both_ways(gw: GatewayUnderTest) -> None:
    size = 8 * 1024 * 1024

    async def body() -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            yield chunk

    async with gw.client() as client:
        upload = await client.post("/public/upload", content=body())
        download = await client.get(f"/public/big?n={size}")
    assert upload.status_code == 200 and upload.json()["body_len"] == size
    assert download.status_code == 200 and download.content == big_pattern(size)


async def test_server_sent_events_arrive_as_sent(gw: GatewayUnderTest) -> None:
    arrivals: list[float] = []
    async with gw.client() as client, client.stream("GET", "/public/sse") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 3
    assert arrivals[-1] - arrivals[0] >= 0.3  # spaced as sent, not buffered to the end


async def test_upstream_down_is_502_and_slow_is_504(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        down = await client.get("/down/x")
        slow = await client.get("/slow/slow?s=3")
    assert down.status_code == 502 and down.json()["error"] == "upstream_unavailable"
    assert slow.status_code == 504 and slow.json()["error"] == "upstream_timeout"


async def test_path_traversal_cannot_leave_the_route(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        response = await client.get("/public/..%2f..%2fapi/x")
        dotted = await client.get("/public/%2e%2e/api/x")
    assert response.status_code == 400
    assert dotted.status_code == 401  # resolved to /api/x, which needs a session


async def test_logout_ends_session_and_revokes_refresh_token(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        assert (await client.get("/api/x", headers=CSRF)).status_code == 200
        gw.idp.reset_stats()
        logout = await client.post("/auth/logout", headers=CSRF)
        assert logout.status_code == 200
        assert logout.json()["logout_url"].startswith(gw.idp.issuer)
        assert (await client.get("/api/x", headers=CSRF)).status_code == 401
        assert (await client.get("/auth/me")).status_code == 401
    assert gw.idp.stats()["revocations"] == 1
