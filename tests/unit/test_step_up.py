"""Step-up and the login's own options, on Auth0's wire format (respx for the IdP).

The authorization request asks for what the login asked for (``acr_values``, ``max_age``,
``organization``, ``prompt``; the OIDC ``claims`` parameter on the rfc8707 dialect only); the
callback refuses an ID token that answers less (a weaker ``acr``, an old ``auth_time``);
Auth0's ``mfa_required`` is a ``401 step_up_required`` whose login asks for the MFA acr; the
userinfo claims join the ID token's (which win); a silent login comes back to ``return_to``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx
from starlette.applications import Starlette

from gateway.errors import StepUpRequired
from gateway.oidc import OIDCClient
from gateway.routing import RouteTable
from gateway.sessions import MemorySessionStore, Session
from gateway.settings import Settings
from gateway.tokens import TokenBroker

from .conftest import API, DISCOVERY, ISSUER, access_token, id_token, make_settings, running_app

pytestmark = pytest.mark.anyio

TOKEN_URL = str(DISCOVERY["token_endpoint"])
ORIGIN = "https://app.example.com"
MFA_ACR = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"
MFA_BODY = {
    "error": "mfa_required",
    "error_description": "Multifactor authentication required",
    "mfa_token": "Fe26.2**mfa-token",
}
USERINFO_URL = ISSUER + "userinfo"


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


# -- the authorization request ---------------------------------------------------------------


async def _authorize_url(settings: Settings, **options: Any) -> dict[str, list[str]]:
    async with httpx.AsyncClient() as http:
        url = await OIDCClient(settings, http).authorize_url(
            state="st", nonce="no", code_challenge="cc", **options
        )
    assert url.startswith(str(DISCOVERY["authorization_endpoint"]) + "?")
    return query_of(url)


async def test_authorize_url_auth0_carries_the_logins_options(idp: respx.MockRouter) -> None:
    query = await _authorize_url(
        make_settings(),
        acr_values=(MFA_ACR, "urn:hw"),
        max_age=300,
        organization="org_abc",
        prompt="none",
    )
    assert query["acr_values"] == [f"{MFA_ACR} urn:hw"]
    assert query["max_age"] == ["300"]
    assert query["organization"] == ["org_abc"]
    assert query["prompt"] == ["none"]
    assert query["audience"] == [API]
    assert "claims" not in query  # Auth0 does not take the claims parameter


async def test_authorize_url_without_options_asks_for_none(idp: respx.MockRouter) -> None:
    query = await _authorize_url(make_settings())
    for name in ("acr_values", "max_age", "organization", "prompt", "claims"):
        assert name not in query
    assert (await _authorize_url(make_settings(oidc={"prompt": "login"})))["prompt"] == ["login"]
    # The login's own prompt wins over the configured one.
    configured = make_settings(oidc={"prompt": "login"})
    assert (await _authorize_url(configured, prompt="none"))["prompt"] == ["none"]


async def test_authorize_url_rfc8707_asks_for_the_acr_as_an_essential_claim(
    idp: respx.MockRouter,
) -> None:
    settings = make_settings(oidc={"dialect": "rfc8707"})
    query = await _authorize_url(settings, acr_values=("urn:mfa", "urn:hw"), max_age=0)
    # Not acr_values as well: it would make the claims request's acr voluntary again.
    assert "acr_values" not in query
    assert query["max_age"] == ["0"]
    assert json.loads(query["claims"][0]) == {
        "id_token": {"acr": {"essential": True, "values": ["urn:mfa", "urn:hw"]}}
    }
    assert "claims" not in await _authorize_url(settings, max_age=60)  # no acr asked


# -- mfa_required ------------------------------------------------------------------------------


async def test_mfa_required_is_a_step_up_asking_for_the_mfa_acr(
    settings: Settings, idp: respx.MockRouter
) -> None:
    token_route = idp.post(TOKEN_URL).respond(403, json=MFA_BODY)
    store = MemorySessionStore(idle_timeout=3600)
    async with httpx.AsyncClient() as http:
        broker = TokenBroker(
            oidc=OIDCClient(settings, http),
            store=store,
            settings=settings.tokens,
            login_url=ORIGIN + "/auth/login",
        )
        now = time.time()
        session = Session(
            id="s", sub="alice", refresh_token="rt", created_at=now, absolute_expiry=now + 3600
        )
        await store.save(session)
        route = RouteTable(settings.routes).by_name("api")
        assert route is not None
        with pytest.raises(StepUpRequired) as first:
            await broker.access_token(session, route)
        with pytest.raises(StepUpRequired) as again:  # remembered, still a step-up
            await broker.access_token(session, route)
    assert token_route.call_count == 1
    assert await store.load("s") is not None  # the session goes on: it only needs MFA
    for refusal in (first.value, again.value):
        assert refusal.status_code == 401 and refusal.error == "step_up_required"
        assert refusal.acr_values == (MFA_ACR,)
        login_url = refusal.extra["login_url"]
        assert login_url.startswith(ORIGIN + "/auth/login?")
        assert query_of(login_url) == {"acr_values": [MFA_ACR]}
    assert again.value is not first.value


async def test_mfa_required_through_the_proxy_is_401_step_up_required(
    idp: respx.MockRouter,
) -> None:
    idp.post(TOKEN_URL).respond(403, json=MFA_BODY)
    settings = make_settings(oidc={"mfa_acr_value": "urn:custom:mfa"})
    async with running_app(settings) as (app, client):
        _, cookie = await app.state.services.sessions.create(
            sub="alice", sid=None, refresh_token="rt", id_token=None, claims={}
        )
        headers = {"Cookie": cookie.split(";")[0], "X-CSRF": "1"}
        response = await client.get("/api/orders", headers=headers)
        navigation = await client.get("/api/orders", headers={**headers, "Accept": "text/html"})
    assert response.status_code == 401
    body = response.json()
    assert body["error"] == "step_up_required"
    assert query_of(body["login_url"]) == {"acr_values": ["urn:custom:mfa"]}
    assert navigation.status_code == 302
    assert query_of(navigation.headers["location"]) == {
        "acr_values": ["urn:custom:mfa"],
        "return_to": ["/api/orders"],
    }


# -- login and callback ------------------------------------------------------------------------


@dataclass
class Login:
    authorize: dict[str, list[str]]  # the authorization request's query
    callback: httpx.Response
    token_route: respx.Route


async def log_in(
    client: httpx.AsyncClient,
    idp: respx.MockRouter,
    *,
    params: dict[str, str] | None = None,
    cookie: str | None = None,
    **claims: Any,
) -> Login:
    """/auth/login with ``params``, then the callback with an ID token carrying ``claims``."""
    login = await client.get("/auth/login", params=params or {})
    assert login.status_code == 302, login.text
    query = query_of(login.headers["location"])
    nonce = query["nonce"][0]
    token_route = idp.post(TOKEN_URL).respond(
        json={
            "access_token": access_token(API, scope="read:orders"),
            "id_token": id_token(nonce=nonce, **claims),
            "refresh_token": "rt-1",
            "expires_in": 600,
        }
    )
    cookies = [login.headers["set-cookie"].split(";")[0]]
    if cookie is not None:
        cookies.append(cookie)
    callback = await client.get(
        "/auth/callback",
        params={"state": query["state"][0], "code": "code-1"},
        headers={"Cookie": "; ".join(cookies)},
    )
    return Login(query, callback, token_route)


def session_cookie(response: httpx.Response) -> str:
    return response.headers.get_list("set-cookie")[0].split(";")[0]


@pytest.fixture
async def gateway(idp: respx.MockRouter) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    async with running_app(make_settings()) as running:
        yield running


async def test_step_up_login_asks_and_the_callback_accepts_what_was_asked(
    gateway: tuple[Starlette, httpx.AsyncClient], idp: respx.MockRouter
) -> None:
    app, client = gateway
    done = await log_in(
        client,
        idp,
        params={"acr_values": "urn:mfa urn:hw", "max_age": "60", "return_to": "/x"},
        acr="urn:hw",
        auth_time=int(time.time()) - 10,
    )
    assert done.authorize["acr_values"] == ["urn:mfa urn:hw"]
    assert done.authorize["max_age"] == ["60"]
    assert done.callback.status_code == 302 and done.callback.headers["location"] == "/x"
    session_id = app.state.services.sessions.session_id_from_cookie(session_cookie(done.callback))
    session = await app.state.services.store.load(session_id)
    assert session is not None
    assert session.claims_dict()["acr"] == "urn:hw"  # kept for the routes' step-up


@pytest.mark.parametrize(
    ("params", "claims", "message"),
    [
        ({"acr_values": "urn:mfa"}, {"acr": "urn:pwd"}, "more weakly"),
        ({"acr_values": "urn:mfa"}, {}, "more weakly"),  # no acr at all
        ({"max_age": "60"}, {"auth_time": -200}, "within max_age"),  # long ago
        ({"max_age": "60"}, {}, "within max_age"),  # no auth_time
        ({"max_age": "60"}, {"auth_time": "recent"}, "within max_age"),
    ],
)
async def test_callback_refuses_a_weaker_answer(
    gateway: tuple[Starlette, httpx.AsyncClient],
    idp: respx.MockRouter,
    params: dict[str, str],
    claims: dict[str, Any],
    message: str,
) -> None:
    app, client = gateway
    if isinstance(claims.get("auth_time"), int):
        claims = {**claims, "auth_time": int(time.time()) + claims["auth_time"]}
    done = await log_in(client, idp, params=params, **claims)
    assert done.callback.status_code == 400
    assert done.callback.json()["error"] == "login_failed"
    assert message in done.callback.json()["message"]
    assert len(app.state.services.store) == 0  # no session was started


async def test_callback_issues_a_new_session_and_ends_the_old_one(
    gateway: tuple[Starlette, httpx.AsyncClient], idp: respx.MockRouter
) -> None:
    app, client = gateway
    idp.post(ISSUER + "oauth/revoke").respond(200)
    services = app.state.services
    old, old_cookie = await services.sessions.create(
        sub="auth0|mallory", sid=None, refresh_token="rt-old", id_token=None, claims={"x": 1}
    )
    done = await log_in(
        client,
        idp,
        params={"acr_values": "urn:mfa"},
        cookie=old_cookie.split(";")[0],
        acr="urn:mfa",
    )
    assert done.callback.status_code == 302
    new_id = services.sessions.session_id_from_cookie(session_cookie(done.callback))
    assert new_id is not None and new_id != old.id
    assert await services.store.load(old.id) is None
    new = await services.store.load(new_id)
    assert new is not None and new.sub == "auth0|alice" and "x" not in new.claims_dict()


@pytest.mark.parametrize(
    "params",
    [
        {"acr_values": "a b\x7f"},
        {"acr_values": " ".join(f"v{i}" for i in range(11))},
        {"max_age": "-1"},
        {"max_age": "1.5"},
        {"max_age": "12345678901"},
        {"prompt": "consent"},
        {"organization": "acme"},  # not one this gateway allows
    ],
)
async def test_login_refuses_malformed_options(
    gateway: tuple[Starlette, httpx.AsyncClient], params: dict[str, str]
) -> None:
    _, client = gateway
    response = await client.get("/auth/login", params=params)
    assert response.status_code == 400 and response.json()["error"] == "bad_request"


# -- userinfo ----------------------------------------------------------------------------------


@pytest.fixture
async def with_userinfo(
    idp: respx.MockRouter,
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    idp.get(ISSUER + ".well-known/openid-configuration").respond(
        json={**DISCOVERY, "userinfo_endpoint": USERINFO_URL}
    )
    async with running_app(make_settings(oidc={"userinfo": True})) as running:
        yield running


async def test_userinfo_claims_join_and_the_id_tokens_win(
    with_userinfo: tuple[Starlette, httpx.AsyncClient], idp: respx.MockRouter
) -> None:
    app, client = with_userinfo
    userinfo = idp.get(USERINFO_URL).respond(
        json={
            "sub": "auth0|alice",
            "email": "other@example.com",
            "https://example.com/roles": ["admin"],
        }
    )
    done = await log_in(client, idp)
    assert done.callback.status_code == 302, done.callback.text
    sent = userinfo.calls[0].request.headers["authorization"]
    assert sent.startswith("Bearer ey")
    services = app.state.services
    session = await services.store.load(
        services.sessions.session_id_from_cookie(session_cookie(done.callback))
    )
    assert session is not None
    claims = session.claims_dict()
    assert claims["email"] == "alice@example.com"  # the signed ID token's
    assert claims["https://example.com/roles"] == ["admin"]  # userinfo's own


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, json={"sub": "auth0|mallory", "roles": ["admin"]}),
        httpx.Response(200, json={"roles": ["admin"]}),  # no sub
        httpx.Response(401, json={"error": "invalid_token"}),
        httpx.Response(200, json=["not", "an", "object"]),
    ],
)
async def test_userinfo_about_another_user_or_unusable_is_refused(
    with_userinfo: tuple[Starlette, httpx.AsyncClient],
    idp: respx.MockRouter,
    answer: httpx.Response,
) -> None:
    app, client = with_userinfo
    idp.get(USERINFO_URL).mock(return_value=answer)
    done = await log_in(client, idp)
    assert done.callback.status_code == 400
    assert done.callback.json()["error"] == "login_failed"
    assert len(app.state.services.store) == 0


# -- silent login ------------------------------------------------------------------------------


async def _silent_login(client: httpx.AsyncClient, return_to: str) -> tuple[str, str]:
    """(state, login cookie) of a /auth/login?prompt=none."""
    login = await client.get("/auth/login", params={"prompt": "none", "return_to": return_to})
    assert query_of(login.headers["location"])["prompt"] == ["none"]
    return query_of(login.headers["location"])["state"][0], login.headers["set-cookie"].split(";")[
        0
    ]


async def test_silent_login_comes_back_with_the_idps_error(
    gateway: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, client = gateway
    state, cookie = await _silent_login(client, "/app?tab=2")
    response = await client.get(
        "/auth/callback",
        params={"state": state, "error": "login_required", "error_description": "x"},
        headers={"Cookie": cookie},
    )
    assert response.status_code == 302
    assert response.headers["location"] == "/app?tab=2&error=login_required"
    assert response.headers["cache-control"] == "no-store"
    assert any("Max-Age=0" in c for c in response.headers.get_list("set-cookie"))
    # The state was used: the same answer again is an ordinary refused login.
    again = await client.get(
        "/auth/callback",
        params={"state": state, "error": "login_required"},
        headers={"Cookie": cookie},
    )
    assert again.status_code == 400


async def test_silent_login_error_code_is_never_reflected_as_given(
    gateway: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, client = gateway
    state, cookie = await _silent_login(client, "/app")
    response = await client.get(
        "/auth/callback",
        params={"state": state, "error": "x&return_to=//evil"},
        headers={"Cookie": cookie},
    )
    assert response.status_code == 302
    assert response.headers["location"] == "/app?error=invalid_error"


@pytest.mark.parametrize("cookie", ["none", "another login's"])
async def test_silent_login_error_without_this_browsers_state_is_a_400(
    gateway: tuple[Starlette, httpx.AsyncClient], cookie: str
) -> None:
    _, client = gateway
    state, _ = await _silent_login(client, "/app")
    _, other = await _silent_login(client, "/other")
    headers = {} if cookie == "none" else {"Cookie": other}
    response = await client.get(
        "/auth/callback", params={"state": state, "error": "login_required"}, headers=headers
    )
    assert response.status_code == 400 and response.json()["error"] == "login_failed"


async def test_a_non_silent_login_refused_by_the_idp_is_a_400(
    gateway: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, client = gateway
    login = await client.get("/auth/login", params={"return_to": "/app"})
    state = query_of(login.headers["location"])["state"][0]
    response = await client.get(
        "/auth/callback",
        params={"state": state, "error": "access_denied"},
        headers={"Cookie": login.headers["set-cookie"].split(";")[0]},
    )
    assert response.status_code == 400 and "access_denied" in response.json()["message"]
