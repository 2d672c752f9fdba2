"""The IdP wire format (Auth0 and RFC 8707 dialects), error mapping and ID-token checks."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import (
    AudienceNotPermitted,
    IdentityProviderError,
    IdentityProviderRateLimited,
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
    KID,
    id_token,
    jwks,
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


# -- an IdP that advertises ES256 beside its RSA keys (Keycloak does): review item 4 ----------

EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KID = "ec-key-1"
KEYCLOAK_LIKE_DISCOVERY = {**DISCOVERY, "id_token_signing_alg_values_supported": ["RS256", "ES256"]}


def keycloak_like_jwks() -> dict[str, Any]:
    """The RSA signing key, an EC P-256 signing key and an RSA encryption key (RSA-OAEP)."""
    ec_public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    ec_public.update({"kid": EC_KID, "use": "sig", "alg": "ES256"})
    encryption = {**jwks()["keys"][0], "kid": "enc-1", "use": "enc", "alg": "RSA-OAEP"}
    return {"keys": [*jwks()["keys"], ec_public, encryption]}


def serve_keycloak_like_keys(idp: respx.MockRouter) -> None:
    idp.get(ISSUER + ".well-known/openid-configuration").respond(json=KEYCLOAK_LIKE_DISCOVERY)
    idp.get(DISCOVERY["jwks_uri"]).respond(json=keycloak_like_jwks())


def _id_claims() -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "sub": "x", "aud": CLIENT_ID, "iat": now, "exp": now + 60, "nonce": "n1"}


# (alg of the header, key that signs it, kid the header names)
MISMATCHED_KEYS: dict[str, tuple[str, Any, str]] = {
    "es256_naming_the_rsa_kid": ("ES256", EC_KEY, KID),
    "rs256_naming_the_ec_kid": ("RS256", None, EC_KID),  # None: the RSA key of conftest
}


@pytest.mark.parametrize("case", sorted(MISMATCHED_KEYS))
async def test_validate_id_token_algorithm_not_fitting_its_key_is_login_failed(
    idp: respx.MockRouter, settings: Settings, case: str
) -> None:
    # Before the fix PyJWT raised TypeError("Expecting a PEM-formatted key."): a 500.
    serve_keycloak_like_keys(idp)
    alg, key, kid = MISMATCHED_KEYS[case]
    token = sign(_id_claims(), key=key, kid=kid, alg=alg)
    async with httpx.AsyncClient() as http:
        with pytest.raises(LoginFailed) as info:
            await OIDCClient(settings, http).validate_id_token(token, nonce="n1")
    assert "does not fit" in info.value.message and token not in info.value.message


async def test_validate_id_token_accepts_es256_from_its_ec_key(
    idp: respx.MockRouter, settings: Settings
) -> None:
    serve_keycloak_like_keys(idp)
    token = sign(_id_claims(), key=EC_KEY, kid=EC_KID, alg="ES256")
    async with httpx.AsyncClient() as http:
        claims = await OIDCClient(settings, http).validate_id_token(token, nonce="n1")
    assert claims["sub"] == "x"


async def test_verify_jwt_maps_whatever_the_verifier_raises(
    oidc: OIDCClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every exception PyJWT or cryptography may raise on a token becomes ``error``."""
    for raised in (TypeError("x"), ValueError("x"), OverflowError("x"), KeyError("x")):

        def decode(*args: object, exc: Exception = raised, **kwargs: object) -> None:
            raise exc

        monkeypatch.setattr(jwt, "decode", decode)
        with pytest.raises(LoginFailed, match=type(raised).__name__):
            await oidc.validate_id_token(id_token(nonce="n1"), nonce="n1")


# -- the IdP's Retry-After, capped the same way at every endpoint --------------------------------

RETRY_AFTER_CAPPED = {"an_hour": "3600", "5000_digits": "9" * 5000}


@pytest.mark.parametrize("case", sorted(RETRY_AFTER_CAPPED))
@pytest.mark.parametrize("status", [429, 503])
async def test_token_endpoint_retry_after_is_capped(
    oidc: OIDCClient, idp: respx.MockRouter, case: str, status: int
) -> None:
    # Before: "3600" went to the client as is, and 5,000 digits raised ValueError from int().
    idp.post(TOKEN_URL).respond(status, headers={"Retry-After": RETRY_AFTER_CAPPED[case]})
    with pytest.raises(IdentityProviderUnavailable) as info:
        await oidc.refresh("rt", audience=API, scopes=[])
    assert info.value.headers() == {"Retry-After": "60"}
    assert isinstance(info.value, IdentityProviderRateLimited) == (status == 429)


async def test_discovery_retry_after_is_capped(settings: Settings) -> None:
    with respx.mock() as router:
        router.get(ISSUER + ".well-known/openid-configuration").respond(
            503, headers={"Retry-After": "9" * 5000}
        )
        async with httpx.AsyncClient() as http:
            with pytest.raises(IdentityProviderUnavailable) as info:
                await OIDCClient(settings, http).metadata()
    assert info.value.headers() == {"Retry-After": "60"}
