"""Cookies, CSRF checks and redirect-target validation: the browser-facing defences."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

from .errors import CSRFCheckFailed

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{32,128}$")
# A longer return_to falls back to "/". It is what an unauthenticated client can make each
# pending login hold; with session.max_pending_logins that bounds the store (review item 6:
# ~2.7 KB per login in Redis, 27 MiB at the default 10,000), while deep links with long query
# strings still survive the login.
_MAX_RETURN_TO = 2048


def new_secret_token() -> str:
    """256 bits from the OS CSPRNG, URL-safe (session cookies, state, nonce)."""
    return secrets.token_urlsafe(32)


def session_id_for(token: str) -> str:
    """The store key of a cookie token: stores never see the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def cookie_name(base: str, *, https: bool) -> str:
    """``__Host-`` binds the cookie to this exact origin, Path=/ and Secure (RFC 6265bis)."""
    return f"__Host-{base}" if https else base


def format_cookie(
    name: str,
    value: str,
    *,
    https: bool,
    max_age: int | None,
    samesite: str = "lax",
    path: str = "/",
) -> str:
    """A ``Set-Cookie`` value: always HttpOnly, Secure on https, SameSite as configured."""
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", f"SameSite={samesite.capitalize()}"]
    if https:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def read_cookie(cookie_header: str | None, name: str) -> str | None:
    """The value of one cookie from a ``Cookie`` header; tolerant of junk, never raises."""
    if not cookie_header or len(cookie_header) > 16384:
        return None
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == name:
            return value.strip().strip('"')
    return None


def is_token_shaped(value: str | None) -> bool:
    return value is not None and bool(_TOKEN_RE.match(value))


def tokens_equal(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two secrets (None never equals anything)."""
    if a is None or b is None:
        return False
    return hmac.compare_digest(a.encode(), b.encode())


def validate_return_to(value: str | None, default: str = "/") -> str:
    """A local path to send the user to after login, or ``default`` for anything else.

    Refuses what browsers would read as another origin: ``//evil``, ``/\\evil``,
    ``https://evil``, their percent-encoded forms, and control characters (header injection).
    """
    if not value or len(value) > _MAX_RETURN_TO:
        return default
    for candidate in (value, unquote(value), unquote(unquote(value))):
        if not candidate.startswith("/") or candidate.startswith("//"):
            return default
        if "\\" in candidate or any(ord(c) < 0x20 or ord(c) == 0x7F for c in candidate):
            return default
        parts = urlsplit(candidate)
        if parts.scheme or parts.netloc:
            return default
    return value


def check_csrf(
    *,
    method: str,
    header_value: str | None,
    expected_value: str,
    origin: str | None,
    sec_fetch_site: str | None,
    allowed_origins: Iterable[str],
) -> None:
    """Raise CSRFCheckFailed unless the request carries the anti-CSRF signals.

    The custom header cannot be set cross-site without a CORS preflight that we never grant;
    ``Origin`` and ``Sec-Fetch-Site`` add a second check for state-changing methods.
    """
    if not tokens_equal(header_value, expected_value):
        raise CSRFCheckFailed("missing or wrong anti-CSRF header")
    if method in SAFE_METHODS:
        return
    if origin is not None and origin != "null" and origin not in allowed_origins:
        raise CSRFCheckFailed("cross-origin request refused")
    if origin == "null":
        raise CSRFCheckFailed("opaque origin refused")
    if sec_fetch_site is not None and sec_fetch_site not in ("same-origin", "none"):
        raise CSRFCheckFailed("cross-site request refused")


def check_websocket_origin(
    origin: str | None, allowed_origins: Iterable[str], *, required: bool
) -> None:
    """Raise CSRFCheckFailed unless a WebSocket upgrade comes from an allowed origin.

    Browsers send cookies on cross-site upgrades and WebSockets have no CORS, and a page cannot
    set the anti-CSRF header on one: ``Origin`` is the defence (cross-site WebSocket hijacking).
    Browsers always send it on an upgrade (RFC 6455 §4.1); one without it is not from a browser
    page, and is refused where the session cookie would be used (``required``).
    """
    if origin is None:
        if required:
            raise CSRFCheckFailed("WebSocket upgrade without an Origin")
        return
    if origin == "null" or origin not in allowed_origins:
        raise CSRFCheckFailed("WebSocket upgrade from an origin that is not allowed")
