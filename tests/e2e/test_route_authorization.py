"""End to end, against the test IdP: authorization per route (issue "Authorization per route").

Token modes (user, none, client, user_or_client, user_or_none), claim rules on the IdP's own
claims (a URI claim, a list claim, nested claims), step-up (a route's acr_values and max_age, an
upstream's RFC 9470 challenge) with the callback refusing a weaker login, one retry when an
upstream refuses a token as invalid_token, /auth/me's statuses, a silent login, and
forward-auth giving the same answers. The test IdP logs in with acr ``urn:test:mfa`` when the
password is ``mfa`` (see tests/e2e/idp/server.mjs).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import jwt
import pytest

from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .login import browser_login
from .servers import API, BILLING, CLIENT_ID, IdpProcess, Upstream

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ROLES = "https://example.com/roles"
FORWARD_SECRET = "e2e-forward-auth-secret-route-authorization"
MFA = "urn:test:mfa"


def routes(upstreams: dict[str, Upstream]) -> list[dict[str, Any]]:
    api, public = upstreams["api"].url, upstreams["public"].url
    read = {"audience": API, "scopes": ["read:orders"]}
    return [
        {"prefix": "/api/", "upstream": api, **read},
        {"prefix": "/billing/", "upstream": upstreams["billing"].url, "audience": BILLING},
        {"prefix": "/public/", "upstream": public, "auth": "none"},
        {"prefix": "/client/", "upstream": api, "auth": "client", **read},
        {"prefix": "/either/", "upstream": api, "auth": "user_or_client", **read},
        # Its upstream checks nothing and records the headers: the token, or none, is seen.
        {"prefix": "/maybe/", "upstream": public, "auth": "user_or_none", **read},
        {"prefix": "/admin/", "upstream": api, "require": {ROLES: "admin"}, **read},
        {"prefix": "/ops/", "upstream": api, "require": {"groups": ["ops", "sre"]}, **read},
        {
            "prefix": "/pro/",
            "upstream": api,
            "require": {"app_metadata.plan": "pro", "app_metadata.beta": True},
            **read,
        },
        # Pages a browser navigates to: no anti-CSRF header on a navigation.
        {"prefix": "/secure/", "upstream": api, "acr_values": [MFA], "csrf": False, **read},
        {"prefix": "/fresh/", "upstream": api, "max_age": "3s", **read},
    ]


@contextlib.contextmanager
def gateway(idp: IdpProcess, **overrides: Any) -> Iterator[GatewayUnderTest]:
    with start_upstreams(idp) as upstreams:
        settings: dict[str, Any] = {
            "routes": routes(upstreams),
            "forward_auth": {"enabled": True, "secret": FORWARD_SECRET},
            **overrides,
        }
        with run_gateway(idp, upstreams, **settings) as running:
            yield running


@pytest.fixture
def gw(idp: IdpProcess) -> Iterator[GatewayUnderTest]:
    with gateway(idp) as running:
        yield running


async def login(
    gw: GatewayUnderTest,
    client: httpx.AsyncClient,
    *,
    username: str = "alice",
    password: str = "password",
    url: str = "/auth/login?return_to=/",
) -> httpx.Response:
    """A browser login (``password`` ``mfa`` logs in with acr urn:test:mfa)."""
    return await browser_login(
        client,
        gw.base_url + url if url.startswith("/") else url,
        username=username,
        password=password,
        idp_issuer=gw.idp.issuer,
    )


def bearer_claims(headers: dict[str, str]) -> dict[str, Any] | None:
    value = headers.get("authorization")
    if value is None:
        return None
    claims: dict[str, Any] = jwt.decode(
        value.removeprefix("Bearer "), options={"verify_signature": False}
    )
    return claims


def session_cookie(client: httpx.AsyncClient) -> str | None:
    return client.cookies.get("gw_session")


# -- token modes -------------------------------------------------------------------------------


async def test_each_mode_without_a_session(gw: GatewayUnderTest) -> None:
    gw.idp.reset_stats()
    async with gw.client() as client:
        client_route = await client.get("/client/orders")
        either = await client.get("/either/orders")
        maybe = await client.get("/maybe/things")
        user = await client.get("/api/orders")
        public = await client.get("/public/x")
    assert client_route.status_code == 200, client_route.text
    assert client_route.json()["aud"] == API and client_route.json()["sub"] == CLIENT_ID
    assert "read:orders" in client_route.json()["scope"]
    assert either.status_code == 200 and either.json()["sub"] == CLIENT_ID
    assert maybe.status_code == 200 and "authorization" not in maybe.json()["headers"]
    assert user.status_code == 401 and user.json()["error"] == "login_required"
    assert public.status_code == 200
    # The two client routes share (audience, scopes): one client token for both.
    assert gw.idp.stats()["grants"].get("client_credentials") == 1


async def test_each_mode_with_a_session(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await login(gw, client)
        either = await client.get("/either/orders", headers=CSRF)
        maybe = await client.get("/maybe/things", headers=CSRF)
        client_route = await client.get("/client/orders", headers=CSRF)
        maybe_no_proof = await client.get("/maybe/things")
    assert either.status_code == 200 and either.json()["sub"] == "alice"
    assert maybe.status_code == 200
    claims = bearer_claims(maybe.json()["headers"])
    assert claims is not None and claims["aud"] == API and claims["sub"] == "alice"
    assert client_route.status_code == 200 and client_route.json()["sub"] == CLIENT_ID
    # With a session the user's token goes upstream, so the anti-CSRF proof is needed.
    assert maybe_no_proof.status_code == 403 and maybe_no_proof.json()["error"] == "csrf_failed"


async def test_64_concurrent_first_requests_make_one_client_token_exchange(
    gw: GatewayUnderTest,
) -> None:
    gw.idp.reset_stats()
    async with gw.client() as client:
        answers = await asyncio.gather(*(client.get(f"/client/o{i}") for i in range(64)))
    assert [a.status_code for a in answers] == [200] * 64
    assert gw.idp.stats()["grants"].get("client_credentials") == 1


async def test_two_instances_on_redis_share_one_client_token(idp: IdpProcess) -> None:
    session = {
        "store": "redis",
        "redis_key_prefix": f"e2e-client-{uuid.uuid4().hex[:8]}:",
        "secret_key": ["e2e-secret-key-e2e-secret-key-e2e-secret-key"],
    }
    with gateway(idp, session=session) as first, gateway(idp, session=session) as second:
        idp.reset_stats()
        async with first.client() as a, second.client() as b:
            answers = await asyncio.gather(
                *(c.get(f"/client/o{i}") for i in range(32) for c in (a, b))
            )
    assert [r.status_code for r in answers] == [200] * 64
    assert idp.stats()["grants"].get("client_credentials") == 1


# -- claim rules -------------------------------------------------------------------------------


async def test_claim_rules_pass_and_fail_without_minting_or_calling_upstream(
    gw: GatewayUnderTest,
) -> None:
    api = gw.upstreams["api"]
    async with gw.client() as alice, gw.client() as boss:
        await login(gw, alice)
        await login(gw, boss, username="adminpro")
        gw.idp.reset_stats()
        api.clear()
        refused = {p: await alice.get(f"/{p}/x", headers=CSRF) for p in ("admin", "ops", "pro")}
        assert gw.idp.stats()["grants"].get("refresh_token", 0) == 0
        assert api.requests == []
        allowed = {p: await boss.get(f"/{p}/x", headers=CSRF) for p in ("admin", "ops", "pro")}
    for path, answer in refused.items():
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["error"] == "forbidden"
    for path, answer in allowed.items():
        assert answer.status_code == 200, (path, answer.text)
        assert answer.json()["sub"] == "adminpro"


# -- step-up -----------------------------------------------------------------------------------


async def test_step_up_from_acr_runs_a_stronger_login_with_a_new_session(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client() as client:
        await login(gw, client)
        weak_cookie = session_cookie(client)
        refused = await client.get("/secure/x", headers=CSRF)
        assert refused.status_code == 401, refused.text
        body = refused.json()
        assert body["error"] == "step_up_required"
        assert parse_qs(urlsplit(body["login_url"]).query)["acr_values"] == [MFA]
        # A navigation is sent to that login and back.
        navigation = await client.get("/secure/x?page=2", headers={"Accept": "text/html"})
        assert navigation.status_code == 302
        location = navigation.headers["location"]
        assert location.startswith(body["login_url"] + "&return_to=")
        done = await login(gw, client, password="mfa", url=location)
        assert done.status_code == 302 and done.headers["location"] == "/secure/x?page=2"
        strong_cookie = session_cookie(client)
        assert strong_cookie is not None and strong_cookie != weak_cookie
        allowed = await client.get("/secure/x", headers=CSRF)
        assert allowed.status_code == 200 and allowed.json()["sub"] == "alice"
    async with gw.client() as old:  # the weaker session ended with the step-up
        assert weak_cookie is not None
        old.cookies.set("gw_session", weak_cookie)
        assert (await old.get("/api/orders", headers=CSRF)).status_code == 401


async def test_the_callback_refuses_a_weaker_login_than_the_step_up_asked(
    gw: GatewayUnderTest,
) -> None:
    """An IdP that ignores what was asked (the test IdP honours the essential acr, so the
    request reaches it without the ``claims`` parameter) answers with a weaker login: the
    callback refuses it and keeps the session as it was."""
    async with gw.client() as client:
        await login(gw, client)
        body = (await client.get("/secure/x", headers=CSRF)).json()
        start = await client.get(body["login_url"])
        parts = urlsplit(start.headers["location"])
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "claims"]
        ignored = urlunsplit(parts._replace(query=urlencode(query)))
        answer = await login(gw, client, password="not-mfa", url=ignored)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "login_failed"
        assert "acr_values" in answer.json()["message"]
        still = await client.get("/secure/x", headers=CSRF)
        assert still.status_code == 401 and still.json()["error"] == "step_up_required"


async def test_step_up_from_max_age(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await login(gw, client, url="/auth/login?max_age=3&return_to=/")
        assert (await client.get("/fresh/x", headers=CSRF)).status_code == 200
        await asyncio.sleep(4)  # past the route's max_age of 3 s
        refused = await client.get("/fresh/x", headers=CSRF)
        assert refused.status_code == 401 and refused.json()["error"] == "step_up_required"
        login_url = refused.json()["login_url"]
        assert parse_qs(urlsplit(login_url).query)["max_age"] == ["3"]
        await login(gw, client, url=login_url)  # the IdP asks for the password again
        assert (await client.get("/fresh/x", headers=CSRF)).status_code == 200


async def test_step_up_from_an_upstream_rfc_9470_challenge(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await login(gw, client)
        answer = await client.get("/api/challenge", headers=CSRF)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "step_up_required"
        query = parse_qs(urlsplit(answer.json()["login_url"]).query)
        assert query["acr_values"] == [MFA] and query["max_age"] == ["300"]
        done = await login(gw, client, password="mfa", url=answer.json()["login_url"])
        assert done.status_code == 302


# -- one retry on a dead token -------------------------------------------------------------------


async def scrape_retries(client: httpx.AsyncClient, route: str) -> float:
    text = (await client.get("/metrics")).text
    match = re.search(rf'^gateway_token_retries_total{{route="{route}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_a_token_the_upstream_refuses_is_replaced_once(gw: GatewayUnderTest) -> None:
    api = gw.upstreams["api"]
    async with gw.client() as client:
        await login(gw, client)
        assert (await client.get("/api/warm", headers=CSRF)).status_code == 200
        gw.idp.reset_stats()
        api.revoke_next_token()
        answer = await client.get("/api/orders", headers=CSRF)
        assert answer.status_code == 200, answer.text
        assert api.refused_tokens == 1
        assert gw.idp.stats()["refresh_by_resource"] == {API: 1}
        # A small body is sent again whole.
        api.revoke_next_token()
        posted = await client.post("/api/orders", headers=CSRF, content=b"x" * 5000)
        assert posted.status_code == 200 and posted.json()["body_len"] == 5000
        assert api.refused_tokens == 2
        assert await scrape_retries(client, "api") == 2

        # A streamed body is never sent twice: the upstream's 401 is the answer.
        async def stream() -> AsyncIterator[bytes]:
            yield b"a" * 100
            yield b"b" * 100

        api.revoke_next_token()
        streamed = await client.post("/api/upload", headers=CSRF, content=stream())
        assert streamed.status_code == 401 and streamed.json()["error"] == "invalid_token"
        assert api.refused_tokens == 3
        assert await scrape_retries(client, "api") == 2
        # The refused token is replaced on the next request that can be retried.
        assert (await client.get("/api/orders", headers=CSRF)).status_code == 200


async def test_a_client_token_the_upstream_refuses_is_replaced_once(gw: GatewayUnderTest) -> None:
    api = gw.upstreams["api"]
    async with gw.client() as client:
        assert (await client.get("/client/warm")).status_code == 200
        gw.idp.reset_stats()
        api.revoke_next_token()
        answer = await client.get("/client/orders")
    assert answer.status_code == 200 and answer.json()["sub"] == CLIENT_ID
    assert gw.idp.stats()["grants"].get("client_credentials") == 1


# -- what a single-page app reads ------------------------------------------------------------------


async def test_me_lists_what_the_session_may_do_on_each_route(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        anonymous = await client.get("/auth/me")
        await login(gw, client)
        me = await client.get("/auth/me?slide=false")
    assert anonymous.status_code == 401
    before = {r["name"]: r["status"] for r in anonymous.json()["routes"]}
    assert before["api"] == "login_required" and before["client"] == "allowed"
    assert before["maybe"] == "allowed" and before["public"] == "allowed"
    assert me.status_code == 200
    status = {r["name"]: r for r in me.json()["routes"]}
    assert status["api"]["status"] == "allowed"
    assert status["admin"]["status"] == "forbidden"
    assert status["secure"]["status"] == "step_up_required"
    assert "acr_values=urn%3Atest%3Amfa" in status["secure"]["login_url"]
    assert status["client"]["status"] == "allowed" and status["client"]["auth"] == "client"


async def test_a_silent_login_comes_back_with_an_error_when_the_idp_has_no_session(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client() as client:
        answer = await client.get("/auth/login?prompt=none&return_to=/app", follow_redirects=True)
        assert answer.url.path == "/app"  # the app's page, not the IdP's
        assert answer.url.params["error"] == "login_required"
        assert session_cookie(client) is None
        # With a session at the IdP, the same silent login logs in without a page.
        await login(gw, client)
        first = session_cookie(client)
        silent = await client.get("/auth/login?prompt=none&return_to=/app")
        hops = 0
        while silent.status_code in (302, 303) and hops < 10:
            location = silent.headers["location"]
            if location == "/app":
                break
            silent = await client.get(location)
            hops += 1
        assert silent.status_code == 302 and silent.headers["location"] == "/app"
        assert session_cookie(client) not in (None, first)


# -- forward-auth gives the same answers --------------------------------------------------------


async def forward(client: httpx.AsyncClient, path: str, **headers: str) -> httpx.Response:
    return await client.get(
        "/auth/forward",
        headers={
            "X-Forward-Auth-Secret": FORWARD_SECRET,
            "X-Forwarded-Uri": path,
            "X-Forwarded-Method": "GET",
            **headers,
        },
    )


async def test_forward_auth_answers_each_mode_and_rule(gw: GatewayUnderTest) -> None:
    async with gw.client() as anonymous:
        client_route = await forward(anonymous, "/client/x")
        maybe = await forward(anonymous, "/maybe/x")
    assert client_route.status_code == 200
    claims = bearer_claims(dict(client_route.headers))
    assert claims is not None and claims["sub"] == CLIENT_ID and claims["aud"] == API
    assert "x-auth-request-user" not in client_route.headers
    assert maybe.status_code == 200 and "authorization" not in maybe.headers
    async with gw.client() as client:
        await login(gw, client)
        admin = await forward(client, "/admin/x", **CSRF)
        secure = await forward(client, "/secure/x?y=1", **CSRF)
    assert admin.status_code == 403 and admin.headers["x-auth-error"] == "forbidden"
    assert secure.status_code == 401 and secure.headers["x-auth-error"] == "step_up_required"
    login_url = secure.headers["x-auth-login-url"]
    query = parse_qs(urlsplit(login_url).query)
    assert query["return_to"] == ["/secure/x?y=1"] and query["acr_values"] == [MFA]
