"""Header policy for forwarded requests and responses. Pure: no IO.

What an upstream sees: the client's headers minus hop-by-hop headers (RFC 9110 §7.6.1), minus
cookies (all of them unless the route sets ``forward_cookies``, and the gateway's own always), any
client ``Authorization`` and any client ``X-Forwarded-*`` /
``Forwarded`` (spoofable), plus ``Authorization: Bearer`` and our own ``X-Forwarded-*``.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_STRIPPED_REQUEST = HOP_BY_HOP | {
    "host",
    "authorization",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
}
_REQUEST_REMOVE = frozenset(n.encode() for n in _STRIPPED_REQUEST)
_RESPONSE_REMOVE = frozenset(n.encode() for n in HOP_BY_HOP)

RawHeaders = list[tuple[bytes, bytes]]


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection`` are hop-by-hop too."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def strip_cookies(cookie_header: bytes, names: frozenset[bytes]) -> bytes:
    """Remove the named cookies from a ``Cookie`` header value; keep the others as sent."""
    kept = [
        part.strip()
        for part in cookie_header.split(b";")
        if part.strip() and part.strip().split(b"=", 1)[0].strip() not in names
    ]
    return b"; ".join(kept)


def build_upstream_headers(
    headers: RawHeaders,
    *,
    gateway_cookies: frozenset[bytes],
    client_ip: str,
    proto: str,
    host: str,
    bearer: str | None,
    forward_cookies: bool = False,
) -> list[tuple[str, str]]:
    """The request headers an upstream receives (see module docstring)."""
    remove = _REQUEST_REMOVE | _connection_tokens(headers)
    if not forward_cookies:
        remove = remove | {b"cookie"}
    out: list[tuple[str, str]] = []
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name in remove:
            continue
        if name == b"cookie":
            raw_value = strip_cookies(raw_value, gateway_cookies)
            if not raw_value:
                continue
        out.append((name.decode("latin-1"), raw_value.decode("latin-1")))
    out.append(("x-forwarded-for", client_ip))
    out.append(("x-forwarded-proto", proto))
    out.append(("x-forwarded-host", host))
    if bearer is not None:
        out.append(("authorization", f"Bearer {bearer}"))
    return out


def filter_response_headers(
    headers: Iterable[tuple[bytes, bytes]], *, gateway_cookies: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the client: no hop-by-hop, no overwrite of our cookies."""
    pairs = [(name.lower(), value) for name, value in headers]
    remove = _RESPONSE_REMOVE | _connection_tokens(pairs)
    out: list[tuple[bytes, bytes]] = []
    for name, value in pairs:
        if name in remove:
            continue
        if name == b"set-cookie" and value.split(b"=", 1)[0].strip() in gateway_cookies:
            continue
        out.append((name, value))
    return out
