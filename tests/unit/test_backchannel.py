"""OIDC Back-Channel Logout 1.0: logout-token validation, replay and the endpoint."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette

from gateway.backchannel import (
    BACKCHANNEL_LOGOUT_EVENT,
    MAX_BODY_BYTES,
    validate_logout_token,
)
from gateway.errors import InvalidLogoutToken, SessionStoreUnavailable
from gateway.oidc import OIDCClient
from gateway.settings import Settings
from tests.unit.test_redis_store import redis_store

from .conftest import CLIENT_ID, CLIENT_SECRET, ISSUER, KID, make_settings, running_app, sign
from .test_oidc import EC_KEY, EC_KID, serve_keycloak_like_keys

pytestmark = pytest.mark.anyio

SECRET_KEY = "unit-test-secret-key-unit-test-secret-key"
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EVENTS: dict[str, dict[str, Any]] = {BACKCHANNEL_LOGOUT_EVENT: {}}
FORM = {"content-type": "application/x-www-form-urlencoded"}


def logout_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "events": EVENTS,
        "sub": "auth0|alice",
        "sid": "sid-1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def logout_token(**overrides: Any) -> str:
    return sign(logout_claims(**overrides))


def unsigned(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key=None, algorithm="none")  # type: ignore[arg-type]


def settings_with_secret() -> Settings:
    return make_settings(session={"secret_key": [SECRET_KEY]})


@pytest.fixture
async def oidc(idp: respx.MockRouter) -> AsyncIterator[OIDCClient]:
    async with httpx.AsyncClient() as http:
        yield OIDCClient(settings_with_secret(), http)


async def _validate(oidc: OIDCClient, token: str) -> Any:
    return await validate_logout_token(oidc, settings_with_secret().oidc, token)


async def test_validate_logout_token_accepts_sid_and_sub(oidc: OIDCClient) -> None:
    claims = await _validate(oidc, logout_token())
    assert claims.sid == "sid-1" and claims.sub == "auth0|alice"
    # Remembered until exp (120 s) plus the 30 s leeway, not forever.
    assert 140 <= claims.replay_ttl <= 151
    assert "alice" not in repr(claims)


async def test_validate_logout_token_accepts_sub_only_and_sid_only(oidc: OIDCClient) -> None:
    assert (await _validate(oidc, logout_token(sid=None))).sid is None
    assert (await _validate(oidc, logout_token(sub=None))).sub is None


def _now() -> int:
    return int(time.time())


INVALID_TOKENS: dict[str, Any] = {
    "alg_none": lambda: unsigned(logout_claims()),
    "hs256_with_client_secret": lambda: jwt.encode(
        logout_claims(), CLIENT_SECRET, algorithm="HS256", headers={"kid": "key-1"}
    ),
    "unknown_key": lambda: sign(logout_claims(), key=OTHER_KEY, kid="other"),
    "wrong_key_known_kid": lambda: sign(logout_claims(), key=OTHER_KEY),
    "tampered_payload": lambda: _tamper(logout_token()),
    "garbage": lambda: "not-a-jwt",
    "wrong_issuer": lambda: logout_token(iss="https://evil.example/"),
    "wrong_audience": lambda: logout_token(aud="another-client"),
    "several_audiences_no_azp": lambda: logout_token(aud=[CLIENT_ID, "other"]),
    "expired": lambda: logout_token(iat=_now() - 400, exp=_now() - 200),
    "issued_in_future": lambda: logout_token(iat=_now() + 600, exp=_now() + 900),
    "too_old": lambda: logout_token(iat=_now() - 3600, exp=_now() + 3600),
    "no_exp": lambda: logout_token(exp=None),
    "no_iat": lambda: logout_token(iat=None),
    "no_jti": lambda: logout_token(jti=None),
    "jti_not_string": lambda: logout_token(jti=12345),
    "jti_too_long": lambda: logout_token(jti="j" * 300),
    "no_events": lambda: logout_token(events=None),
    "events_not_object": lambda: logout_token(events=[BACKCHANNEL_LOGOUT_EVENT]),
    "other_event": lambda: logout_token(events={"http://example.com/other": {}}),
    "event_not_object": lambda: logout_token(events={BACKCHANNEL_LOGOUT_EVENT: "yes"}),
    "nonce_present": lambda: logout_token(nonce="n-1"),
    "neither_sid_nor_sub": lambda: logout_token(sid=None, sub=None),
    "sub_not_string": lambda: logout_token(sub=42),
    "sid_lone_surrogate": lambda: logout_token(sid="\ud800"),
}


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    forged = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b"alice", b"mallory")
    ).decode()
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize("case", sorted(INVALID_TOKENS))
async def test_validate_logout_token_refuses(oidc: OIDCClient, case: str) -> None:
    token = INVALID_TOKENS[case]()
    with pytest.raises(InvalidLogoutToken) as raised:
        await _validate(oidc, token)
    assert raised.value.status_code == 400 and raised.value.error == "invalid_request"
    assert token not in raised.value.message


# -- the endpoint ------------------------------------------------------------------------------


async def _new_session(app: Starlette, *, sub: str, sid: str | None) -> str:
    session, _ = await app.state.services.sessions.create(
        sub=sub, sid=sid, refresh_token=f"rt-{uuid.uuid4().hex}", id_token=None, claims={}
    )
    return str(session.id)


async def _live(app: Starlette, session_id: str) -> bool:
    return await app.state.services.store.load(session_id) is not None


async def test_backchannel_logout_ends_the_session_of_its_sid(idp: respx.MockRouter) -> None:
    async with running_app(settings_with_secret()) as (app, client):
        target = await _new_session(app, sub="auth0|alice", sid="sid-1")
        other_device = await _new_session(app, sub="auth0|alice", sid="sid-2")
        bob = await _new_session(app, sub="auth0|bob", sid="sid-3")
        response = await client.post(
            "/auth/backchannel-logout", data={"logout_token": logout_token()}
        )
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert not await _live(app, target)
        assert await _live(app, other_device) and await _live(app, bob)


async def test_backchannel_logout_by_sub_ends_every_session_of_the_user(
    idp: respx.MockRouter,
) -> None:
    async with running_app(settings_with_secret()) as (app, client):
        phone = await _new_session(app, sub="auth0|alice", sid="sid-1")
        laptop = await _new_session(app, sub="auth0|alice", sid=None)
        bob = await _new_session(app, sub="auth0|bob", sid="sid-3")
        response = await client.post(
            "/auth/backchannel-logout", data={"logout_token": logout_token(sid=None)}
        )
        assert response.status_code == 200
        assert not await _live(app, phone) and not await _live(app, laptop)
        assert await _live(app, bob)
        # No IdP call: the IdP already ended the grant, nothing is revoked.
        assert not any(call.request.method == "POST" for call in idp.calls)


async def test_backchannel_logout_replayed_token_is_400(idp: respx.MockRouter) -> None:
    token = logout_token()
    async with running_app(settings_with_secret()) as (app, client):
        first = await client.post("/auth/backchannel-logout", data={"logout_token": token})
        session_id = await _new_session(app, sub="auth0|alice", sid="sid-1")
        replay = await client.post("/auth/backchannel-logout", data={"logout_token": token})
        assert first.status_code == 200
        assert replay.status_code == 400 and replay.json()["error"] == "invalid_request"
        assert await _live(app, session_id)  # the replay ended nothing


BAD_BODIES: dict[str, tuple[dict[str, str], bytes]] = {
    "json_body": ({"content-type": "application/json"}, b'{"logout_token": "x"}'),
    "no_content_type": ({}, b"logout_token=x"),
    "empty_form": (FORM, b""),
    "no_logout_token": (FORM, b"token=abc"),
    "two_logout_tokens": (FORM, b"logout_token=a&logout_token=b"),
    "not_a_form": (FORM, b"&&&=="),
    "not_ascii": (FORM, "logout_token=\u00e9".encode()),
    "many_fields": (FORM, b"&".join(b"f%d=1" % i for i in range(40))),
    "garbage_token": (FORM, b"logout_token=a.b.c"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
async def test_backchannel_logout_bad_request_is_400_json(idp: respx.MockRouter, case: str) -> None:
    headers, body = BAD_BODIES[case]
    async with running_app(settings_with_secret()) as (_, client):
        response = await client.post("/auth/backchannel-logout", headers=headers, content=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert response.headers["cache-control"] == "no-store"


async def test_backchannel_logout_oversized_body_is_413(idp: respx.MockRouter) -> None:
    big = b"logout_token=" + b"a" * MAX_BODY_BYTES

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    async with running_app(settings_with_secret()) as (_, client):
        sized = await client.post("/auth/backchannel-logout", headers=FORM, content=big)
        streamed = await client.post("/auth/backchannel-logout", headers=FORM, content=chunked())
    assert sized.status_code == streamed.status_code == 413
    assert sized.json()["error"] == "payload_too_large"


async def test_backchannel_logout_get_is_refused(idp: respx.MockRouter) -> None:
    async with running_app(settings_with_secret()) as (app, client):
        session_id = await _new_session(app, sub="auth0|alice", sid="sid-1")
        response = await client.get(
            "/auth/backchannel-logout", params={"logout_token": logout_token()}
        )
        assert await _live(app, session_id)
    # POST only: the gateway's own path answers 405 (never the proxy).
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


async def test_redis_remember_jti_one_winner_across_instances() -> None:
    async with redis_store() as first:
        prefix = first._prefix
        async with redis_store(prefix=prefix) as second:
            stores = [first, second] * 10
            results = await asyncio.gather(*(s.remember_jti("same-jti", 60) for s in stores))
    assert results.count(True) == 1


async def test_backchannel_logout_store_down_is_503_and_the_retry_works(
    idp: respx.MockRouter,
) -> None:
    token = logout_token()
    async with running_app(settings_with_secret()) as (app, client):
        store = app.state.services.store
        session_id = await _new_session(app, sub="auth0|alice", sid="sid-1")
        find = store.find

        async def unavailable(**kwargs: Any) -> list[str]:
            raise SessionStoreUnavailable("down")

        store.find = unavailable
        down = await client.post("/auth/backchannel-logout", data={"logout_token": token})
        store.find = find
        retry = await client.post("/auth/backchannel-logout", data={"logout_token": token})
        assert not await _live(app, session_id)
    assert down.status_code == 503 and "retry-after" in down.headers
    assert retry.status_code == 200  # the jti was not burned by the failed attempt


async def test_backchannel_logout_es256_token_naming_an_rsa_key_is_400(
    idp: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """Review item 4: an IdP advertising ES256 beside its RSA keys, a logout token signed ES256
    whose header names the RSA key. Before the fix: PyJWT's TypeError, a 500 with a traceback
    in the log and without the security headers or X-Request-ID."""
    serve_keycloak_like_keys(idp)
    token = sign(logout_claims(), key=EC_KEY, kid=KID, alg="ES256")
    async with running_app(settings_with_secret()) as (app, client):
        session_id = await _new_session(app, sub="auth0|alice", sid="sid-1")
        refused = await client.post("/auth/backchannel-logout", data={"logout_token": token})
        assert await _live(app, session_id)
        # The same IdP's ES256 token with its own EC key is accepted.
        good = sign(logout_claims(), key=EC_KEY, kid=EC_KID, alg="ES256")
        accepted = await client.post("/auth/backchannel-logout", data={"logout_token": good})
        assert not await _live(app, session_id)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request"
    assert "x-request-id" in refused.headers
    assert refused.headers["x-content-type-options"] == "nosniff"
    assert accepted.status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
