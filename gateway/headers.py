"""Header policy for forwarded requests and responses. Pure: no IO.

What an upstream sees: the client's headers minus hop-by-hop headers (RFC 9110 §7.6.1), minus
cookies (all of them unless the route sets ``forward_cookies``, and the gateway's own always), any
client ``Authorization``, any client ``X-Forwarded-*`` / ``Forwarded`` (spoofable), the identity
and override headers upstreams behind a BFF tend to trust (``X-Auth-Request-*``, ``Remote-User``,
``X-Original-URL``, ``True-Client-IP``, ``X-HTTP-Method-Override``, ...; a route may forward named
ones, ``forward_identity_headers``) and ``Expect`` (the gateway's server answers
``100-continue`` itself, RFC 9110 §10.1.1), and any client ``DPoP`` proof; plus
``Authorization: Bearer`` (or ``DPoP`` with the gateway's proof) and our own ``X-Forwarded-*``.

What a client sees of an upstream answer: its headers minus hop-by-hop ones, minus any
``Set-Cookie`` for the gateway's own cookies, and minus its ``Date``: the server the gateway runs
in writes its own (as nginx does), and two ``Date`` fields would make an invalid answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from multidict import istr

_V = TypeVar("_V")

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
    "dpop",  # a proof is the gateway's to make (RFC 9449), never the client's to pass on
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    # An upstream that never sends 100 would wait for a body the forwarder holds back until
    # it does (review finding 7); the client's own server already answered the expectation.
    "expect",
}
# Client headers that claim an identity, an original URL, a client address or another method
# (review finding 7): an upstream behind a BFF may trust them, so they are dropped unless the
# route forwards them by name. The gateway's own forward-auth identity headers are among them.
_IDENTITY_AND_OVERRIDE = frozenset(
    {
        b"remote-user",
        b"x-remote-user",
        b"x-user",
        b"x-email",
        b"x-original-url",
        b"x-original-uri",
        b"x-rewrite-url",
        b"x-envoy-original-path",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
# ...and every name of these families (oauth2-proxy's X-Forwarded-User/-Email/-Groups, the
# proxies' X-Forwarded-Server/-Scheme/-Ssl, the gateway's own X-Auth-Request-User/-Email).
_IDENTITY_PREFIXES = (b"x-forwarded-", b"x-auth-request-")
_REQUEST_ID = b"x-request-id"
_REQUEST_REMOVE = frozenset(n.encode() for n in _STRIPPED_REQUEST)
# What one membership test per header drops, by (forward_cookies, replace the request id).
_REQUEST_REMOVE_BY = {
    (forward, own_id): _REQUEST_REMOVE
    | (set() if forward else {b"cookie"})
    | ({_REQUEST_ID} if own_id else set())
    for forward in (False, True)
    for own_id in (False, True)
}
_RESPONSE_REMOVE = frozenset(n.encode() for n in HOP_BY_HOP) | {b"date"}
_RESPONSE_REMOVE_ID = _RESPONSE_REMOVE | {_REQUEST_ID}
_NOTHING: frozenset[bytes] = frozenset()
_COOKIE_ONLY = frozenset({b"cookie"})
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade"})

RawHeaders = list[tuple[bytes, bytes]]


def is_identity_or_override(name: bytes) -> bool:
    """Whether a (lower-case) request header name is one the upstream never sees from a client
    unless its route forwards it by name (see ``_IDENTITY_AND_OVERRIDE``)."""
    return name in _IDENTITY_AND_OVERRIDE or name.startswith(_IDENTITY_PREFIXES)


def check_forwardable_identity_header(name: str) -> str:
    """A route's ``forward_identity_headers`` entry, lower-cased; ValueError for a name that is
    no identity or override header (it is forwarded anyway) or that the gateway sets itself."""
    lowered = name.strip().lower()
    raw = lowered.encode("latin-1", errors="replace")
    if raw in _REQUEST_REMOVE:
        raise ValueError(f"{name!r} is set or removed by the gateway itself, never forwarded")
    if not is_identity_or_override(raw):
        raise ValueError(f"{name!r} is not an identity or override header (those pass anyway)")
    return lowered


# Header names for the upstream as multidict's ``istr``: the forwarder (aiohttp) files every
# name into case-insensitive dicts three times, and an ``istr`` carries its folded form where
# a plain ``str`` is folded again each time. The client's names are kept once seen (bounded in
# number and length: a client chooses them).
_FORWARDED_FOR = istr("x-forwarded-for")
_FORWARDED_PROTO = istr("x-forwarded-proto")
_FORWARDED_HOST = istr("x-forwarded-host")
_AUTHORIZATION = istr("authorization")
_DPOP = istr("dpop")
_REQUEST_ID_NAME = istr("x-request-id")
_COOKIE = istr("cookie")
# A plan's decisions for the two names whose value decides: the only falsy names it keeps (an
# empty name is dropped), so that the common case is one truth test, told apart by identity.
_CONNECTION = ""  # dropped; the names it lists are dropped too
_FORWARDED_COOKIE = istr("")  # all but the gateway's own cookies go on
_NAMES: dict[bytes, str] = {}
_NAMES_MAX = 512
_NAME_KEPT_MAX = 64  # longer names (rare, and a client's to choose) are not kept


def _new_upstream_name(name: bytes) -> str:
    """A lower-case request header name not in ``_NAMES`` yet, as an ``istr`` kept there for
    the next request (the caller looked it up first)."""
    found = istr(name.decode("latin-1"))
    _remember(_NAMES, name, found)
    return found


def _remember(memo: dict[bytes, _V], name: bytes, value: _V) -> None:
    """Keep ``value`` for a client-chosen header ``name``: short names only, and at most
    ``_NAMES_MAX`` of them, the oldest out first, so that a client sending junk names neither
    grows the table nor fills it for good (a name pushed out is decided again when it comes
    back, and kept again)."""
    if len(name) > _NAME_KEPT_MAX:
        return
    if len(memo) >= _NAMES_MAX:
        del memo[next(iter(memo))]
    memo[name] = value


def first_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of the (lower-case) header ``name`` of an ASGI scope, or None."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def read_headers(
    headers: Iterable[tuple[bytes, bytes]], wanted: frozenset[bytes]
) -> dict[bytes, str]:
    """The first value of each ``wanted`` (lower-case) header of an ASGI scope; every
    ``Cookie`` field joined into one value.

    HTTP/2 and HTTP/3 let a client send each cookie as a field of its own, and a server may
    pass them on that way; they are joined with ``"; "`` before the session cookie is read
    (RFC 9113 §8.2.3), so the session cookie is found in whichever field it came.
    """
    found: dict[bytes, str] = {}
    for key, value in headers:
        if key in wanted:
            if key not in found:
                found[key] = value.decode("latin-1")
            elif key == b"cookie":
                found[key] += "; " + value.decode("latin-1")
    return found


def joined_cookie(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Every ``Cookie`` field of an ASGI scope's headers as one value (see read_headers)."""
    return read_headers(headers, _COOKIE_ONLY).get(b"cookie")


def _listed(
    value: bytes, removed: frozenset[bytes], listed: set[bytes] | None
) -> set[bytes] | None:
    """Add the header names a ``Connection`` value lists (hop-by-hop too) to ``listed``,
    except those ``removed`` anyway. Callers skip the plain values (``keep-alive``, ``close``:
    one on nearly every message) without a call."""
    tokens = {t.strip().lower() for t in value.split(b",") if t.strip()} - removed
    if not tokens:
        return listed
    return tokens | (listed or set())


def strip_cookies(cookie_header: bytes, names: frozenset[bytes]) -> bytes:
    """Remove the named cookies from a ``Cookie`` header value; keep the others as sent."""
    kept = [
        part.strip()
        for part in cookie_header.split(b";")
        if part.strip() and part.strip().split(b"=", 1)[0].strip() not in names
    ]
    return b"; ".join(kept)


class RequestHeaderPlan:
    """One pass over a request's headers (this runs on every proxied request), for one policy:
    which (lower-case) headers the caller wants the first value of, which cookies are the
    gateway's, whether the route forwards the client's other cookies and whether the gateway's
    request id replaces the client's.

    What the policy decides for a header name is remembered per name as the client spelled it
    (a browser sends the same few names on every request), so that a known name costs one dict
    lookup instead of a case fold and three set lookups. The memory is bounded in number and
    length of names (a client chooses them); a name beyond it is decided again each time.
    """

    __slots__ = (
        "_decisions",
        "_forward_cookies",
        "_forward_identity",
        "_gateway_cookies",
        "_remove",
        "_wanted",
    )

    def __init__(
        self,
        *,
        wanted: frozenset[bytes],
        gateway_cookies: frozenset[bytes],
        forward_cookies: bool = False,
        replace_request_id: bool = False,
        forward_identity: frozenset[bytes] = _NOTHING,
    ) -> None:
        self._wanted = wanted
        self._remove = _REQUEST_REMOVE_BY[(forward_cookies, replace_request_id)]
        self._gateway_cookies = gateway_cookies
        self._forward_cookies = forward_cookies
        self._forward_identity = forward_identity  # lower-case names the route lets through
        # raw name -> (name for the upstream: an ``istr``, a falsy marker whose value decides,
        # or None to drop; the lower-case name if wanted, else None)
        self._decisions: dict[bytes, tuple[str | None, bytes | None]] = {}

    def _decide(self, raw_name: bytes) -> tuple[str | None, bytes | None]:
        """The decision for one name. Its first part is None (drop), ``_CONNECTION`` or
        ``_FORWARDED_COOKIE`` (the value decides) or a non-empty ``istr``."""
        name = raw_name.lower()
        decision: tuple[str | None, bytes | None]
        wanted = name if name in self._wanted else None
        if name == b"connection":
            decision = (_CONNECTION, wanted)
        elif name == b"cookie" and self._forward_cookies:
            decision = (_FORWARDED_COOKIE, wanted)
        elif (
            not name  # (an empty name is no HTTP field name)
            or name in self._remove
            or (is_identity_or_override(name) and name not in self._forward_identity)
        ):
            decision = (None, wanted)
        else:
            decision = (_NAMES.get(name) or _new_upstream_name(name), wanted)
        _remember(self._decisions, raw_name, decision)
        return decision

    def scan(self, headers: RawHeaders) -> tuple[int, dict[bytes, str], list[tuple[str, str]]]:
        """Their total size, the first value of each wanted header, and the client's headers an
        upstream may see (see module docstring), to which :func:`add_forwarding` adds ours.

        Names a ``Connection`` header lists, rare in practice, are dropped afterwards.
        """
        decisions = self._decisions
        size = 0
        found: dict[bytes, str] = {}
        out: list[tuple[str, str]] = []
        listed: set[bytes] | None = None
        for raw_name, raw_value in headers:
            size += len(raw_name) + len(raw_value)
            decision = decisions.get(raw_name)
            if decision is None:
                decision = self._decide(raw_name)
            upstream_name, wanted = decision
            if wanted:
                if wanted not in found:
                    found[wanted] = raw_value.decode("latin-1")
                elif wanted == b"cookie":  # one field per cookie (HTTP/2): see joined_cookie
                    found[wanted] += "; " + raw_value.decode("latin-1")
            if upstream_name:
                out.append((upstream_name, raw_value.decode("latin-1")))
            elif upstream_name is _CONNECTION:
                if raw_value not in _PLAIN_CONNECTION:
                    listed = _listed(raw_value, _REQUEST_REMOVE, listed)
            elif upstream_name is _FORWARDED_COOKIE:
                raw_value = strip_cookies(raw_value, self._gateway_cookies)
                if raw_value:
                    out.append((_COOKIE, raw_value.decode("latin-1")))
        if listed:
            dropped = {token.decode("latin-1") for token in listed}
            out = [(name, value) for name, value in out if name not in dropped]
        return size, found, out


def scan_request_headers(
    headers: RawHeaders,
    *,
    wanted: frozenset[bytes],
    gateway_cookies: frozenset[bytes],
    forward_cookies: bool = False,
    replace_request_id: bool = False,
    forward_identity: frozenset[bytes] = _NOTHING,
) -> tuple[int, dict[bytes, str], list[tuple[str, str]]]:
    """:meth:`RequestHeaderPlan.scan` for a one-off policy (the proxy keeps its plans)."""
    return RequestHeaderPlan(
        wanted=wanted,
        gateway_cookies=gateway_cookies,
        forward_cookies=forward_cookies,
        replace_request_id=replace_request_id,
        forward_identity=forward_identity,
    ).scan(headers)


Site = tuple[tuple[str, str], tuple[str, str]]


def forwarded_site(proto: str, host: str) -> Site:
    """``X-Forwarded-Proto`` and ``X-Forwarded-Host``: the same on every request, built once."""
    return ((_FORWARDED_PROTO, proto), (_FORWARDED_HOST, host))


def add_forwarding(
    out: list[tuple[str, str]],
    *,
    client_ip: str,
    site: Site,
    bearer: str | None,
    request_id: str | None,
    proof: str | None = None,
) -> list[tuple[str, str]]:
    """Append the gateway's own request headers to ``out`` (and return it); with a DPoP
    ``proof``, the token goes as ``Authorization: DPoP`` beside it (RFC 9449 §7.1)."""
    out.append((_FORWARDED_FOR, client_ip))
    out.extend(site)
    if proof is not None and bearer is not None:
        out.append((_AUTHORIZATION, "DPoP " + bearer))
        out.append((_DPOP, proof))
    elif bearer is not None:
        out.append((_AUTHORIZATION, "Bearer " + bearer))
    if request_id is not None:
        out.append((_REQUEST_ID_NAME, request_id))
    return out


def build_upstream_headers(
    headers: RawHeaders,
    *,
    gateway_cookies: frozenset[bytes],
    client_ip: str,
    proto: str,
    host: str,
    bearer: str | None,
    forward_cookies: bool = False,
    request_id: str | None = None,
    forward_identity: frozenset[bytes] = _NOTHING,
) -> list[tuple[str, str]]:
    """The request headers an upstream receives (see module docstring); with ``request_id``,
    that one replaces any ``X-Request-ID`` the client sent."""
    _, _, out = scan_request_headers(
        headers,
        wanted=_NOTHING,
        gateway_cookies=gateway_cookies,
        forward_cookies=forward_cookies,
        replace_request_id=request_id is not None,
        forward_identity=forward_identity,
    )
    return add_forwarding(
        out,
        client_ip=client_ip,
        site=forwarded_site(proto, host),
        bearer=bearer,
        request_id=request_id,
    )


def filter_response_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    gateway_cookies: frozenset[bytes],
    request_id: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the client: no hop-by-hop, no overwrite of our cookies;
    with ``request_id``, that one replaces the upstream's ``X-Request-ID``."""
    remove = _RESPONSE_REMOVE_ID if request_id is not None else _RESPONSE_REMOVE
    out: list[tuple[bytes, bytes]] = []
    listed: set[bytes] | None = None
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in remove:
            if name == b"connection" and value not in _PLAIN_CONNECTION:
                listed = _listed(value, _RESPONSE_REMOVE, listed)
            continue
        if name == b"set-cookie" and value.split(b"=", 1)[0].strip() in gateway_cookies:
            continue
        out.append((name, value))
    if listed:
        out = [(name, value) for name, value in out if name not in listed]
    if request_id is not None:
        out.append((_REQUEST_ID, request_id))
    return out
