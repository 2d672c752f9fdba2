"""The composition root under IdP trouble: public routes keep working, nobody queues."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx
from starlette.types import ASGIApp

from gateway import create_app

from .conftest import DISCOVERY, ISSUER, jwks, make_settings
from .fakes import RecordingUpstream

pytestmark = pytest.mark.anyio


def _client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://app.example.com"
    )


async def test_public_route_and_me_work_while_idp_is_down() -> None:
    upstream = RecordingUpstream()
    app = create_app(make_settings(), upstream=upstream)
    with respx.mock(assert_all_called=False) as router:
        router.get(ISSUER + ".well-known/openid-configuration").mock(
            side_effect=httpx.ConnectError("down")
        )
        async with _client(app) as client:
            public = await client.get("/status/ping")
            me = await client.get("/auth/me")
            # Without a session there is no token to get: the answer is the login challenge,
            # IdP or not (the IdP is needed only for a token).
            no_session = await client.get("/api/orders", headers={"X-CSRF": "1"})
            _, cookie = await app.state.services.sessions.create(
                sub="alice", sid=None, refresh_token="rt", id_token=None, claims={}
            )
            token_route = await client.get(
                "/api/orders", headers={"X-CSRF": "1", "Cookie": cookie.split(";")[0]}
            )
    await app.state.services.shutdown()
    assert public.status_code == 200 and len(upstream.calls) == 1
    assert me.status_code == 401 and me.json()["error"] == "login_required"
    assert no_session.status_code == 401 and no_session.json()["error"] == "login_required"
    assert token_route.status_code == 503 and token_route.json()["error"] == "idp_unavailable"


async def test_requests_queued_behind_a_failing_start_fail_fast() -> None:
    app = create_app(make_settings(oidc={"http_timeout": 0.3}))
    calls = 0

    async def hang(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ReadTimeout("idp hangs", request=request)

    _, cookie = await app.state.services.sessions.create(
        sub="alice", sid=None, refresh_token="rt", id_token=None, claims={}
    )
    headers = {"X-CSRF": "1", "Cookie": cookie.split(";")[0]}
    with respx.mock(assert_all_called=False) as router:
        router.get(ISSUER + ".well-known/openid-configuration").mock(side_effect=hang)
        async with _client(app) as client:
            responses = await asyncio.gather(
                *(client.get("/api/orders", headers=headers) for _ in range(5))
            )
    await app.state.services.shutdown()
    assert [r.status_code for r in responses] == [503] * 5
    assert all("retry-after" in r.headers for r in responses)
    assert calls == 1  # one attempt; the four waiting requests got its failure


async def test_readyz_retries_at_once_after_the_idp_recovers() -> None:
    app = create_app(make_settings())
    with respx.mock(assert_all_called=False) as router:
        discovery = router.get(ISSUER + ".well-known/openid-configuration")
        discovery.mock(side_effect=httpx.ConnectError("down"))
        router.get(DISCOVERY["jwks_uri"]).respond(json=jwks())
        async with _client(app) as client:
            assert (await client.get("/readyz")).status_code == 503
            discovery.mock(side_effect=None, return_value=httpx.Response(200, json=DISCOVERY))
            assert (await client.get("/readyz")).status_code == 200
    await app.state.services.shutdown()
