"""How the gateway authenticates itself to the IdP: one setting, ``oidc.client_auth``.

* ``client_secret_basic`` / ``client_secret_post`` (RFC 6749 §2.3.1): the shared secret;
* ``private_key_jwt`` (RFC 7523 §2.2, OIDC Core §9): no shared secret: every call that
  authenticates the client (token, revocation, pushed authorization request) carries a fresh
  assertion signed with the first of the configured private keys (RS256, PS256 or ES256);
  ``iss = sub = client_id``, a unique ``jti``, ``exp`` a minute away, and ``aud`` the issuer
  (Auth0 asks for its tenant's issuer) or the token endpoint (RFC 7523 §3, the default of the
  rfc8707 dialect), unless ``oidc.client_assertion_audience`` names it;
* ``none``: a public client (no client routes then).

``kid`` is each key's RFC 7638 thumbprint, so the public JWKS (``gateway keys``) names the key
that signed. Several keys rotate: register the new public key, put it first, drop the old one
once the IdP has it. Pure apart from reading the key file; no private key ever reaches a log,
an error message or a ``repr``.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

import httpx
import jwt

from .client_keys import SigningKey, load_private_keys

if TYPE_CHECKING:
    from .settings import OIDCSettings

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 60  # seconds: a short exp (RFC 7523 §3, item 4)


def configured_keys(oidc: OIDCSettings) -> list[SigningKey]:
    """The keys of ``oidc`` (``private_key``, then ``private_key_file``)."""
    pem = oidc.private_key.get_secret_value() if oidc.private_key is not None else None
    return load_private_keys(pem, oidc.private_key_file, alg=oidc.private_key_alg)


class ClientAuthenticator:
    """Adds the configured client authentication to a form-encoded IdP call."""

    def __init__(self, oidc: OIDCSettings, keys: list[SigningKey] | None = None) -> None:
        self.method = oidc.client_auth
        self._client_id = oidc.client_id
        self._secret = oidc.client_secret.get_secret_value() if oidc.client_secret else None
        self._audience = oidc.client_assertion_audience
        self._issuer = oidc.issuer
        self._dialect = oidc.dialect
        self._keys = keys if keys is not None else []
        if self.method == "private_key_jwt" and not self._keys:
            self._keys = configured_keys(oidc)

    def __repr__(self) -> str:
        return f"ClientAuthenticator(method={self.method}, keys={len(self._keys)})"

    def audience(self, token_endpoint: str) -> str:
        """The assertion's ``aud``: the setting, else Auth0's issuer or the token endpoint."""
        if self._audience:
            return self._audience
        return self._issuer if self._dialect == "auth0" else token_endpoint

    def assertion(self, token_endpoint: str, *, now: float | None = None) -> str:
        """A fresh RFC 7523 client assertion signed with the first key."""
        key = self._keys[0]
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": self.audience(token_endpoint),
            "jti": secrets.token_urlsafe(24),
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        return jwt.encode(claims, key.key, algorithm=key.alg, headers={"kid": key.kid})

    def apply(
        self, data: dict[str, str], *, token_endpoint: str
    ) -> tuple[dict[str, str], httpx.Auth | httpx._client.UseClientDefault]:
        """``data`` with the client's credentials, and the HTTP auth to send it with."""
        data = dict(data)
        method = self.method
        if method == "client_secret_basic" and self._secret is not None:
            return data, httpx.BasicAuth(self._client_id, self._secret)
        data["client_id"] = self._client_id
        if method == "client_secret_post" and self._secret is not None:
            data["client_secret"] = self._secret
        elif method == "private_key_jwt":
            data["client_assertion_type"] = ASSERTION_TYPE
            data["client_assertion"] = self.assertion(token_endpoint)
        return data, httpx.USE_CLIENT_DEFAULT
