"""The demo's APIs: small Starlette apps that verify the gateway's bearer token.

Each API checks ``Authorization: Bearer <JWT>`` the way a real resource server would: RS256
signature against the issuer's JWKS (fetched from discovery, refetched on an unknown ``kid``),
``iss``, ``exp`` and an ``aud`` containing its own identifier. It answers any GET with what it
saw: ``{"api", "aud", "sub", "scope", "path"}``, so the demo page can show which audience
reached which API. The e2e tests' recording upstreams (tests/e2e/servers.py) verify with the
same code.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = [
    "DEMO_APIS",
    "VERIFY_ERRORS",
    "DemoApi",
    "JwksCache",
    "create_api",
    "verify_bearer",
]

# What a failed verification can raise: a bad token, the IdP unreachable, a malformed JWKS.
VERIFY_ERRORS: tuple[type[Exception], ...] = (jwt.PyJWTError, httpx.HTTPError, KeyError, ValueError)


@dataclass(frozen=True)
class DemoApi:
    """One demo API: its name, the gateway prefix in front of it, its audience, its port."""

    name: str
    prefix: str
    audience: str
    port: int


# The same facts as config/demo.yaml and the test IdP's resource servers (idp/server.mjs).
DEMO_APIS: tuple[DemoApi, ...] = (
    DemoApi("orders", "/api/", "https://api.example.com", 8001),
    DemoApi("billing", "/billing/", "https://billing.example.com", 8002),
    DemoApi("outside", "/outside/", "https://outside.example.com", 8003),
)


class JwksCache:
    """Fetches and caches the issuer's signing keys (refetch on unknown kid)."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self._keys: dict[str, jwt.PyJWK] = {}
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        key = self._lookup(kid)
        if key is None:
            async with self._lock:
                if self._lookup(kid) is None:
                    await self._refresh()
            key = self._lookup(kid)
        if key is None:
            raise jwt.InvalidTokenError(f"no key with kid {kid!r} in the issuer's JWKS")
        return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        async with httpx.AsyncClient(timeout=10.0) as client:
            discovery = await client.get(f"{self.issuer}/.well-known/openid-configuration")
            discovery.raise_for_status()
            jwks = await client.get(discovery.json()["jwks_uri"])
            jwks.raise_for_status()
        keyset = jwt.PyJWKSet.from_dict(jwks.json())
        self._keys = {key.key_id: key for key in keyset.keys if key.key_id}


async def verify_bearer(
    authorization: str | None, *, jwks: JwksCache, audience: str
) -> dict[str, Any]:
    """The verified claims of an ``Authorization: Bearer <JWT>`` header.

    Raises one of :data:`VERIFY_ERRORS` (``jwt.InvalidTokenError`` for a missing or bad token).
    """
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise jwt.InvalidTokenError("missing bearer token")
    key = await jwks.key_for(jwt.get_unverified_header(token).get("kid"))
    claims: dict[str, Any] = jwt.decode(
        token,
        key=key.key,
        algorithms=["RS256"],
        audience=audience,
        issuer=jwks.issuer,
        options={"require": ["exp", "iat", "aud", "iss"]},
    )
    return claims


def create_api(name: str, *, issuer: str, audience: str) -> Starlette:
    """A demo API answering every GET with the verified token's audience, subject and scope."""
    jwks = JwksCache(issuer)

    async def whoami(request: Request) -> Response:
        try:
            claims = await verify_bearer(
                request.headers.get("authorization"), jwks=jwks, audience=audience
            )
        except VERIFY_ERRORS as exc:
            return JSONResponse(
                {"api": name, "error": "invalid_token", "detail": str(exc) or type(exc).__name__},
                status_code=401,
                headers={"www-authenticate": 'Bearer error="invalid_token"'},
            )
        return JSONResponse(
            {
                "api": name,
                "aud": claims.get("aud"),
                "sub": claims.get("sub"),
                "scope": claims.get("scope"),
                "path": request.url.path,
            }
        )

    return Starlette(routes=[Route("/{path:path}", whoami, methods=["GET"])])
