"""The catch-all ASGI endpoint: route -> session -> CSRF -> token -> upstream, streamed.

Raw ASGI rather than a Starlette endpoint: the hot path builds no Request/Response objects and
runs no extra tasks per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.routing import BaseRoute, Mount
from starlette.types import Receive, Scope, Send

from .access_log import CLIENT_CLOSED_REQUEST, AccessLog
from .errors import (
    GatewayError,
    HeadersTooLarge,
    LoginRequired,
    NotFound,
    PayloadTooLarge,
    render_error,
)
from .headers import (
    RequestHeaderPlan,
    add_forwarding,
    filter_response_headers,
    first_header,
    forwarded_site,
)
from .metrics import UNMATCHED_ROUTE
from .observability import (
    REQUEST_ID_HEADER,
    RequestContext,
    bind_request_id,
    current_request_id,
    new_request_id,
    request_context,
)
from .proxy import UpstreamResponse
from .request_body import ClientDisconnected
from .request_body import RequestBody as _RequestBody
from .routing import Route, normalize_path
from .security import check_csrf
from .security_headers import mark_relayed, own_answer_headers

if TYPE_CHECKING:
    from .app import Gateway
    from .sessions.base import Session

logger = logging.getLogger("gateway.proxy")

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


def _plain_path(raw_path: str) -> str:
    """``normalize_path`` without its cost for the common, already-normal path: printable
    ASCII with no percent-encoding to judge, no backslash and no segment starting with a dot
    (normalize_path would return it unchanged). String methods: a regular expression's search
    cost five times as much on every proxied request. No empty segment either: ``//`` is merged."""
    if (
        raw_path[:1] == "/"
        and raw_path.isascii()
        and raw_path.isprintable()
        and "%" not in raw_path
        and "\\" not in raw_path
        and "/." not in raw_path
        and "//" not in raw_path  # merged by normalize_path (review finding 1)
    ):
        return raw_path
    return normalize_path(raw_path)


async def bearer_for(gw: Gateway, route: Route, session: Session, method: str, scope: Scope) -> str:
    """The anti-CSRF check (unless the route opts out), then the route's access token.

    One policy for a token, shared by this proxy and forward-auth (whose ``scope`` carries the
    original request's headers and ``method`` its original method).
    """
    if route.csrf:
        _check_csrf(gw, method, lambda name: first_header(scope["headers"], name))
    # A hit needs no coroutine (access_token would look it up again first): as in handle.
    return gw.broker.cached_token(session.id, route) or await gw.broker.access_token(session, route)


def _check_csrf(gw: Gateway, method: str, header: Callable[[bytes], str | None]) -> None:
    check_csrf(
        method=method,
        header_value=header(gw.csrf_header),
        expected_value=gw.csrf_value,
        origin=header(b"origin"),
        sec_fetch_site=header(b"sec-fetch-site"),
        allowed_origins=gw.allowed_origins,
    )


def _is_event_stream(headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    """Server-sent events end cleanly when their session does (EventSource then reconnects
    and meets the 401); any other body cut short stays visibly truncated."""
    return any(
        k.lower() == b"content-type" and v.lower().startswith(b"text/event-stream")
        for k, v in headers
    )


class ProxyFastPath:
    """The way in for proxied HTTP requests: straight to the proxy, past Starlette.

    Starlette's error middleware, the gateway's two middlewares and its router each wrap or
    inspect every request; on the hot path that cost more than the proxy's own work
    (benchmarks/README.md). So a proxied request is taken before all of them, and what they
    would have done is done in one pass: the request id (kept from a valid ``X-Request-ID``,
    else generated; sent upstream and back), the per-request metrics and access line
    (:class:`~gateway.access_log.AccessLog`), the security headers on answers the proxy
    renders itself, and a JSON 500 for an unexpected error.

    ``GatewayApp.__call__`` runs it: when ``claims`` takes a request, it awaits
    :meth:`ProxyEndpoint.handle` itself (no coroutine of this class in between) and calls
    :meth:`finish` at the end.

    ``claims`` leaves to the router: a path that one of the gateway's own ``routes`` could
    match (its literal part, up to the first ``{``), a non-HTTP scope, and a mounted app
    (``root_path``).
    """

    def __init__(
        self, endpoint: ProxyEndpoint, *, access: AccessLog, routes: Sequence[BaseRoute]
    ) -> None:
        self.endpoint = endpoint
        self._access = access
        exact: set[str] = set()
        prefixes: list[str] = []
        for route in routes:
            if isinstance(route, Mount) and route.path == "":
                continue  # the catch-all itself
            path = getattr(route, "path", None)
            if not isinstance(path, str):
                prefixes.append("/")  # unknown kind of route: always ask the router
                continue
            literal = path.split("{", 1)[0]
            if literal == path and not isinstance(route, Mount):
                exact.add(path)
            else:
                prefixes.append(literal)
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)

    def claims(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope.get("root_path"):
            return False
        path: str = scope["path"]
        # (startswith with a tuple parses its arguments the slow way: not for an empty one)
        return path not in self._exact and not (self._prefixes and path.startswith(self._prefixes))

    def finish(self, method: str, context: RequestContext, started: float) -> None:
        """After the answer (or the failure): the log context reset, the metrics and the access
        line. ``started``: ``time.perf_counter()`` when the request came in."""
        if context.bound is not None:
            current_request_id.reset(context.bound)
        elif not context.request_id:  # cancelled before handle's header pass
            context.request_id = new_request_id()
        status = context.status if context.status is not None else CLIENT_CLOSED_REQUEST
        self._access.record(method, context, status, time.perf_counter() - started)


class ProxyEndpoint:
    """Forwards every request that no gateway endpoint claimed."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._own_headers = own_answer_headers(https=gateway.settings.is_https)
        self._max_header_bytes = gateway.settings.limits.max_header_bytes
        self._max_body_bytes = gateway.settings.limits.max_body_bytes
        self._body_idle = gateway.settings.limits.body_idle_timeout
        self._buffer_up_to = gateway.settings.limits.buffered_body_bytes
        self._site = forwarded_site(gateway.public_scheme, gateway.public_host)
        # The request headers the hot path reads, collected in one pass. A route without a
        # token reads only the body's framing and the request id; a token route also the
        # session cookie, Accept (login redirect) and the anti-CSRF signals. One plan per kind
        # of route (token or not, forwarding cookies or not, identity headers it forwards),
        # found by the route's name.
        common = {b"content-length", b"transfer-encoding", REQUEST_ID_HEADER}
        for_token = {b"cookie", b"accept", b"origin", b"sec-fetch-site", gateway.csrf_header}
        plans: dict[tuple[bool, bool, frozenset[bytes]], RequestHeaderPlan] = {}
        self._header_plans = {}
        for route in gateway.routes:
            kind = (route.needs_token, route.forward_cookies, route.forward_identity_headers)
            if kind not in plans:
                plans[kind] = RequestHeaderPlan(
                    wanted=frozenset(common | for_token if route.needs_token else common),
                    gateway_cookies=gateway.sessions.cookie_names_bytes,
                    forward_cookies=route.forward_cookies,
                    replace_request_id=True,
                    forward_identity=route.forward_identity_headers,
                )
            self._header_plans[route.name] = plans[kind]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Through the router (the fast path, in ``GatewayApp``, calls :meth:`handle`)."""
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._gw.websockets(scope, receive, send)
            return
        await self.serve(scope, receive, send, request_context(scope))

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        """Proxy one HTTP request; the status sent ends up in ``context.status``. (The fast
        path, ``GatewayApp.__call__``, writes the same two steps out itself.)"""
        try:
            await self.handle(scope, receive, send, context)
        except Exception as exc:
            await self.failed(exc, scope, receive, send, context)

    async def failed(
        self, exc: Exception, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        """Answer what :meth:`handle` raised, unless an answer has started already."""
        if not context.request_id:  # refused before handle's pass over the headers
            bind_request_id(context, first_header(scope["headers"], REQUEST_ID_HEADER))
        if isinstance(exc, ClientDisconnected):
            return
        if not isinstance(exc, GatewayError):
            # Like Starlette's last-resort handler: the type only (an exception's arguments
            # may hold secrets), and a JSON 500. The route's name, not the path: an API path
            # can carry a secret (as the access line, which never logs one).
            logger.error("unhandled %s on route %s", type(exc).__name__, context.route)
            exc = GatewayError("unexpected error")
        elif isinstance(exc, LoginRequired):
            # Every 401 tells the SPA where to go (also when the broker raised it).
            exc.extra.setdefault("login_url", self._gw.login_url)
        if context.status is None:
            await self.render(exc, scope, receive, send, context)

    async def render(
        self, exc: GatewayError, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        """The JSON error, with the gateway's security headers and the request id."""
        response = render_error(exc)
        response.raw_headers += self._own_headers
        response.raw_headers.append((REQUEST_ID_HEADER, context.request_id.encode()))
        context.status = exc.status_code
        await response(scope, receive, send)

    def _request_body(
        self, size: int, found: dict[bytes, str], method: str, route: Route, receive: Receive
    ) -> _RequestBody | None:
        """Refuse headers over their limit and a declared body over the route's; the body to
        stream (counted against that limit as it arrives), or None for a request without one."""
        if size > self._max_header_bytes:
            raise HeadersTooLarge("the request headers are too large")
        limit = route.max_body_bytes
        limit = self._max_body_bytes if limit is None else limit
        length = found.get(b"content-length")
        if length is not None:
            length = length.strip()
            # ASCII digits only ("²" is a digit to isdigit and not to int), and no int() of
            # thousands of them (Python refuses; more than 18 is over any limit anyway).
            if (
                limit
                and length.isascii()
                and length.isdigit()
                and (len(length) > 18 or int(length) > limit)
            ):
                raise PayloadTooLarge(f"the request body is over {limit} bytes")
            if length in ("", "0"):
                return None
            small = length.isascii() and length.isdigit() and len(length) <= 18
            declared = int(length) if small else None
            return _RequestBody(
                receive,
                limit,
                idle=self._body_idle,
                declared=declared,
                buffer_up_to=self._buffer_up_to,
            )
        if b"transfer-encoding" in found or method not in _BODYLESS:
            return _RequestBody(receive, limit, idle=self._body_idle)
        return None

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        """Route, session, CSRF, token, upstream; raises what :meth:`failed` answers."""
        gw = self._gw
        context.route = UNMATCHED_ROUTE  # until a configured route matches
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = _plain_path(raw_path.decode("latin-1"))
        route = gw.routes.match(path)
        if route is None:
            raise NotFound("no route matches this path")
        context.route = route.name
        size, found, headers = self._header_plans[route.name].scan(scope["headers"])
        if not context.request_id:  # the fast path's request: the id from this same pass
            bind_request_id(context, found.get(REQUEST_ID_HEADER))
        method: str = scope["method"]
        body = self._request_body(size, found, method, route, receive)
        bearer: str | None = None
        session_id: str | None = None  # streamed answers end with the session (connections.py)
        if route.needs_token:
            if not gw.started:  # `auth: none` routes work while the IdP is down
                await gw.ensure_started()
            session = await gw.sessions.current(found.get(b"cookie"))
            if session is None:
                if method == "GET" and "text/html" in (found.get(b"accept") or ""):
                    await self._redirect_to_login(scope, send, path, context)
                    return
                raise LoginRequired("no valid session", login_url=gw.login_url)
            context.sub = session.sub
            session_id = session.id
            if route.csrf:
                _check_csrf(gw, method, found.get)
            bearer = gw.broker.cached_token(session_id, route) or await gw.broker.access_token(
                session, route
            )
        query = scope.get("query_string", b"").decode("latin-1")
        url = route.upstream_url(path, query)
        add_forwarding(
            headers,
            client_ip=(scope.get("client") or ("unknown", 0))[0],
            site=self._site,
            bearer=bearer,
            request_id=context.request_id,
        )
        sent_at = time.perf_counter()
        try:
            upstream = await gw.upstream.send(
                method,
                url,
                headers,
                await body.ready() if body is not None else None,
                timeout=route.timeout,
                route=route.name,
            )
        except GatewayError:
            if body is not None and body.failure is not None:  # 413 or 408, not the upstream's
                raise body.failure from None
            raise
        finally:
            context.upstream_seconds = time.perf_counter() - sent_at  # to response headers
        mark_relayed()  # through SecurityHeadersMiddleware: the upstream's headers stay as sent
        try:
            context.status = upstream.status
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": filter_response_headers(
                        upstream.headers,
                        gateway_cookies=gw.sessions.cookie_names_bytes,
                        request_id=context.request_id.encode(),
                    ),
                }
            )
            # The body's last chunk goes with ``more_body`` False (no extra message). A body
            # that arrives in one read (most API answers) goes out at once, here; a longer one
            # is relayed by _relay_rest.
            chunk = b""
            if method != "HEAD":
                try:
                    # (Not ``anext(body, b"")``: its wrapper object costs more than the call.)
                    chunk = await upstream.body.__anext__()
                except StopAsyncIteration:
                    pass  # an empty body
                except GatewayError:
                    return  # logged where it happened; the client sees a truncated body
                if chunk and not upstream.at_eof():
                    await self._relay_rest(upstream, chunk, send, session_id)
                    return
            await send({"type": "http.response.body", "body": chunk, "more_body": False})
        finally:
            upstream.close()

    async def _relay_rest(
        self, upstream: UpstreamResponse, chunk: bytes, send: Send, session_id: str | None
    ) -> None:
        """A body longer than its first ``chunk``, relayed as it arrives.

        It registers with the connections registry while it is relayed (an event stream above
        all), so that the end of its session (logout, back-channel logout) cuts it short.
        """
        next_chunk = upstream.body.__anext__  # as in handle: no anext() wrapper per chunk
        with self._gw.connections.stream(session_id) as stream:
            try:
                while not stream.ended:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    chunk = await next_chunk()
                    if upstream.at_eof() and not stream.ended:
                        await send({"type": "http.response.body", "body": chunk})
                        return
            except StopAsyncIteration:
                pass
            except GatewayError:
                return
        if stream.ended and not _is_event_stream(upstream.headers):
            return  # the session ended mid-body: truncated, never passed off as whole
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _redirect_to_login(
        self, scope: Scope, send: Send, path: str, context: RequestContext
    ) -> None:
        """A navigation without a session goes to login and comes back here afterwards."""
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + (f"?{query}" if query else "")
        location = f"{self._gw.login_url}?return_to={quote(target, safe='')}"
        context.status = 302
        await send(
            {
                "type": "http.response.start",
                "status": 302,
                "headers": [
                    (b"location", location.encode()),
                    (b"cache-control", b"no-store"),
                    *self._own_headers,
                    (REQUEST_ID_HEADER, context.request_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})
