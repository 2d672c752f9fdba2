"""Forward-auth: answer a data plane's auth subrequest with the route's bearer token.

nginx ``auth_request``, Traefik ``forwardAuth``, Envoy ``ext_authz`` (HTTP service) and
ingress-nginx send the original request's headers here; the gateway runs the same
route -> session -> CSRF -> token policy as its own proxy and answers without a body:

* ``200`` + ``Authorization: Bearer <token for the route's audience>`` (with DPoP:
  ``Authorization: DPoP <token>`` and a ``DPoP`` proof for the original method and the
  route's upstream URL; the data plane passes both on) (the user's, or the
  gateway's client token on ``auth: client`` / ``user_or_client`` without a session; no header
  for ``auth: none``, nor for ``user_or_none`` without a session), optionally
  ``X-Auth-Request-User`` / ``X-Auth-Request-Email`` with a user's token;
* ``401 login_required`` (or ``step_up_required``) with a ``login_url`` back to the original
  URI, or ``403``, as the proxy would; anything the gateway cannot place (no route, a malformed
  or ambiguous original URI) is a ``403`` too, because data planes treat any other status as
  their own error.

The route comes from ``?route=<name>`` on the endpoint's own URL (set by the data plane's config,
never by the client), else from matching the original path against the route table. The original
path is read from every header the known data planes use; they must agree, so a header a client
slipped past its data plane cannot pick another route.

The answer carries bearer tokens, so only the data plane may ask: a shared secret in
``X-Forward-Auth-Secret`` and/or a source-address allow-list (both must pass when both are set).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from starlette.types import Receive, Scope, Send

from .authorize import Authorizer
from .dpop import DPoPBound, server_of
from .errors import (
    CallerRefused,
    Forbidden,
    GatewayError,
    InvalidPath,
    LoginRequired,
    as_gateway_error,
    render_error,
)
from .headers import first_header, read_headers
from .observability import request_context
from .routing import Route, RouteTable, normalize_path
from .security import tokens_equal, validate_return_to
from .sessions.base import Session
from .settings import ForwardAuthSettings

logger = logging.getLogger("gateway.forward_auth")

SECRET_HEADER = b"x-forward-auth-secret"
# Where data planes put the original request target: Traefik X-Forwarded-Uri, nginx (by
# convention) X-Original-URI, ingress-nginx X-Original-URL (absolute), Envoy
# X-Envoy-Original-Path. Envoy's ext_authz also appends the original path to the check request's
# own path (``path_prefix``).
_URI_HEADERS = (b"x-forwarded-uri", b"x-original-uri", b"x-envoy-original-path")
_URL_HEADER = b"x-original-url"
_METHOD_HEADERS = (b"x-forwarded-method", b"x-original-method")
_METHOD = re.compile(r"[A-Z]{1,16}")
_MAX_URI = 8192
_OK_HEADERS = [(b"cache-control", b"no-store"), (b"content-length", b"0")]


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    """What the data plane told us about the request it is asking about."""

    method: str
    path: str | None  # normalised, percent-decoded; None when the data plane named only a route
    target: str | None  # raw path + query as the browser sent it (for the login return_to)
    route_name: str | None
    raw_path: str | None = None  # normalised, still percent-encoded (a DPoP proof's htu)


def _all(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope["headers"] if k == name]


def _split_target(value: str, *, absolute: bool = False) -> tuple[str, str]:
    """(raw path, query) of a request target; absolute URLs only where ``absolute``."""
    value = value.strip()
    if len(value) > _MAX_URI or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise Forbidden("the original URI is too long or has control characters")
    if absolute and not value.startswith("/"):
        try:
            parts = urlsplit(value)
        except ValueError:  # e.g. "http://[x/": a malformed IPv6 host
            raise Forbidden("the original URL is malformed") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Forbidden("the original URL is not an absolute http(s) URL")
        return parts.path or "/", parts.query
    path, _, query = value.partition("?")
    if not path.startswith("/"):
        raise Forbidden("the original URI is not a path")
    return path, query.partition("#")[0]


def read_original_request(scope: Scope, endpoint_path: str) -> OriginalRequest:
    """The original method, path and route name from a forward-auth request (pure)."""
    raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    own_path = raw.partition("?")[0]  # some clients put the query into raw_path
    own_query = scope.get("query_string", b"").decode("latin-1")
    candidates: list[tuple[str, str]] = []
    for name in _URI_HEADERS:
        candidates += [_split_target(v) for v in _all(scope, name)]
    candidates += [_split_target(v, absolute=True) for v in _all(scope, _URL_HEADER)]
    route_name: str | None = None
    if own_path.startswith(endpoint_path + "/"):
        # Envoy ext_authz with path_prefix: the rest of our own path is the original path and
        # our query string is the original query, so a `route` in it came from the client.
        candidates.append((own_path[len(endpoint_path) :], own_query))
    else:
        names = [v for k, v in parse_qsl(own_query, keep_blank_values=True) if k == "route"]
        if len(set(names)) > 1:
            raise Forbidden("the data plane named more than one route")
        route_name = (names[0] or None) if names else None
    paths: list[str] = []
    for raw_path, _query in candidates:
        try:
            paths.append(normalize_path(raw_path))
        except InvalidPath as exc:
            raise Forbidden(f"the original path is refused: {exc.message}") from None
    # Compared and matched percent-decoded, as data planes route (normalize_path has refused
    # encoded slashes, backslashes and control characters, so decoding cannot add segments).
    decoded = [unquote(p) for p in paths]
    if len(set(decoded)) > 1:
        raise Forbidden("the data plane's original-URI headers disagree")
    methods = {m.strip().upper() for name in _METHOD_HEADERS for m in _all(scope, name)}
    if len(methods) > 1:
        raise Forbidden("the data plane's original-method headers disagree")
    method = methods.pop() if methods else str(scope["method"]).upper()
    if not _METHOD.fullmatch(method):
        raise Forbidden("the original method is not a valid HTTP method")
    target = None
    if candidates:
        raw_path, query = candidates[0]
        target = raw_path + (f"?{query}" if query else "")
    return OriginalRequest(
        method=method,
        path=decoded[0] if decoded else None,
        target=target,
        route_name=route_name,
        raw_path=paths[0] if paths else None,
    )


def _header_value(value: object) -> bytes | None:
    """A claim as a header value: printable ASCII only, else left out."""
    if not isinstance(value, str) or not value or len(value) > 1024:
        return None
    if not all(0x20 <= ord(c) < 0x7F for c in value):
        return None
    return value.encode("ascii")


class ForwardAuthEndpoint:
    """The forward-auth endpoint as raw ASGI (it is the hot path of forward-auth mode)."""

    def __init__(
        self,
        settings: ForwardAuthSettings,
        *,
        routes: RouteTable,
        authorizer: Authorizer,
        login_url: str,
    ) -> None:
        self._routes = routes
        self._authorizer = authorizer
        self._login_url = login_url
        self.path = settings.path
        self._secret = settings.secret.get_secret_value() if settings.secret else None
        self._networks = [ipaddress.ip_network(s) for s in settings.allowed_sources]
        self._user_headers = settings.user_headers
        self._servers: dict[str, str] = {}  # route name -> its upstream's origin (DPoP nonces)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Any method (Envoy sends the original one); ``<path>/...`` is Envoy's path_prefix."""
        try:
            headers = await self._decide(scope)
        except GatewayError as exc:
            error = as_gateway_error(exc, request_context(scope).route)
            response = render_error(error)
            response.headers["X-Auth-Error"] = error.error
            login_url = error.extra.get("login_url")
            if login_url:
                response.headers["X-Auth-Login-Url"] = login_url
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def _check_caller(self, scope: Scope) -> None:
        client = (scope.get("client") or ("", 0))[0]
        if self._secret is not None and not tokens_equal(
            first_header(scope["headers"], SECRET_HEADER), self._secret
        ):
            logger.info("forward-auth: refused a caller without the shared secret (%s)", client)
            raise CallerRefused("this endpoint answers the configured data plane only")
        if self._networks:
            try:
                address = ipaddress.ip_address(client)
            except ValueError:
                address = None
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if address is None or not any(address in net for net in self._networks):
                logger.info("forward-auth: refused a caller outside allowed_sources (%s)", client)
                raise CallerRefused("this endpoint answers the configured data plane only")

    def _route(self, original: OriginalRequest) -> Route:
        if original.route_name is not None:
            route = self._routes.by_name(original.route_name)
            if route is None:
                raise Forbidden(f"no gateway route is named {original.route_name[:64]!r}")
            return route
        if original.path is None:
            raise Forbidden("the data plane sent neither a route name nor the original URI")
        route = self._routes.match(original.path)
        if route is None:
            raise Forbidden("no gateway route matches the original path")
        return route

    def _return_login_url(self, original: OriginalRequest) -> str:
        """Login, then back to the original URI."""
        target = validate_return_to(original.target, default="")
        login_url = self._login_url
        return f"{login_url}?return_to={quote(target, safe='')}" if target else login_url

    async def _dpop_proof(
        self, route: Route, original: OriginalRequest, session: Session | None, token: str
    ) -> str | None:
        """The proof the data plane passes on with the token: bound to the original method
        and to the URL this route's upstream receives (the original path below the route's
        upstream; the upstream's own URL when the data plane named only the route). The nonce
        is the upstream's latest that the gateway knows (the data plane sees its answers, the
        gateway does not: an upstream behind forward-auth cannot demand nonces)."""
        upstream = route.settings.upstream
        path = original.raw_path
        matched = path is not None and (path + "/").startswith(route.prefix)
        url = route.upstream_url(path, "") if path is not None and matched else upstream
        server = self._servers.get(route.name)
        if server is None:
            server = self._servers[route.name] = server_of(upstream)
        return await self._authorizer.dpop_proof(session, token, original.method, url, server)

    async def _decide(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The 200 answer's headers, or raise what the proxy would have answered."""
        self._check_caller(scope)
        context = request_context(scope)
        original = read_original_request(scope, self.path)
        route = self._route(original)
        context.route = route.name
        login_url = self._return_login_url(original)
        try:
            session, bearer = await self._authorizer.authorize(
                route,
                original.method,
                read_headers(scope["headers"], self._authorizer.wanted),
                login_url=login_url,
            )
        except LoginRequired as exc:
            if exc.base_login_url == login_url:
                raise
            # The broker's (the refresh token died, the IdP wants MFA): login, then back to
            # the original URI.
            raise exc.relocated(login_url) from exc
        if bearer is None:  # a route, or a request, without a token
            return list(_OK_HEADERS)
        proof = None
        if type(bearer) is DPoPBound:
            proof = await self._dpop_proof(route, original, session, bearer)
        if proof is not None:
            headers = [
                (b"authorization", b"DPoP " + bearer.encode("latin-1")),
                (b"dpop", proof.encode("ascii")),
                *_OK_HEADERS,
            ]
        else:
            headers = [(b"authorization", b"Bearer " + bearer.encode("latin-1")), *_OK_HEADERS]
        if session is None:  # the gateway's client token
            return headers
        context.sub = session.sub
        if self._user_headers:
            for name, claim in (
                (b"x-auth-request-user", session.sub),
                (b"x-auth-request-email", session.claims.get("email")),
            ):
                value = _header_value(claim)
                if value is not None:
                    headers.append((name, value))
        return headers
