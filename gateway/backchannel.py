"""OIDC Back-Channel Logout 1.0: the IdP tells the gateway, server to server, that a user's
session ended; the gateway checks the logout token and ends the matching sessions.

The request carries no cookie and needs no CSRF check: the logout token's signature, issuer and
audience are the authentication, and its ``jti`` is remembered (in the shared store, so across
instances) until the token expires, so a captured token cannot be replayed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from .errors import InvalidLogoutToken
from .oidc import OIDCClient
from .request_body import read_small_body
from .settings import OIDCSettings

if TYPE_CHECKING:
    from .services import Services

logger = logging.getLogger("gateway.auth")

BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
MAX_BODY_BYTES = 64 * 1024
# A logout token is sent once, right away; one older than this is refused, which also bounds
# how long its jti must be remembered (OIDC Back-Channel Logout 1.0 §2.6: "iat too far in the
# past" MAY be rejected).
MAX_TOKEN_AGE = 600.0
_FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class LogoutClaims:
    """What a valid logout token says: end the sessions of ``sid`` and/or ``sub``."""

    jti: str
    sub: str | None
    sid: str | None
    replay_ttl: float  # how long the jti must be remembered

    def __repr__(self) -> str:
        return f"LogoutClaims(sid={'yes' if self.sid else 'no'}, sub={'yes' if self.sub else 'no'})"


async def read_logout_token(request: Request, *, limit: int = MAX_BODY_BYTES) -> str:
    """The ``logout_token`` of a form-encoded POST body of at most ``limit`` bytes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != _FORM:
        raise InvalidLogoutToken(f"the body must be {_FORM}")
    body = await read_small_body(request, limit)
    try:
        fields = parse_qsl(
            body.decode("ascii"), keep_blank_values=True, strict_parsing=True, max_num_fields=16
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidLogoutToken("the body is not a valid form") from exc
    tokens = [value for name, value in fields if name == "logout_token"]
    if len(tokens) != 1 or not tokens[0]:
        raise InvalidLogoutToken("the body must carry exactly one logout_token")
    return tokens[0]


async def validate_logout_token(
    oidc: OIDCClient, settings: OIDCSettings, token: str, *, now: float | None = None
) -> LogoutClaims:
    """Verify a logout token (§2.6): signature with an asymmetric algorithm from the IdP's
    JWKS, iss, aud, iat, exp, jti, the back-channel ``events`` member, ``sid`` and/or ``sub``,
    and no ``nonce`` (which would make an ID token pass for a logout token)."""
    claims = await oidc.verify_jwt(
        token,
        what="logout token",
        require=["iss", "aud", "iat", "exp", "jti", "events"],
        error=InvalidLogoutToken,
    )
    leeway = settings.clock_leeway
    now = time.time() if now is None else now
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), dict):
        raise InvalidLogoutToken("the logout token lacks the back-channel logout event")
    if "nonce" in claims:
        raise InvalidLogoutToken("a logout token must not carry a nonce")
    iat = float(claims["iat"])
    if now - iat > MAX_TOKEN_AGE + leeway:
        raise InvalidLogoutToken("the logout token is too old")
    sub = _claim(claims, "sub")
    sid = _claim(claims, "sid")
    if sub is None and sid is None:
        raise InvalidLogoutToken("the logout token names neither sid nor sub")
    jti = _claim(claims, "jti", max_length=256)
    if jti is None:
        raise InvalidLogoutToken("the logout token's jti is not usable")
    # Remember the jti for as long as the token could still be accepted, clock skew included.
    last_accepted = min(float(claims["exp"]), iat + MAX_TOKEN_AGE) + leeway
    return LogoutClaims(jti=jti, sub=sub, sid=sid, replay_ttl=max(1.0, last_accepted - now))


def _claim(claims: dict[str, Any], name: str, *, max_length: int = 1024) -> str | None:
    """A string claim usable as a store key (absent -> None; malformed -> rejected)."""
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise InvalidLogoutToken(f"the logout token's {name} is malformed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON "\ud800" escapes
        raise InvalidLogoutToken(f"the logout token's {name} is malformed") from exc
    return value


async def process_logout_token(gateway: Services, token: str) -> int:
    """Validate ``token``, refuse a replay, end the sessions it names; return how many ended.

    Sessions are ended without revoking their refresh tokens: the IdP has ended the grant.
    """
    claims = await validate_logout_token(gateway.oidc, gateway.settings.oidc, token)
    # Look up first: if the store is down the IdP gets a 503 and may retry with the same jti.
    session_ids = await gateway.store.find(sub=claims.sub, sid=claims.sid)
    if not await gateway.store.remember_jti(claims.jti, claims.replay_ttl):
        raise InvalidLogoutToken("the logout token was already used")
    ended = 0
    for session_id in session_ids:
        if await gateway.end_session(session_id) is not None:
            ended += 1
    logger.info("back-channel logout ended %d session(s)", ended)
    return ended
