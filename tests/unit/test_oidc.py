"""The IdP wire format (Auth0 and RFC 8707 dialects), error mapping and ID-token checks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import respx

from gateway.errors import (
    AudienceNotPermitted,
    IdentityProviderError,
    IdentityProviderUnavailable,
    LoginFailed,
    LoginRequired,
    RefreshTokenRejected,
)
from gateway.oidc import OIDCClient, pkce_challenge
from gateway.settings import Settings

from .conftest import (
    API,
    BILLING,
    CLIENT_ID,
    CLIENT_SECRET,
    DISCOVERY,
    ISSUER,
    id_token,
    make_settings,
    sign,
)

pytestmark = pytest.mark.anyio
TOKEN_URL = DISCOVERY["token_endpoint"]


@pytest.fixture
async def oidc(settings: Settings, idp: respx.MockRouter) -> AsyncIterator[OIDCClient]:
    async with httpx.AsyncClient() as http:
        yield OIDCClient(settings, http)


def _form(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode())


async def test_authorize_url_auth0_dialect_sends_audience_and_pkce(oidc: OIDCClient) -> None:
    url = await oidc.authorize_url(state="st", nonce="no", code_challenge=pkce_challenge("v" * 43))
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == DISCOVERY["authorization_endpoint"]
    assert query["audience"] == [API]
    assert "resource" not in query
    assert query["response_type"] == ["code"]
    assert query["code_challenge_method"] == ["S256"]
    assert query["redirect_uri"] == ["https://app.example.com/auth/callback"]
    assert query["scope"] == ["openid profile email offline_access read:orders"]
    assert query["state"] == ["st"] and query["nonce"] == ["no"]


async def test_authorize_url_rfc8707_dialect_requests_every_audience(idp: respx.MockRouter) -> None:
    settings = make_settings(
        oidc={"dialect": "rfc8707", "login_audience": None, "prompt": "consent"}
    )
    async with httpx.AsyncClient() as http:
        url = await OIDCClient(settings, http).authorize_url(
            state="s", nonce="n", code_challenge="c"
        )
    query = parse_qs(urlsplit(url).query)
    assert query["resource"] == [API, BILLING]
    assert "audience" not in query
    assert query["prompt"] == ["consent"]
    assert query["scope"] == ["openid profile email offline_access read:orders read:invoices"]


async def test_refresh_auth0_dialect_wire_format(oidc: OIDCClient, idp: respx.MockRouter) -> None:
    route = idp.post(TOKEN_URL).respond(
        json={"access_token": "at", "expires_in": 86400, "token_type": "Bearer"}
    )
    answer = await oidc.refresh("rt-1", audience=BILLING, scopes=["read:invoices"])
    assert answer.access_token == "at" and answer.expires_in == 86400
    form = _form(route.calls.last.request)
    assert form == {
        "grant_type": ["refresh_token"],
        "refresh_token": ["rt-1"],
        "audience": [BILLING],
        "scope": ["read:invoices"],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
    }


async def test_refresh_rfc8707_dialect_sends_resource(idp: respx.MockRouter) -> None:
    settings = make_settings(
        oidc={"dialect": "rfc8707", "token_endpoint_auth_method": "client_secret_basic"}
    )
    route = idp.post(TOKEN_URL).respond(json={"access_token": "at", "expires_in": 60})
    async with httpx.AsyncClient() as http:
        await OIDCClient(settings, http).refresh("rt", audience=API, scopes=[])
    request = route.calls.last.request
    form = _form(request)
    assert form["resource"] == [API]
    assert "audience" not in form and "scope" not in form and "client_secret" not in form
    assert request.headers["authorization"].startswith("Basic ")


ERRORS = [
    (
        403,
        {"error": "invalid_grant", "error_description": "Unknown or invalid refresh token."},
        RefreshTokenRejected,
    ),
    (
        400,
        {"error": "invalid_grant", "error_description": "reused refresh token detected"},
        RefreshTokenRejected,
    ),
    (400, {"error": "invalid_target"}, AudienceNotPermitted),
    (
        403,
        {"error": "access_denied", "error_description": "Service not enabled within domain"},
        AudienceNotPermitted,
    ),
    (400, {"error": "invalid_scope"}, AudienceNotPermitted),
    (403, {"error": "mfa_required", "mfa_token": "x"}, LoginRequired),
    (401, {"error": "invalid_client"}, IdentityProviderError),
    (400, {"error": "something_new"}, IdentityProviderError),
    (400, "not json at all", IdentityProviderError),
]


@pytest.mark.parametrize(("status", "body", "expected"), ERRORS)
async def test_refresh_maps_idp_errors(
    oidc: OIDCClient, idp: respx.MockRouter, status: int, body: object, expected: type[Exception]
) -> None:
    if isinstance(body, dict):
        idp.post(TOKEN_URL).respond(status, json=body)
    else:
        idp.post(TOKEN_URL).respond(status, text=str(body))
    with pytest.raises(expected) as info:
        await oidc.refresh("rt-secret", audience=API, scopes=[])
    assert "rt-secret" not in str(info.value)


UNAVAILABLE = [
    httpx.Response(429, headers={"Retry-After": "7"}, json={"error": "too_many_requests"}),
    httpx.Response(500, text="oops"),
    httpx.Response(503, json={"error": "temporarily_unavailable"}),
    httpx.Response(200, text="<html>not json</html>"),
    httpx.Response(200, json=["a", "list"]),
    httpx.Response(200, json={"token_type": "Bearer"}),  # no access_token
]


@pytest.mark.parametrize("response", UNAVAILABLE)
async def test_refresh_maps_unusable_answers_to_unavailable(
    oidc: OIDCClient, idp: respx.MockRouter, response: httpx.Response
) -> None:
    idp.post(TOKEN_URL).mock(return_value=response)
    with pytest.raises(IdentityProviderUnavailable) as info:
        await oidc.refresh("rt", audience=API, scopes=[])
    if response.status_code == 429:
        assert info.value.headers() == {"Retry-After": "7"}


@pytest.mark.parametrize(
    "exc", [httpx.ConnectTimeout("t"), httpx.ReadTimeout("t"), httpx.ConnectError("c")]
)
async def test_refresh_maps_transport_errors(
    oidc: OIDCClient, idp: respx.MockRouter, exc: Exception
) -> None:
    idp.post(TOKEN_URL).mock(side_effect=exc)
    with pytest.raises(IdentityProviderUnavailable):
        await oidc.refresh("rt", audience=API, scopes=[])


def _transport_errors(cls: type[httpx.TransportError]) -> list[type[httpx.TransportError]]:
    found: list[type[httpx.TransportError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_transport_errors(sub)]
    return found


@pytest.mark.parametrize(
    "error", _transport_errors(httpx.TransportError), ids=lambda cls: cls.__name__
)
async def test_refresh_maps_every_transport_error_to_unavailable(
    oidc: OIDCClient, idp: respx.MockRouter, error: type[httpx.TransportError]
) -> None:
    # Whatever httpx raises on the way to the IdP is a 503 with Retry-After, never a 500.
    idp.post(TOKEN_URL).mock(side_effect=error("refresh-token-must-not-leak"))
    with pytest.raises(IdentityProviderUnavailable) as caught:
        await oidc.refresh("rt", audience=API, scopes=[])
    assert "refresh-token-must-not-leak" not in caught.value.message
    timed_out = issubclass(error, httpx.TimeoutException)
    assert ("timed out" in caught.value.message) is timed_out


async def test_discovery_unreachable_is_unavailable(settings: Settings) -> None:
    with respx.mock() as router:
        router.get(ISSUER + ".well-known/openid-configuration").mock(
            side_effect=httpx.ConnectError("x")
        )
        async with httpx.AsyncClient() as http:
            with pytest.raises(IdentityProviderUnavailable):
                await OIDCClient(settings, http).metadata()


async def test_validate_id_token_accepts_good_token(oidc: OIDCClient) -> None:
    claims = await oidc.validate_id_token(id_token(nonce="n1"), nonce="n1")
    assert claims["sub"] == "auth0|alice" and claims["sid"] == "sid-1"


def _hs256_with_client_secret() -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "x",
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 60,
        "nonce": "n1",
    }
    return jwt.encode(claims, CLIENT_SECRET, algorithm="HS256", headers={"kid": "key-1"})


def _alg_none() -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "x",
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 60,
        "nonce": "n1",
    }
    return jwt.encode(claims, "", algorithm="none")  # alg none takes no key


def _other_key() -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "x",
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 60,
        "nonce": "n1",
    }
    return sign(claims, key=other)


BAD_ID_TOKENS: dict[str, Callable[[], str]] = {
    "wrong_nonce": lambda: id_token(nonce="other"),
    "wrong_aud": lambda: id_token(nonce="n1", aud="someone-else"),
    "wrong_iss": lambda: id_token(nonce="n1", iss="https://evil.example/"),
    "expired": lambda: id_token(
        nonce="n1", exp=int(time.time()) - 3600, iat=int(time.time()) - 7200
    ),
    "no_sub": lambda: id_token(nonce="n1", sub=None),
    "multi_aud_no_azp": lambda: id_token(nonce="n1", aud=[CLIENT_ID, "other"]),
    "bad_signature": _other_key,
    "unknown_kid": lambda: id_token(nonce="n1") if False else sign({"iss": ISSUER}, kid="nope"),
    "alg_none": _alg_none,
    "hs256_client_secret": _hs256_with_client_secret,
    "garbage": lambda: "not.a.jwt",
}


@pytest.mark.parametrize("name", sorted(BAD_ID_TOKENS))
async def test_validate_id_token_refuses(oidc: OIDCClient, name: str) -> None:
    with pytest.raises(LoginFailed):
        await oidc.validate_id_token(BAD_ID_TOKENS[name](), nonce="n1")


async def test_end_session_url_uses_discovery(oidc: OIDCClient) -> None:
    url = await oidc.end_session_url(
        id_token_hint="idt", post_logout_redirect_uri="https://app.example.com/"
    )
    assert url is not None
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(DISCOVERY["end_session_endpoint"])
    assert query["id_token_hint"] == ["idt"] and query["client_id"] == [CLIENT_ID]


async def test_revoke_posts_token_and_reports_result(
    oidc: OIDCClient, idp: respx.MockRouter
) -> None:
    route = idp.post(DISCOVERY["revocation_endpoint"]).respond(200)
    assert await oidc.revoke("rt-9") is True
    assert _form(route.calls.last.request)["token"] == ["rt-9"]
    idp.post(DISCOVERY["revocation_endpoint"]).respond(400, json={"error": "invalid_request"})
    assert await oidc.revoke("rt-9") is False
