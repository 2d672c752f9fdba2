"""Unit-test fixtures: settings, an RSA key pair standing in for the IdP, respx-mocked IdP."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette

from gateway import create_app
from gateway.settings import Settings

ISSUER = "https://tenant.eu.auth0.com/"
CLIENT_ID = "client-abc"
CLIENT_SECRET = "client-secret-value-that-is-long-enough-for-hs256"
API = "https://api.example.com"
BILLING = "https://billing.example.com"
KID = "key-1"

_PRIVATE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks() -> dict[str, Any]:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(_PRIVATE_KEY.public_key()))
    public.update({"kid": KID, "use": "sig", "alg": "RS256"})
    return {"keys": [public]}


def sign(claims: dict[str, Any], *, kid: str = KID, key: Any = None, alg: str = "RS256") -> str:
    return jwt.encode(
        claims, key if key is not None else _PRIVATE_KEY, algorithm=alg, headers={"kid": kid}
    )


def access_token(
    audience: str | list[str], *, scope: str = "", ttl: int = 3600, **extra: Any
) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "auth0|alice",
        "aud": audience,
        "iat": now,
        "exp": now + ttl,
        "scope": scope,
    }
    claims.update(extra)
    return sign(claims)


def id_token(*, nonce: str, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "auth0|alice",
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 300,
        "nonce": nonce,
        "sid": "sid-1",
        "email": "alice@example.com",
    }
    claims.update(overrides)
    return sign({k: v for k, v in claims.items() if v is not None})


DISCOVERY: dict[str, Any] = {
    "issuer": ISSUER,
    "authorization_endpoint": ISSUER + "authorize",
    "token_endpoint": ISSUER + "oauth/token",
    "jwks_uri": ISSUER + ".well-known/jwks.json",
    "revocation_endpoint": ISSUER + "oauth/revoke",
    "end_session_endpoint": ISSUER + "oidc/logout",
    "id_token_signing_alg_values_supported": ["RS256", "HS256"],
}


def make_settings(**overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "public_url": "https://app.example.com",
        "oidc": {
            "issuer": ISSUER,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "dialect": "auth0",
            "login_audience": API,
        },
        "routes": [
            {
                "prefix": "/api/",
                "upstream": "http://127.0.0.1:9/",
                "audience": API,
                "scopes": ["read:orders"],
            },
            {
                "prefix": "/billing/",
                "upstream": "http://127.0.0.1:9/",
                "audience": BILLING,
                "scopes": ["read:invoices"],
            },
            {"prefix": "/status/", "upstream": "http://127.0.0.1:9/", "auth": "none"},
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Settings(**data)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def idp() -> Iterator[respx.MockRouter]:
    """respx router answering discovery and JWKS like an Auth0 tenant."""
    with respx.mock(assert_all_called=False) as router:
        router.get(ISSUER + ".well-known/openid-configuration").respond(json=DISCOVERY)
        router.get(ISSUER + ".well-known/jwks.json").respond(json=jwks())
        yield router


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """The gateway app with its lifespan entered, and a client talking to it in process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=settings.public_url) as client:
            yield app, client
