"""Sessions an operator can see and end: the admin API on its own port, logout everywhere,
session.max_per_user, and the browser family a session keeps."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
import respx
from starlette.applications import Starlette

from gateway.admin import AdminEndpoint
from gateway.session_admin import session_handle
from gateway.settings import Settings
from gateway.user_agent import user_agent_family

from .conftest import DISCOVERY, make_settings, running_app

pytestmark = pytest.mark.anyio

ADMIN_TOKEN = "admin-token-admin-token-admin-token-0123"
SECRET_KEY = "unit-test-secret-key-unit-test-secret-key"
ORIGIN = "https://app.example.com"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CHROME_ANDROID = (
    "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Mobile Safari/537.36"
)
EDGE = "Mozilla/5.0 (Windows NT 10.0) AppleWebKit/537.36 Chrome/126.0 Safari/537.36 Edg/126.0"

FAMILIES = {
    "firefox": (FIREFOX, "Firefox"),
    "chrome_android": (CHROME_ANDROID, "Chrome (mobile)"),
    "edge": (EDGE, "Edge"),
    "curl": ("curl/8.5.0", "curl"),
    "none": (None, "other"),
    "unknown": ("SomethingElse/1.0", "other"),
}


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_user_agent_family_names_the_browser_never_the_header(case: str) -> None:
    header, family = FAMILIES[case]
    assert user_agent_family(header) == family


@pytest.fixture(autouse=True)
def _admin_not_mocked(idp: respx.MockRouter) -> None:
    """The admin listener is a real loopback server: respx lets its requests through."""
    idp.route(host="127.0.0.1").pass_through()


def _settings(**session: object) -> Settings:
    return make_settings(
        session={"secret_key": [SECRET_KEY], **session},
        admin={"port": 0, "token": ADMIN_TOKEN},
    )


async def _login(app: Starlette, sub: str = "auth0|alice", ua: str = FIREFOX) -> tuple[str, str]:
    """A new session through SessionManager.create, as the callback makes one."""
    services = app.state.services
    session, set_cookie = await services.sessions.create(
        sub=sub,
        sid=f"sid-{sub}",
        refresh_token=f"rt-{sub}",
        id_token="idt",
        claims={},
        user_agent=user_agent_family(ua),
    )
    await services.session_admin.enforce_limit(session)
    return session.id, set_cookie.split(";")[0]


def _admin(app: Starlette) -> httpx.AsyncClient:
    port = app.state.admin.port
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)


BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REFUSED = {
    "no_token": {},
    "wrong_token": {"Authorization": "Bearer " + "x" * len(ADMIN_TOKEN)},
    "prefix_of_token": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    "basic": {"Authorization": f"Basic {ADMIN_TOKEN}"},
    "token_without_scheme": {"Authorization": ADMIN_TOKEN},
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_admin_refuses_a_missing_or_wrong_token(idp: respx.MockRouter, case: str) -> None:
    async with running_app(_settings()) as (app, _), _admin(app) as admin:
        await _login(app)
        listed = await admin.get("/admin/sessions?sub=auth0|alice", headers=REFUSED[case])
        deleted = await admin.delete("/admin/sessions?sub=auth0|alice", headers=REFUSED[case])
        left = await app.state.services.store.find(sub="auth0|alice")
    assert listed.status_code == deleted.status_code == 401
    assert listed.headers["www-authenticate"] == "Bearer"
    assert "sessions" not in listed.text and len(left) == 1


async def test_admin_lists_a_users_sessions_without_secrets(idp: respx.MockRouter) -> None:
    async with running_app(_settings()) as (app, _), _admin(app) as admin:
        first, cookie = await _login(app)
        second, _ = await _login(app, ua=CHROME_ANDROID)
        await _login(app, sub="auth0|bob")
        response = await admin.get("/admin/sessions", params={"sub": "auth0|alice"}, headers=BEARER)
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    sessions = response.json()["sessions"]
    assert [s["id"] for s in sessions] == [session_handle(first), session_handle(second)]
    assert [s["user_agent"] for s in sessions] == ["Firefox", "Chrome (mobile)"]
    for entry in sessions:
        assert set(entry) == {"id", "created_at", "last_seen", "expires_at", "user_agent"}
        assert entry["created_at"] <= entry["last_seen"] < entry["expires_at"]
    text = response.text
    for secret in (first, second, cookie.split("=", 1)[1], "rt-auth0|alice", ADMIN_TOKEN):
        assert secret not in text


async def test_admin_revokes_one_session_by_handle_or_all_of_a_user(
    idp: respx.MockRouter,
) -> None:
    revoke = idp.post(DISCOVERY["revocation_endpoint"]).respond(200)
    async with running_app(_settings()) as (app, client), _admin(app) as admin:
        first, cookie = await _login(app)
        second, _ = await _login(app)
        bob, _ = await _login(app, sub="auth0|bob")
        one = await admin.delete(
            "/admin/sessions",
            params={"sub": "auth0|alice", "id": session_handle(first)},
            headers=BEARER,
        )
        store = app.state.services.store
        after_one = sorted(await store.find(sub="auth0|alice"))
        me = await client.get("/auth/me", headers={"Cookie": cookie})
        rest = await admin.delete("/admin/sessions?sub=auth0|alice", headers=BEARER)
        left = await store.find(sub="auth0|alice")
        bob_left = await store.find(sub="auth0|bob")
        metrics = (await client.get("/metrics")).text
    assert one.json() == {"ended": 1} and after_one == [second]
    assert me.status_code == 401
    assert rest.json() == {"ended": 1} and left == [] and bob_left == [bob]
    assert revoke.call_count == 2  # each refresh token revoked at the IdP
    assert 'gateway_session_actions_total{action="revoke"} 2.0' in metrics
    assert 'gateway_sessions_ended_by_action_total{action="revoke"} 2.0' in metrics


async def test_admin_revokes_by_idp_session(idp: respx.MockRouter) -> None:
    idp.post(DISCOVERY["revocation_endpoint"]).respond(200)
    async with running_app(_settings()) as (app, _), _admin(app) as admin:
        await _login(app)
        await _login(app, sub="auth0|bob")
        response = await admin.delete("/admin/sessions?sid=sid-auth0|bob", headers=BEARER)
        store = app.state.services.store
        left = (await store.find(sub="auth0|alice"), await store.find(sub="auth0|bob"))
    assert response.json() == {"ended": 1} and len(left[0]) == 1 and left[1] == []


BAD_REQUESTS = {
    "list_without_sub": ("GET", "/admin/sessions", 400),
    "delete_without_sub_or_sid": ("DELETE", "/admin/sessions", 400),
    "handle_without_sub": ("DELETE", "/admin/sessions?id=abc&sid=x", 400),
    "other_path": ("GET", "/admin/other", 404),
    "post": ("POST", "/admin/sessions?sub=x", 405),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
async def test_admin_answers_bad_requests_in_json(idp: respx.MockRouter, case: str) -> None:
    method, path, status = BAD_REQUESTS[case]
    async with running_app(_settings()) as (app, _), _admin(app) as admin:
        response = await admin.request(method, path, headers=BEARER)
    assert response.status_code == status and "error" in response.json()


async def test_admin_listener_is_off_by_default_and_its_path_is_not_on_the_main_port(
    idp: respx.MockRouter,
) -> None:
    async with running_app(make_settings()) as (app, client):
        response = await client.get("/admin/sessions?sub=x", headers=BEARER)
    assert app.state.admin is None
    assert response.status_code != 200  # proxied to no route: 404, never the admin API


def test_admin_token_is_compared_whole() -> None:
    endpoint = AdminEndpoint(object(), token=ADMIN_TOKEN)  # type: ignore[arg-type]
    assert endpoint.is_authorized(f"Bearer {ADMIN_TOKEN}")
    assert not endpoint.is_authorized(f"Bearer {ADMIN_TOKEN} ")
    assert not endpoint.is_authorized(None)
    assert ADMIN_TOKEN not in repr(endpoint.__dict__)


def test_admin_port_without_a_token_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"admin\.token"):
        make_settings(admin={"port": 0})
    with pytest.raises(ValueError, match="32 characters"):
        make_settings(admin={"port": 0, "token": "short"})


async def test_max_per_user_ends_the_oldest_sessions_at_login(idp: respx.MockRouter) -> None:
    revoke = idp.post(DISCOVERY["revocation_endpoint"]).respond(200)
    async with running_app(_settings(max_per_user=2)) as (app, client):
        _, first_cookie = await _login(app)
        second, _ = await _login(app)
        third, third_cookie = await _login(app)
        bob, _ = await _login(app, sub="auth0|bob")
        left = sorted(await app.state.services.store.find(sub="auth0|alice"))
        old = await client.get("/auth/me", headers={"Cookie": first_cookie})
        new = await client.get("/auth/me", headers={"Cookie": third_cookie})
        metrics = (await client.get("/metrics")).text
    assert left == sorted([second, third]) and bob
    assert old.status_code == 401 and new.status_code == 200
    assert revoke.call_count == 1
    assert 'gateway_sessions_ended_by_action_total{action="max_per_user"} 1.0' in metrics


async def test_logout_everywhere_ends_every_session_of_the_user(
    idp: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    revoke = idp.post(DISCOVERY["revocation_endpoint"]).respond(200)
    caplog.set_level(logging.INFO, "gateway.admin")
    async with running_app(_settings()) as (app, client):
        _, cookie = await _login(app)
        _, other_cookie = await _login(app)
        await _login(app)
        bob, _ = await _login(app, sub="auth0|bob")
        response = await client.post(
            "/auth/logout",
            content=json.dumps({"everywhere": True}),
            headers={
                "Cookie": cookie,
                "X-CSRF": "1",
                "Origin": ORIGIN,
                "Content-Type": "application/json",
            },
        )
        store = app.state.services.store
        left = (await store.find(sub="auth0|alice"), await store.find(sub="auth0|bob"))
        other = await client.get("/auth/me", headers={"Cookie": other_cookie})
    assert response.status_code == 200, response.text
    assert response.json()["logged_out"] is True and response.json()["ended_elsewhere"] == 2
    assert left == ([], [bob]) and other.status_code == 401
    assert revoke.call_count == 3
    assert "logout_everywhere ended 2 session(s)" in caplog.text
    assert "auth0|alice" not in caplog.text and "rt-auth0" not in caplog.text


async def test_logout_everywhere_keeps_logouts_csrf_rules(idp: respx.MockRouter) -> None:
    async with running_app(_settings()) as (app, client):
        _, cookie = await _login(app)
        await _login(app)
        response = await client.post(
            "/auth/logout",
            content=json.dumps({"everywhere": True}),
            headers={"Cookie": cookie, "Content-Type": "application/json"},
        )
        left = await app.state.services.store.find(sub="auth0|alice")
    assert response.status_code == 403 and len(left) == 2


async def test_plain_logout_ends_only_this_session(idp: respx.MockRouter) -> None:
    idp.post(DISCOVERY["revocation_endpoint"]).respond(200)
    async with running_app(_settings()) as (app, client):
        _, cookie = await _login(app)
        await _login(app)
        response = await client.post(
            "/auth/logout", headers={"Cookie": cookie, "X-CSRF": "1", "Origin": ORIGIN}
        )
        left = await app.state.services.store.find(sub="auth0|alice")
    assert response.status_code == 200 and "ended_elsewhere" not in response.json()
    assert len(left) == 1


async def test_an_oversized_logout_body_is_413_and_ends_nothing(idp: respx.MockRouter) -> None:
    async with running_app(_settings()) as (app, client):
        _, cookie = await _login(app)
        response = await client.post(
            "/auth/logout",
            content=json.dumps({"everywhere": True, "padding": "x" * 2048}),
            headers={
                "Cookie": cookie,
                "X-CSRF": "1",
                "Origin": ORIGIN,
                "Content-Type": "application/json",
            },
        )
        left = await app.state.services.store.find(sub="auth0|alice")
    assert response.status_code == 413 and len(left) == 1
