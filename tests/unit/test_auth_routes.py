"""The /auth endpoints: which requests may log out without the anti-CSRF header, and how many
logins an unauthenticated client can leave pending."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import respx
from starlette.applications import Starlette

from tests.unit.test_redis_store import REDIS_URL, _delete_prefix

from .conftest import DISCOVERY, make_settings, running_app

pytestmark = pytest.mark.anyio

SECRET_KEY = "unit-test-secret-key-unit-test-secret-key"
ORIGIN = "https://app.example.com"


# -- logout without the anti-CSRF header (review item 3) ---------------------------------------


def _fetch(site: str | None, mode: str | None, dest: str | None) -> dict[str, str]:
    sent = {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest}
    return {name: value for name, value in sent.items() if value is not None}


# What Chromium sends for each way a page can make a GET to /auth/logout.
REFUSED_GETS: dict[str, dict[str, str]] = {
    "same_origin_img": _fetch("same-origin", "no-cors", "image"),
    "same_origin_script": _fetch("same-origin", "no-cors", "script"),
    "same_origin_css": _fetch("same-origin", "no-cors", "style"),
    "same_origin_iframe": _fetch("same-origin", "navigate", "iframe"),
    "same_origin_fetch": _fetch("same-origin", "cors", "empty"),
    "same_origin_prefetch": _fetch("same-origin", "no-cors", "empty"),
    "same_site_link": _fetch("same-site", "navigate", "document"),
    "cross_site_link": _fetch("cross-site", "navigate", "document"),
    "typed_in_address_bar": _fetch("none", "navigate", "document"),
    "no_fetch_metadata": {},
    "site_only": _fetch("same-origin", None, None),
}


async def _logged_in(app: Starlette) -> tuple[str, str]:
    """A new session: (its id, the Cookie header that carries it)."""
    session, set_cookie = await app.state.services.sessions.create(
        sub="auth0|alice", sid="sid-1", refresh_token="rt-1", id_token="idt-1", claims={}
    )
    return session.id, set_cookie.split(";")[0]


@pytest.mark.parametrize("case", sorted(REFUSED_GETS))
async def test_logout_get_without_header_refused_unless_top_level_navigation(
    idp: respx.MockRouter, case: str
) -> None:
    revoke = idp.post(DISCOVERY["revocation_endpoint"]).respond(200)
    async with running_app(make_settings(session={"secret_key": [SECRET_KEY]})) as (app, client):
        session_id, cookie = await _logged_in(app)
        response = await client.get(
            "/auth/logout", headers={"Cookie": cookie, **REFUSED_GETS[case]}
        )
        live = await app.state.services.store.load(session_id) is not None
    assert response.status_code == 403 and response.json()["error"] == "csrf_failed"
    assert live and not revoke.called


ACCEPTED: dict[str, tuple[str, dict[str, str], int]] = {
    "link_on_our_page": ("GET", _fetch("same-origin", "navigate", "document"), 303),
    "form_post": ("POST", {"Origin": ORIGIN, **_fetch("same-origin", "navigate", "document")}, 303),
    "form_post_no_fetch_metadata": ("POST", {"Origin": ORIGIN}, 303),
    "spa_call_with_header": ("POST", {"X-CSRF": "1", "Origin": ORIGIN}, 200),
    "get_with_header": ("GET", {"X-CSRF": "1"}, 200),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
async def test_logout_accepted_with_header_form_post_or_top_level_navigation(
    idp: respx.MockRouter, case: str
) -> None:
    revoke = idp.post(DISCOVERY["revocation_endpoint"]).respond(200)
    method, headers, status = ACCEPTED[case]
    async with running_app(make_settings(session={"secret_key": [SECRET_KEY]})) as (app, client):
        session_id, cookie = await _logged_in(app)
        response = await client.request(
            method, "/auth/logout", headers={"Cookie": cookie, **headers}
        )
        live = await app.state.services.store.load(session_id) is not None
    assert response.status_code == status
    if status == 303:
        assert response.headers["location"].startswith(DISCOVERY["end_session_endpoint"])
    assert not live and revoke.called


async def test_logout_cross_origin_form_post_is_refused(idp: respx.MockRouter) -> None:
    async with running_app(make_settings(session={"secret_key": [SECRET_KEY]})) as (app, client):
        session_id, cookie = await _logged_in(app)
        response = await client.post(
            "/auth/logout",
            headers={
                "Cookie": cookie,
                "Origin": "https://evil.example",
                "Sec-Fetch-Site": "cross-site",
            },
        )
        assert await app.state.services.store.load(session_id) is not None
    assert response.status_code == 403


# -- pending logins (review item 6) ------------------------------------------------------------

LONG_RETURN_TO = "/" + "x" * 1999  # the review's 2,000 characters
CAP = 20


def _store_settings(store: str, prefix: str) -> dict[str, Any]:
    session: dict[str, Any] = {"secret_key": [SECRET_KEY], "max_pending_logins": CAP}
    if store == "redis":
        session.update(store="redis", redis_url=REDIS_URL, redis_key_prefix=prefix)
    return session


async def _pending_logins(app: Starlette, store: str, prefix: str) -> int:
    gateway = app.state.services
    if store == "memory":
        return len(gateway.store._logins)
    return len([k async for k in gateway.store._redis.scan_iter(match=f"{prefix}login:*")])


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_login_flood_leaves_at_most_max_pending_logins(
    idp: respx.MockRouter, store: str
) -> None:
    """Before: every unauthenticated GET /auth/login left a ~2.6 KB record in Redis for 10
    minutes (the memory store evicted real pending logins past 100,000)."""
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    settings = make_settings(session=_store_settings(store, prefix))
    try:
        async with running_app(settings) as (app, client):
            answers = [
                await client.get("/auth/login", params={"return_to": LONG_RETURN_TO})
                for _ in range(CAP + 30)
            ]
            pending = await _pending_logins(app, store, prefix)
    finally:
        await _delete_prefix(REDIS_URL, prefix)
    statuses = [a.status_code for a in answers]
    assert statuses == [302] * CAP + [503] * 30
    refused = answers[-1]
    assert refused.json()["error"] == "too_many_pending_logins"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "set-cookie" not in refused.headers
    assert pending == CAP
