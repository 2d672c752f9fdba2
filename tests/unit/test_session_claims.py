"""Compact claims (``Claims``, what the memory store keeps): the same values on every read, the
same Redis wire format as before, and nothing decoded on the proxy hot path."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import respx

from gateway import create_app
from gateway.sessions.base import Claims, Session
from gateway.sessions.memory import MemorySessionStore

from .conftest import API, DISCOVERY, ISSUER, access_token, id_token, make_settings

pytestmark = pytest.mark.anyio

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
# Blobs written by the code before Claims existed (Session.to_json of the previous release).
OLD_BLOB = (
    b'{"id":"i","sub":"auth0|x","refresh_token":"rt","created_at":1.0,"absolute_expiry":2.0,'
    b'"sid":"s","id_token":"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",'
    b'"claims":{"sub":"auth0|x","name":"Zo\\u00eb"},"last_seen":1.5,"rt_version":3}'
)
OLD_BLOB_DEFAULTS = (
    b'{"id":"i","sub":"x","refresh_token":"rt","created_at":1.0,"absolute_expiry":2.0,'
    b'"sid":null,"id_token":null,"claims":{},"last_seen":0.0,"rt_version":0}'
)


def _session(**overrides: Any) -> Session:
    fields: dict[str, Any] = {
        "id": "i",
        "sub": "auth0|x",
        "refresh_token": "rt",
        "created_at": 1.0,
        "absolute_expiry": 2.0,
        "sid": "s",
        "id_token": JWT,
        "claims": {"sub": "auth0|x", "name": "Zoë"},
        "last_seen": 1.5,
        "rt_version": 3,
    }
    fields.update(overrides)
    return Session(**fields)


@pytest.mark.parametrize("compact", [False, True], ids=["dict", "compact"])
def test_wire_format_is_unchanged_both_ways(compact: bool) -> None:
    for blob in (OLD_BLOB, OLD_BLOB_DEFAULTS):
        session = Session.from_json(blob)  # old writer, new reader
        if compact:
            session.compact()
        assert session.to_json() == blob  # new writer: byte for byte what old readers parsed
    session = Session.from_json(OLD_BLOB)
    assert session.claims == {"sub": "auth0|x", "name": "Zoë"} and session.id_token == JWT


def test_compact_keeps_every_value_and_holds_json() -> None:
    session = _session()
    session.compact()
    session.compact()  # idempotent
    assert isinstance(session.claims, Claims)
    assert session.claims._json == '{"sub":"auth0|x","name":"Zoë"}'.encode()
    assert session.claims == {"sub": "auth0|x", "name": "Zoë"}
    assert session.claims["name"] == "Zoë" and session.claims.get("email") is None
    assert sorted(session.claims) == ["name", "sub"] and len(session.claims) == 2
    assert session == _session()  # equality compares values, not representations
    assert "Zoë" not in repr(session.claims)


def test_compact_claims_reads_are_fresh_copies() -> None:
    session = _session(claims={"sub": "auth0|x", "roles": ["a"], "n": 1, "ok": True})
    session.compact()
    first = session.claims_dict()
    first["roles"].append("mutated")
    assert session.claims_dict() == {"sub": "auth0|x", "roles": ["a"], "n": 1, "ok": True}


def test_compact_is_much_smaller_than_the_dict() -> None:
    claims = {
        "sub": "auth0|0123456789abcdef01234567",
        "name": "User 01234567",
        "email": "01234567@example.com",
        "email_verified": True,
        "picture": "https://s.gravatar.com/avatar/0123456789abcdef0123456789abcdef?s=480",
    }
    as_dict = _deep_size(claims)
    compact = _deep_size(Claims(claims))
    assert compact < as_dict * 0.6, (compact, as_dict)


def _deep_size(value: object) -> int:
    if isinstance(value, Claims):
        return sys.getsizeof(value) + sys.getsizeof(value._json)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(_deep_size(v) for v in value.values())
    return sys.getsizeof(value)


def test_replace_of_a_compact_session_keeps_the_claims() -> None:
    session = _session()
    session.compact()
    rotated = replace(session, refresh_token="rt-2", rt_version=4)
    assert rotated.claims == session.claims and rotated.id_token == JWT
    assert json.loads(rotated.to_json())["claims"] == {"sub": "auth0|x", "name": "Zoë"}


async def test_memory_store_compacts_and_the_hot_path_decodes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemorySessionStore(idle_timeout=60)
    now = time.time()
    session = _session(created_at=now, absolute_expiry=now + 3600, last_seen=now, rt_version=0)
    await store.save(session)
    assert isinstance(session.claims, Claims)

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("decoded on the hot path")

    monkeypatch.setattr(json, "loads", refuse)
    loaded = await store.load(session.id)
    assert loaded is not None and not loaded.is_expired()
    assert (loaded.id, loaded.sub, loaded.last_seen, loaded.absolute_expiry) == (
        "i",
        "auth0|x",
        now,
        now + 3600,
    )
    await store.touch(loaded)
    assert await store.find(sub="auth0|x", sid="s") == ["i"]
    monkeypatch.undo()
    assert loaded.claims == {"sub": "auth0|x", "name": "Zoë"} and loaded.id_token == JWT


async def test_login_me_and_logout_read_the_compact_session(idp: respx.MockRouter) -> None:
    """Through the real routes: /auth/me shows the claims, logout sends the exact ID token."""
    app = create_app(make_settings())
    idp.post(ISSUER + "oauth/revoke").respond(200)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="https://app.example.com",
        ) as client,
    ):
        login = await client.get("/auth/login")
        query = parse_qs(urlsplit(login.headers["location"]).query)
        state, nonce = query["state"][0], query["nonce"][0]
        token = id_token(nonce=nonce, name="Zoë Example", email_verified=True)
        idp.post(str(DISCOVERY["token_endpoint"])).respond(
            json={"access_token": "at", "id_token": token, "refresh_token": "rt-1"}
        )
        login_cookie = login.headers["set-cookie"].split(";")[0]
        callback = await client.get(
            "/auth/callback",
            params={"state": state, "code": "code-1"},
            headers={"Cookie": login_cookie},
        )
        assert callback.status_code == 302, callback.text
        cookie = callback.headers.get_list("set-cookie")[0].split(";")[0]
        store = app.state.services.store
        assert isinstance(store, MemorySessionStore) and len(store) == 1
        held = next(iter(store._sessions.values()))[0]
        assert isinstance(held.claims, Claims)

        me = await client.get("/auth/me", headers={"Cookie": cookie})
        assert me.status_code == 200
        assert me.json()["claims"] == {
            "sub": "auth0|alice",
            "name": "Zoë Example",
            "email": "alice@example.com",
            "email_verified": True,
        }
        logout = await client.post("/auth/logout", headers={"Cookie": cookie, "X-CSRF": "1"})
    assert logout.status_code == 200 and logout.json()["logged_out"] is True
    hint = parse_qs(urlsplit(logout.json()["logout_url"]).query)["id_token_hint"]
    assert hint == [token]


async def test_callback_keeps_the_login_token_for_the_login_audience(
    idp: respx.MockRouter,
) -> None:
    """auth0 dialect with login_audience: the code exchange's access token serves that
    audience's route (no refresh-token exchange on its first request); others stay empty."""
    app = create_app(make_settings())
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://app.example.com"
        ) as client,
    ):
        login = await client.get("/auth/login")
        query = parse_qs(urlsplit(login.headers["location"]).query)
        login_token = access_token(API, scope="openid offline_access read:orders")
        idp.post(str(DISCOVERY["token_endpoint"])).respond(
            json={
                "access_token": login_token,
                "expires_in": 600,
                "scope": "openid offline_access read:orders",
                "id_token": id_token(nonce=query["nonce"][0]),
                "refresh_token": "rt-1",
            }
        )
        callback = await client.get(
            "/auth/callback",
            params={"state": query["state"][0], "code": "code-1"},
            headers={"Cookie": login.headers["set-cookie"].split(";")[0]},
        )
        assert callback.status_code == 302, callback.text
        services = app.state.services
        session_id = next(iter(services.store._sessions))
        api, billing = services.routes.by_name("api"), services.routes.by_name("billing")
        assert services.broker.cached_token(session_id, api) == login_token
        assert services.broker.cached_token(session_id, billing) is None


def test_wire_format_carries_the_user_agent_family_only_when_known() -> None:
    session = _session(user_agent="Firefox")
    blob = session.to_json()
    assert blob.endswith(b'"rt_version":3,"user_agent":"Firefox"}')
    assert Session.from_json(blob) == session
    assert b"user_agent" not in _session().to_json()


def test_wire_format_ignores_keys_of_a_later_version() -> None:
    later = OLD_BLOB[:-1] + b',"a_later_field":[1,2]}'
    assert Session.from_json(later) == Session.from_json(OLD_BLOB)
