"""Talking to the OpenID Provider: discovery, JWKS, authorize URL, token endpoint, ID tokens.

All HTTP to the IdP goes through one ``httpx.AsyncClient``; every transport error, timeout,
5xx, 429 or malformed answer is translated here, once, into the error tree.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from . import own_paths
from .client_auth import ClientAuthenticator
from .dpop import DPoP, DPoPBound, DPoPKey, server_of
from .errors import (
    AudienceNotPermitted,
    GatewayError,
    IdentityProviderError,
    IdentityProviderRateLimited,
    IdentityProviderUnavailable,
    InsufficientScope,
    LoginFailed,
    LoginRequired,
    RefreshTokenRejected,
    StepUpRequired,
)
from .jws import VERIFY_ERRORS, key_fits_algorithm
from .retry_after import parse_retry_after
from .security import tokens_equal
from .settings import USER_MODES, Settings

logger = logging.getLogger("gateway.oidc")

# Asymmetric algorithms only: `none` and HMAC (which would let the client secret sign tokens)
# are refused whatever the IdP advertises.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_METADATA_TTL = 3600.0
_JWKS_MIN_REFETCH = 30.0


def pkce_challenge(verifier: str) -> str:
    """S256 code challenge (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """The useful part of a token-endpoint answer."""

    access_token: str
    expires_in: float | None
    refresh_token: str | None
    id_token: str | None
    scope: str | None
    token_type: str

    def __repr__(self) -> str:
        return f"TokenResponse(expires_in={self.expires_in}, scope={self.scope!r})"


def _parse_token_response(payload: dict[str, Any]) -> TokenResponse:
    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise IdentityProviderUnavailable(
            "the identity provider's token answer has no access_token"
        )
    expires_in = payload.get("expires_in")
    if expires_in is not None:
        try:
            expires_in = float(expires_in)
        except (TypeError, ValueError):
            expires_in = None

    def _str(key: str) -> str | None:
        value = payload.get(key)
        return value if isinstance(value, str) and value else None

    return TokenResponse(
        access_token=access_token,
        expires_in=expires_in,
        refresh_token=_str("refresh_token"),
        id_token=_str("id_token"),
        scope=_str("scope"),
        token_type=_str("token_type") or "Bearer",
    )


# OAuth error codes (RFC 6749 §5.2, RFC 8707 §2, Auth0) -> what the gateway does about them.
_REFRESH_ERRORS: dict[str, type[GatewayError]] = {
    "invalid_grant": RefreshTokenRejected,
    "invalid_target": AudienceNotPermitted,
    "access_denied": AudienceNotPermitted,
    # DESIGN.md §1: an audience *or scope* the IdP refuses is "not in the MRRT policy".
    "invalid_scope": AudienceNotPermitted,
    "mfa_required": StepUpRequired,
    "interaction_required": LoginRequired,
    "login_required": LoginRequired,
    "consent_required": LoginRequired,
}


class OIDCClient:
    """The gateway as an OIDC relying party of one issuer."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient,
        *,
        observe: Callable[[str, float], None] | None = None,
        dpop: DPoP | None = None,
    ) -> None:
        self._settings = settings
        # Client authentication of every call that needs it (token, revocation, PAR).
        self._client_auth = ClientAuthenticator(settings.oidc)
        self.dpop = dpop
        # observe(endpoint, seconds) after each call: token, discovery, jwks, revoke.
        self._observe = observe if observe is not None else _ignore_timing
        self._oidc = settings.oidc
        self._login_url = settings.public_url + own_paths.LOGIN  # for a refusal that needs one
        self._http = http
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_at = 0.0
        self._lock = asyncio.Lock()

    # -- discovery and keys -------------------------------------------------------------------

    async def metadata(self) -> dict[str, Any]:
        """The discovery document, fetched once and cached for an hour."""
        if self._metadata is not None and time.monotonic() - self._metadata_at < _METADATA_TTL:
            return self._metadata
        async with self._lock:
            if self._metadata is None or time.monotonic() - self._metadata_at >= _METADATA_TTL:
                url = self._oidc.issuer.rstrip("/") + "/.well-known/openid-configuration"
                document = await self._get_json(
                    url, what="discovery document", endpoint="discovery"
                )
                for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
                    if not isinstance(document.get(key), str):
                        raise IdentityProviderUnavailable(f"the discovery document lacks {key}")
                if document["issuer"].rstrip("/") != self._oidc.issuer.rstrip("/"):
                    raise IdentityProviderError("the discovery document names another issuer")
                if self._oidc.par == "required" and not isinstance(
                    document.get("pushed_authorization_request_endpoint"), str
                ):
                    # Never fall back to a front-channel request: the gateway does not start.
                    raise IdentityProviderError(
                        "oidc.par is required but the identity provider's discovery document "
                        "has no pushed_authorization_request_endpoint"
                    )
                if self.dpop is not None:
                    self.dpop.resolve(document)
                self._metadata, self._metadata_at = document, time.monotonic()
        assert self._metadata is not None
        return self._metadata

    async def signing_key(self, kid: str | None) -> jwt.PyJWK:
        """The JWKS key for ``kid``; refetches the JWKS (rate-limited) on an unknown kid."""
        key = self._find_key(kid)
        if key is not None:
            return key
        if self._jwks is None or time.monotonic() - self._jwks_at >= _JWKS_MIN_REFETCH:
            await self.refresh_jwks()
            key = self._find_key(kid)
        if key is None:
            raise LoginFailed("the token is signed with an unknown key")
        return key

    async def refresh_jwks(self) -> None:
        metadata = await self.metadata()
        document = await self._get_json(metadata["jwks_uri"], what="JWKS", endpoint="jwks")
        try:
            self._jwks = jwt.PyJWKSet.from_dict(document)
        except jwt.PyJWTError as exc:
            raise IdentityProviderUnavailable("the identity provider's JWKS is unusable") from exc
        self._jwks_at = time.monotonic()

    def _find_key(self, kid: str | None) -> jwt.PyJWK | None:
        if self._jwks is None:
            return None
        keys = self._jwks.keys
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.key_id == kid), None)

    # -- login ----------------------------------------------------------------------------------

    def login_scopes(self) -> list[str]:
        """Scopes asked for at login: the configured ones plus what the routes need."""
        scopes = list(self._oidc.scopes)
        for route in self._settings.routes:
            if route.auth not in USER_MODES:
                continue
            if self._oidc.dialect == "rfc8707" or route.audience == self._oidc.login_audience:
                scopes.extend(s for s in route.scopes if s not in scopes)
        return scopes

    def login_resources(self) -> list[str]:
        """RFC 8707: every route audience is requested at login, so that the refresh token
        can later mint a token for each (the server may only narrow, never widen)."""
        resources: list[str] = []
        for route in self._settings.routes:
            if route.auth in USER_MODES and route.audience and route.audience not in resources:
                resources.append(route.audience)
        return resources

    async def authorize_url(
        self,
        *,
        state: str,
        nonce: str,
        code_challenge: str,
        acr_values: tuple[str, ...] = (),
        max_age: int | None = None,
        organization: str | None = None,
        prompt: str | None = None,
        dpop_jkt: str | None = None,
    ) -> str:
        """The authorization request. ``acr_values`` / ``max_age``: a step-up (Auth0 reads
        ``acr_values``; a standard OpenID Provider, the rfc8707 dialect, is asked with the
        ``claims`` parameter for an essential acr, OIDC Core §5.5.1.1); ``organization``: Auth0
        Organizations; ``prompt``: this login's (``none`` for a silent login), else the
        configured one; ``dpop_jkt``: the thumbprint of the session's DPoP key (RFC 9449 §10),
        which binds the authorization code to it. With PAR (RFC 9126) the parameters go to the
        IdP over the back channel, with client authentication, and the browser carries only
        ``client_id`` and ``request_uri``."""
        metadata = await self.metadata()
        params: list[tuple[str, str]] = [
            ("response_type", "code"),
            ("client_id", self._oidc.client_id),
            ("redirect_uri", self._settings.redirect_uri),
            ("scope", " ".join(self.login_scopes())),
            ("state", state),
            ("nonce", nonce),
            ("code_challenge", code_challenge),
            ("code_challenge_method", "S256"),
        ]
        if self._oidc.dialect == "auth0":
            if self._oidc.login_audience:
                params.append(("audience", self._oidc.login_audience))
        else:
            params.extend(("resource", r) for r in self.login_resources())
        prompt = prompt or self._oidc.prompt
        if prompt:
            params.append(("prompt", prompt))
        if acr_values and self._oidc.dialect == "auth0":
            params.append(("acr_values", " ".join(acr_values)))
        elif acr_values:
            # Essential, so the IdP must authenticate the user again if its session has none
            # of them. (Not with acr_values as well: OIDC Core §5.5.1.1 lets acr_values replace
            # the claims request's acr with a voluntary one, as oidc-provider does.)
            essential = {"id_token": {"acr": {"essential": True, "values": list(acr_values)}}}
            params.append(("claims", json.dumps(essential, separators=(",", ":"))))
        if max_age is not None:
            params.append(("max_age", str(max_age)))
        if organization:
            params.append(("organization", organization))
        if dpop_jkt is not None:
            params.append(("dpop_jkt", dpop_jkt))
        params.extend(self._oidc.extra_authorize_params.items())
        par_endpoint = metadata.get("pushed_authorization_request_endpoint")
        if self._oidc.par != "off" and isinstance(par_endpoint, str):
            request_uri = await self._push(par_endpoint, params)
            params = [("client_id", self._oidc.client_id), ("request_uri", request_uri)]
        return f"{metadata['authorization_endpoint']}?{urlencode(params)}"

    async def _push(self, endpoint: str, params: list[tuple[str, str]]) -> str:
        """RFC 9126 §2: push the authorization request; its ``request_uri``."""
        # The client's credentials join the request's own parameters (``resource`` may repeat).
        credentials, auth = self._client_auth.apply(
            {}, token_endpoint=(await self.metadata())["token_endpoint"]
        )
        form = [(n, v) for n, v in params if n != "client_id"] + list(credentials.items())
        if "client_id" not in credentials:  # client_secret_basic: still named (RFC 9126 §2.1)
            form.append(("client_id", self._oidc.client_id))
        started = time.perf_counter()
        try:
            response = await self._http.post(
                endpoint,
                content=urlencode(form),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                auth=auth,
            )
        except httpx.HTTPError as exc:
            raise IdentityProviderUnavailable(
                "the pushed authorization request endpoint is unreachable"
            ) from exc
        finally:
            self._observe("par", time.perf_counter() - started)
        if response.status_code >= 500 or response.status_code == 429:
            raise IdentityProviderUnavailable(
                f"the pushed authorization request endpoint answered {response.status_code}",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        payload = _json_object(response)
        request_uri = payload.get("request_uri") if payload else None
        if response.status_code not in (200, 201) or not isinstance(request_uri, str):
            code = payload.get("error") if payload else None
            raise IdentityProviderError(
                "the identity provider refused the pushed authorization request "
                f"({response.status_code}, {code if isinstance(code, str) else 'no error'})"
            )
        return request_uri

    async def exchange_code(
        self, *, code: str, verifier: str, dpop_key: DPoPKey | None = None
    ) -> TokenResponse:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._settings.redirect_uri,
            "code_verifier": verifier,
        }
        try:
            return await self._token_request(data, dpop_key)
        except (
            RefreshTokenRejected,
            AudienceNotPermitted,
            InsufficientScope,
            LoginRequired,
        ) as exc:
            raise LoginFailed(f"the identity provider refused the code ({exc.error})") from exc

    async def verify_jwt(
        self, token: str, *, what: str, require: list[str], error: type[GatewayError]
    ) -> dict[str, Any]:
        """Verify a JWT the IdP issued to this client: signature with an asymmetric algorithm
        the IdP advertises (never ``none`` or HMAC), key from the JWKS, iss, aud (and azp when
        there are several audiences), exp/iat with leeway, and the ``require``d claims.
        Every failure raises ``error`` naming ``what`` was refused, never the token."""
        try:
            header = jwt.get_unverified_header(token)
        except VERIFY_ERRORS as exc:
            raise error(f"the {what} is malformed") from exc
        alg = header.get("alg")
        metadata = await self.metadata()
        advertised = set(metadata.get("id_token_signing_alg_values_supported") or ["RS256"])
        allowed = sorted(ASYMMETRIC_ALGORITHMS & advertised) or ["RS256"]
        if alg not in allowed:
            raise error(f"the {what} algorithm {str(alg)[:16]!r} is not accepted")
        kid = header.get("kid")
        try:
            key = await self.signing_key(kid if isinstance(kid, str) else None)
        except LoginFailed as exc:
            raise error(f"the {what} is signed with an unknown key") from exc
        if not key_fits_algorithm(alg, key.key):
            # An ES256 header naming an RSA key's kid (review item 4): refused here, before
            # PyJWT would raise TypeError on it.
            raise error(f"the {what} algorithm {alg} does not fit the key it names")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self._oidc.client_id,
                issuer=metadata["issuer"],
                leeway=self._oidc.clock_leeway,
                options={"require": require},
            )
        except VERIFY_ERRORS as exc:
            raise error(f"the {what} is invalid ({type(exc).__name__})") from exc
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self._oidc.client_id:
            raise error(f"the {what}'s azp does not name this client")
        return claims

    async def validate_id_token(self, id_token: str, *, nonce: str | None) -> dict[str, Any]:
        """Verify an ID token (see verify_jwt) and its nonce; return the claims."""
        claims = await self.verify_jwt(
            id_token,
            what="ID token",
            require=["iss", "aud", "exp", "iat", "sub"],
            error=LoginFailed,
        )
        if nonce is not None and not tokens_equal(_as_str(claims.get("nonce")), nonce):
            raise LoginFailed("the ID token's nonce does not match the login")
        return claims

    # -- refresh, revoke, logout ----------------------------------------------------------------

    async def refresh(
        self,
        refresh_token: str,
        *,
        audience: str,
        scopes: list[str],
        dpop_key: DPoPKey | None = None,
    ) -> TokenResponse:
        """Exchange the (multi-resource) refresh token for a token for one audience (with a
        DPoP proof of ``dpop_key``, the session's key, when given)."""
        grant = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token_request(self._for_audience(grant, audience, scopes), dpop_key)

    async def client_credentials(
        self, *, audience: str, scopes: list[str], dpop_key: DPoPKey | None = None
    ) -> TokenResponse:
        """The gateway's own token for one audience (OAuth client credentials, RFC 6749 §4.4),
        for routes with ``auth: client`` / ``user_or_client``."""
        grant = {"grant_type": "client_credentials"}
        return await self._token_request(self._for_audience(grant, audience, scopes), dpop_key)

    async def userinfo(
        self, access_token: str, *, dpop_key: DPoPKey | None = None
    ) -> dict[str, Any]:
        """The userinfo endpoint's claims for the login's access token (``oidc.userinfo``);
        a DPoP-bound one goes with a proof of ``dpop_key``."""
        metadata = await self.metadata()
        endpoint = metadata.get("userinfo_endpoint")
        if not isinstance(endpoint, str):
            raise LoginFailed("oidc.userinfo is on but the identity provider has no userinfo")
        headers = {"Authorization": f"Bearer {access_token}"}
        if isinstance(access_token, DPoPBound) and dpop_key is not None:
            headers = {
                "Authorization": f"DPoP {access_token}",
                "DPoP": dpop_key.proof(
                    "GET",
                    endpoint,
                    access_token=access_token,
                    nonce=await self._nonce(endpoint),
                ),
            }
        started = time.perf_counter()
        try:
            response = await self._http.get(endpoint, headers=headers)
        except httpx.HTTPError as exc:
            raise IdentityProviderUnavailable("the userinfo endpoint is unreachable") from exc
        finally:
            self._observe("userinfo", time.perf_counter() - started)
        if response.status_code != 200:
            raise LoginFailed(f"the userinfo endpoint answered {response.status_code}")
        payload = _json_object(response)
        if payload is None:
            raise LoginFailed("the userinfo answer is not a JSON object")
        return payload

    async def revoke(self, token: str, *, hint: str = "refresh_token") -> bool:
        """Best-effort RFC 7009 revocation; True when the IdP confirmed it."""
        try:
            metadata = await self.metadata()
        except GatewayError:
            return False
        endpoint = metadata.get("revocation_endpoint")
        if not isinstance(endpoint, str):
            return False
        body, auth = self._client_auth.apply(
            {"token": token, "token_type_hint": hint}, token_endpoint=metadata["token_endpoint"]
        )
        started = time.perf_counter()
        try:
            response = await self._http.post(endpoint, data=body, auth=auth)
        except httpx.HTTPError as exc:
            logger.warning("token revocation failed: %s", type(exc).__name__)
            return False
        finally:
            self._observe("revoke", time.perf_counter() - started)
        if response.status_code != 200:
            logger.warning("token revocation answered %s", response.status_code)
            return False
        return True

    async def end_session_url(
        self, *, id_token_hint: str | None, post_logout_redirect_uri: str
    ) -> str | None:
        """RP-initiated logout URL (OIDC RP-Initiated Logout 1.0, or Auth0 /v2/logout)."""
        try:
            metadata = await self.metadata()
        except GatewayError:
            return None
        endpoint = metadata.get("end_session_endpoint")
        if isinstance(endpoint, str):
            params = {
                "client_id": self._oidc.client_id,
                "post_logout_redirect_uri": post_logout_redirect_uri,
            }
            if id_token_hint:
                params["id_token_hint"] = id_token_hint
            return f"{endpoint}?{urlencode(params)}"
        if self._oidc.dialect == "auth0":
            params = {"client_id": self._oidc.client_id, "returnTo": post_logout_redirect_uri}
            return f"{self._oidc.issuer.rstrip('/')}/v2/logout?{urlencode(params)}"
        return None

    # -- plumbing -------------------------------------------------------------------------------

    def _for_audience(
        self, grant: dict[str, str], audience: str, scopes: list[str]
    ) -> dict[str, str]:
        """A token request's form for one API: Auth0's ``audience`` or RFC 8707's
        ``resource``, and the scopes asked for."""
        grant["audience" if self._oidc.dialect == "auth0" else "resource"] = audience
        if scopes:
            grant["scope"] = " ".join(scopes)
        return grant

    async def _nonce(self, url: str) -> str | None:
        return await self.dpop.nonces.current(server_of(url)) if self.dpop else None

    async def _token_request(
        self, data: dict[str, str], dpop_key: DPoPKey | None = None
    ) -> TokenResponse:
        """POST to the token endpoint with client authentication (and a DPoP proof of
        ``dpop_key``). A ``use_dpop_nonce`` refusal (RFC 9449 §8) is answered once, with
        the nonce it carried; every ``DPoP-Nonce`` the IdP sends is remembered."""
        metadata = await self.metadata()
        endpoint = metadata["token_endpoint"]
        response = await self._post_token(endpoint, data, dpop_key)
        if dpop_key is not None and response.status_code in (400, 401):
            refusal = _json_object(response)
            if refusal is not None and refusal.get("error") == "use_dpop_nonce":
                response = await self._post_token(endpoint, data, dpop_key)
        return self._token_answer(response)

    async def _post_token(
        self, endpoint: str, data: dict[str, str], dpop_key: DPoPKey | None
    ) -> httpx.Response:
        body, auth = self._client_auth.apply(data, token_endpoint=endpoint)
        headers: dict[str, str] = {}
        if dpop_key is not None and self.dpop is not None:
            headers["DPoP"] = dpop_key.proof("POST", endpoint, nonce=await self._nonce(endpoint))
        started = time.perf_counter()
        try:
            response = await self._http.post(endpoint, data=body, auth=auth, headers=headers)
        except httpx.TimeoutException as exc:
            raise IdentityProviderUnavailable("the identity provider timed out") from exc
        except httpx.HTTPError as exc:
            raise IdentityProviderUnavailable("the identity provider is unreachable") from exc
        finally:
            self._observe("token", time.perf_counter() - started)
        if self.dpop is not None and "dpop-nonce" in response.headers:
            await self.dpop.nonces.remember(server_of(endpoint), response.headers["dpop-nonce"])
        return response

    def _token_answer(self, response: httpx.Response) -> TokenResponse:
        if response.status_code == 429:
            # Refused for this request's sake (a quota), not down: TokenBroker backs off for
            # what was asked only (review item 5).
            raise IdentityProviderRateLimited(
                "the identity provider answered 429",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if response.status_code >= 500:
            raise IdentityProviderUnavailable(
                f"the identity provider answered {response.status_code}",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        payload = _json_object(response)
        if response.status_code != 200:
            code = payload.get("error") if payload else None
            code = code if isinstance(code, str) else "unknown_error"
            error_class = _REFRESH_ERRORS.get(code)
            if error_class is not None:
                message = f"the identity provider refused the token request ({code})"
                if error_class is StepUpRequired:
                    raise StepUpRequired(
                        message,
                        login_url=self._login_url,
                        acr_values=(self._oidc.mfa_acr_value,),
                    )
                if issubclass(error_class, LoginRequired):
                    raise error_class(message, login_url=self._login_url)
                raise error_class(message)
            if code in ("invalid_client", "unauthorized_client"):
                logger.error("the identity provider rejected the gateway's client (%s)", code)
            raise IdentityProviderError(
                f"the identity provider answered {response.status_code} ({code})"
            )
        if payload is None:
            raise IdentityProviderUnavailable("the identity provider's token answer is not JSON")
        return _parse_token_response(payload)

    async def _get_json(self, url: str, *, what: str, endpoint: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            response = await self._http.get(url)
        except httpx.HTTPError as exc:
            raise IdentityProviderUnavailable(f"cannot fetch the {what}") from exc
        finally:
            self._observe(endpoint, time.perf_counter() - started)
        if response.status_code != 200:
            raise IdentityProviderUnavailable(
                f"the {what} answered {response.status_code}",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        payload = _json_object(response)
        if payload is None:
            raise IdentityProviderUnavailable(f"the {what} is not a JSON object")
        return payload


def _ignore_timing(endpoint: str, seconds: float) -> None:
    return None


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        payload = response.json()
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None
