"""Auth0 Organizations at login and callback, /auth/me's per-route statuses, forward-auth with
the token modes, and ``gateway check --online`` fetching client tokens (respx for the IdP).

The ID token must name the organization the login asked for (``org_id`` for an ``org_...`` id,
``org_name`` case-insensitively for a name), or one of the allowed ones when none was asked.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
from starlette.applications import Starlette

from gateway.cli import main
from gateway.sessions import MemorySessionStore

from .conftest import (
    API,
    BILLING,
    CLIENT_SECRET,
    DISCOVERY,
    ISSUER,
    access_token,
    make_settings,
    running_app,
)
from .test_step_up import log_in, session_cookie

pytestmark = pytest.mark.anyio

TOKEN_URL = str(DISCOVERY["token_endpoint"])
ORIGIN = "https://app.example.com"
UPSTREAM = "http://127.0.0.1:9/"
FORWARD_SECRET = "forward-auth-secret-forward-auth-secret-0123"


@pytest.fixture
async def orgs(idp: respx.MockRouter) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    settings = make_settings(oidc={"organizations": ["org_abc123", "Acme"]})
    async with running_app(settings) as running:
        yield running


@pytest.mark.parametrize(
    ("asked", "claims", "ok"),
    [
        ("org_abc123", {"org_id": "org_abc123"}, True),
        ("org_abc123", {"org_id": "org_other"}, False),
        ("org_abc123", {"org_name": "org_abc123"}, False),  # an id is checked against org_id
        ("org_abc123", {}, False),
        ("Acme", {"org_id": "org_x", "org_name": "acme"}, True),  # a name: case-insensitive
        ("Acme", {"org_name": "ACME"}, True),
        ("Acme", {"org_name": "Acme Corp"}, False),
        ("Acme", {"org_id": "Acme"}, False),  # a name is checked against org_name
        ("Acme", {}, False),
        (None, {"org_id": "org_abc123"}, True),  # none asked: one of the allowed
        (None, {"org_name": "acme"}, True),
        (None, {"org_id": "org_other", "org_name": "other"}, False),
        (None, {}, False),
    ],
)
async def test_callback_checks_the_organization(
    orgs: tuple[Starlette, httpx.AsyncClient],
    idp: respx.MockRouter,
    asked: str | None,
    claims: dict[str, Any],
    ok: bool,
) -> None:
    app, client = orgs
    params = {} if asked is None else {"organization": asked}
    done = await log_in(client, idp, params=params, **claims)
    if asked is None:
        assert "organization" not in done.authorize
    else:
        assert done.authorize["organization"] == [asked]
    if ok:
        assert done.callback.status_code == 302, done.callback.text
        assert len(app.state.services.store) == 1
    else:
        assert done.callback.status_code == 400
        assert done.callback.json()["error"] == "login_failed"
        assert "organization" in done.callback.json()["message"]
        assert len(app.state.services.store) == 0


@pytest.mark.parametrize("organization", ["org_nope", "acme corp", "Acme&x=1", ""])
async def test_login_refuses_an_organization_not_allowed(
    orgs: tuple[Starlette, httpx.AsyncClient], organization: str
) -> None:
    _, client = orgs
    response = await client.get("/auth/login", params={"organization": organization})
    if organization == "":  # empty: none asked
        assert response.status_code == 302
        assert "organization" not in parse_qs(urlsplit(response.headers["location"]).query)
    else:
        assert response.status_code == 400 and response.json()["error"] == "bad_request"


async def test_a_configured_organization_is_asked_by_every_login(idp: respx.MockRouter) -> None:
    settings = make_settings(oidc={"organization": "org_main"})
    async with running_app(settings) as (_, client):
        done = await log_in(client, idp, org_id="org_main")
        assert done.authorize["organization"] == ["org_main"]
        assert done.callback.status_code == 302
        refused = await log_in(client, idp, org_id="org_else")
        assert refused.callback.status_code == 400
        other = await client.get("/auth/login", params={"organization": "org_else"})
        assert other.status_code == 400


async def test_me_shows_the_organization(
    orgs: tuple[Starlette, httpx.AsyncClient], idp: respx.MockRouter
) -> None:
    _, client = orgs
    done = await log_in(
        client, idp, params={"organization": "Acme"}, org_id="org_acme1", org_name="acme"
    )
    me = await client.get("/auth/me", headers={"Cookie": session_cookie(done.callback)})
    assert me.status_code == 200
    assert me.json()["organization"] == {"id": "org_acme1", "name": "acme"}


async def test_me_without_an_organization_shows_none(idp: respx.MockRouter) -> None:
    async with running_app(make_settings()) as (_, client):
        done = await log_in(client, idp)
        me = await client.get("/auth/me", headers={"Cookie": session_cookie(done.callback)})
    assert me.status_code == 200 and "organization" not in me.json()


# -- /auth/me: what this session may do on each route ------------------------------------------

ME_ROUTES = [
    {"prefix": "/api/", "upstream": UPSTREAM, "audience": API},
    {"prefix": "/org/", "upstream": UPSTREAM, "audience": API, "require": {"org_id": "org_abc"}},
    {"prefix": "/admin/", "upstream": UPSTREAM, "audience": API, "require": {"roles": "admin"}},
    {"prefix": "/mfa/", "upstream": UPSTREAM, "audience": API, "acr_values": ["urn:mfa"]},
    {"prefix": "/fresh/", "upstream": UPSTREAM, "audience": API, "max_age": "5m"},
    {"prefix": "/client/", "upstream": UPSTREAM, "audience": BILLING, "auth": "client"},
    {"prefix": "/either/", "upstream": UPSTREAM, "audience": API, "auth": "user_or_client"},
    {"prefix": "/maybe/", "upstream": UPSTREAM, "audience": API, "auth": "user_or_none"},
    {"prefix": "/public/", "upstream": UPSTREAM, "auth": "none"},
]


@pytest.fixture
async def me_app(idp: respx.MockRouter) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    async with running_app(make_settings(routes=ME_ROUTES)) as running:
        yield running


async def _session(app: Starlette, **claims: Any) -> tuple[str, str]:
    session, set_cookie = await app.state.services.sessions.create(
        sub="auth0|alice", sid=None, refresh_token="rt", id_token=None, claims=claims
    )
    return session.id, set_cookie.split(";")[0]


def _statuses(body: dict[str, Any]) -> dict[str, str]:
    return {route["name"]: route["status"] for route in body["routes"]}


async def test_me_lists_each_routes_status(me_app: tuple[Starlette, httpx.AsyncClient]) -> None:
    app, client = me_app
    _, cookie = await _session(
        app, org_id="org_abc", roles=["staff"], acr="urn:pwd", auth_time=int(time.time()) - 3600
    )
    me = await client.get("/auth/me", headers={"Cookie": cookie})
    assert me.status_code == 200
    body = me.json()
    assert _statuses(body) == {
        "api": "allowed",
        "org": "allowed",
        "admin": "forbidden",
        "mfa": "step_up_required",
        "fresh": "step_up_required",
        "client": "allowed",
        "either": "allowed",
        "maybe": "allowed",
        "public": "allowed",
    }
    login_urls = {r["name"]: r.get("login_url") for r in body["routes"]}
    assert parse_qs(urlsplit(login_urls["mfa"]).query) == {"acr_values": ["urn:mfa"]}
    assert parse_qs(urlsplit(login_urls["fresh"]).query) == {"max_age": ["300"]}
    assert all(login_urls[n] is None for n in login_urls if n not in ("mfa", "fresh"))
    assert login_urls["mfa"].startswith(ORIGIN + "/auth/login?")
    modes = {route["name"]: route["auth"] for route in body["routes"]}
    assert modes["either"] == "user_or_client" and modes["client"] == "client"
    assert me.headers["cache-control"] == "no-store"


async def test_me_statuses_follow_the_session(me_app: tuple[Starlette, httpx.AsyncClient]) -> None:
    app, client = me_app
    _, cookie = await _session(
        app, org_id="org_zzz", roles=["admin"], acr="urn:mfa", auth_time=int(time.time()) - 10
    )
    body = (await client.get("/auth/me", headers={"Cookie": cookie})).json()
    statuses = _statuses(body)
    assert statuses["org"] == "forbidden"
    assert statuses["admin"] == statuses["mfa"] == statuses["fresh"] == "allowed"


async def test_me_without_a_session_is_401_with_each_routes_status(
    me_app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, client = me_app
    me = await client.get("/auth/me")
    assert me.status_code == 401
    body = me.json()
    assert body["error"] == "login_required"
    assert body["login_url"] == ORIGIN + "/auth/login"
    assert _statuses(body) == {
        "api": "login_required",
        "org": "login_required",
        "admin": "login_required",
        "mfa": "login_required",
        "fresh": "login_required",
        "client": "allowed",
        "either": "allowed",
        "maybe": "allowed",
        "public": "allowed",
    }


async def test_me_slide_false_does_not_extend_the_idle_timeout(
    me_app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    app, client = me_app
    store = app.state.services.store
    assert isinstance(store, MemorySessionStore)
    session_id, cookie = await _session(app)
    stored, deadline = store._sessions[session_id]
    stored.last_seen -= 600  # last seen ten minutes ago: a read would slide the expiry
    store._sessions[session_id] = (stored, deadline - 600)
    for query in ("?slide=false", "?slide=0", "?slide=no", "?slide=FALSE"):
        me = await client.get("/auth/me" + query, headers={"Cookie": cookie})
        assert me.status_code == 200
        assert store._sessions[session_id][1] == deadline - 600
    me = await client.get("/auth/me", headers={"Cookie": cookie})
    assert me.status_code == 200
    assert store._sessions[session_id][1] > deadline - 1


# -- forward-auth with the token modes ---------------------------------------------------------


def _client_answer(request: httpx.Request) -> httpx.Response:
    form = parse_qs(request.content.decode())
    sub = "client@clients" if form["grant_type"] == ["client_credentials"] else "auth0|alice"
    token = access_token(form["audience"][0], sub=sub)
    return httpx.Response(200, json={"access_token": token, "expires_in": 600})


async def test_forward_auth_client_token_and_user_or_none(idp: respx.MockRouter) -> None:
    token_route = idp.post(TOKEN_URL).mock(side_effect=_client_answer)
    settings = make_settings(
        routes=ME_ROUTES,
        forward_auth={"enabled": True, "secret": FORWARD_SECRET, "user_headers": True},
    )
    async with running_app(settings) as (app, client):
        _, cookie = await _session(app, email="alice@example.com")

        async def forward(path: str, **headers: str) -> httpx.Response:
            return await client.get(
                "/auth/forward",
                headers={
                    "X-Forward-Auth-Secret": FORWARD_SECRET,
                    "X-Forwarded-Uri": path,
                    "X-Forwarded-Method": "GET",
                    **headers,
                },
            )

        for headers in ({}, {"Cookie": cookie, "X-CSRF": "1"}):
            answer = await forward("/client/x", **headers)
            assert answer.status_code == 200
            assert answer.headers["authorization"].startswith("Bearer ey")
            assert "x-auth-request-user" not in answer.headers  # a client token: no user
            assert "x-auth-request-email" not in answer.headers
        maybe = await forward("/maybe/x")
        assert maybe.status_code == 200
        assert "authorization" not in maybe.headers and "x-auth-request-user" not in maybe.headers
        user = await forward("/maybe/x", Cookie=cookie, **{"X-CSRF": "1"})
        assert user.status_code == 200 and user.headers["x-auth-request-user"] == "auth0|alice"
        refused = await forward("/api/x")
        assert refused.status_code == 401 and refused.headers["x-auth-error"] == "login_required"
    grants = [parse_qs(c.request.content.decode())["grant_type"][0] for c in token_route.calls]
    assert grants == ["client_credentials", "refresh_token"]  # the client token once


# -- gateway check --online ---------------------------------------------------------------------

CLI_CONFIG = f"""
oidc: {{issuer: "{ISSUER}", client_id: abc}}
routes:
  - {{prefix: /c/, upstream: "{UPSTREAM}", auth: client, audience: "{API}", scopes: [read:orders]}}
  - {{prefix: /e/, upstream: "{UPSTREAM}", auth: user_or_client, audience: "{API}",
      scopes: [read:orders]}}
  - {{prefix: /b/, upstream: "{UPSTREAM}", auth: client, audience: "{BILLING}"}}
  - {{prefix: /u/, upstream: "{UPSTREAM}", audience: "{API}"}}
"""


def test_check_online_fetches_one_client_token_per_audience_and_scopes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    idp: respx.MockRouter,
) -> None:
    monkeypatch.setenv("GATEWAY_OIDC__CLIENT_SECRET", CLIENT_SECRET)
    config = tmp_path / "g.yaml"
    config.write_text(CLI_CONFIG)

    def answer(request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        assert form["grant_type"] == ["client_credentials"]
        if form["audience"] == [BILLING]:
            return httpx.Response(403, json={"error": "access_denied"})
        token = access_token(API, scope="read:orders", ttl=86400)
        return httpx.Response(200, json={"access_token": token, "expires_in": 86400})

    token_route = idp.post(TOKEN_URL).mock(side_effect=answer)
    assert main(["check", "--config", str(config), "--online"]) == 1
    out = capsys.readouterr().out
    assert token_route.call_count == 2  # /c/ and /e/ share (audience, scopes); /u/ is a user's
    assert f"client token for route c: ok (audience {API}, scope read:orders" in out
    assert "client token for route b: FAILED audience_not_permitted" in out
    assert "route e:" not in out and "route u:" not in out

    token_route.mock(
        return_value=httpx.Response(
            200, json={"access_token": access_token(API, scope="read:orders"), "expires_in": 60}
        )
    )
    config.write_text(CLI_CONFIG.split("  - {prefix: /b/")[0])
    assert main(["check", "--config", str(config), "--online"]) == 0
    assert "client token for route c: ok" in capsys.readouterr().out


async def test_a_name_is_chosen_case_insensitively_in_its_configured_spelling(
    idp: respx.MockRouter,
) -> None:
    settings = make_settings(oidc={"organizations": ["org_main", "Acme"]})
    async with running_app(settings) as (_, client):
        login = await client.get("/auth/login", params={"organization": "ACME"})
        assert login.status_code == 302
        query = parse_qs(urlsplit(login.headers["location"]).query)
        assert query["organization"] == ["Acme"]
        # An id is matched exactly.
        assert (
            await client.get("/auth/login", params={"organization": "ORG_MAIN"})
        ).status_code == 400
