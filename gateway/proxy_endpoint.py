"""The proxy: route -> authorization policy -> upstream, streamed both ways.

Raw ASGI rather than a Starlette endpoint: the hot path builds no Request/Response objects and
runs no extra tasks per request. The dispatcher (``dispatch.py``) calls :meth:`ProxyEndpoint.handle`
for every request that is not the gateway's own and renders whatever it raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from .authorize import PUBLIC, Authorizer
from .challenge import bearer_challenge
from .connections import ConnectionRegistry
from .dpop import DPoPBound, nonce_in, server_of
from .errors import (
    GatewayError,
    HeadersTooLarge,
    InvalidPath,
    LoginRequired,
    NotFound,
    PayloadTooLarge,
    StepUpRequired,
    with_query,
)
from .headers import (
    RequestHeaderPlan,
    Site,
    add_forwarding,
    filter_response_headers,
)
from .metrics import UNMATCHED_ROUTE
from .observability import REQUEST_ID_HEADER, RequestContext, bind_request_id
from .own_paths import is_owned_path
from .proxy import UpstreamClient, UpstreamResponse
from .request_body import RequestBody
from .routing import Route, RouteTable, normalize_path
from .sessions.base import Session
from .settings import LimitSettings

logger = logging.getLogger("gateway.proxy")

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


def proxied_path(raw_path: str) -> str:
    """:func:`normalize_path` for a path the dispatcher did not take for the gateway's own.

    A path that only normalises to one of the gateway's own (``/%61uth/me``, ``/x/../metrics``)
    is refused rather than proxied: the gateway's paths are never a route's. (A path that
    normalises to itself was seen as it is by the dispatcher.)
    """
    path = normalize_path(raw_path)
    if path != raw_path and is_owned_path(path):
        raise InvalidPath("the path resolves to one of the gateway's own paths")
    return path


def _no_count(route: str) -> None:
    return None


def _is_event_stream(headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    """Server-sent events end cleanly when their session does (EventSource then reconnects
    and meets the 401); any other body cut short stays visibly truncated."""
    return any(
        k.lower() == b"content-type" and v.lower().startswith(b"text/event-stream")
        for k, v in headers
    )


class ProxyEndpoint:
    """Forwards every request that is not the gateway's own."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        authorizer: Authorizer,
        upstream: UpstreamClient,
        connections: ConnectionRegistry,
        gateway_cookies: frozenset[bytes],
        limits: LimitSettings,
        site: Site,
        login_url: str,
        own_headers: tuple[tuple[bytes, bytes], ...],
        on_retry: Callable[[str], None] = _no_count,
    ) -> None:
        self._routes = routes
        self._authorizer = authorizer
        self._upstream = upstream
        self._connections = connections
        self._gateway_cookies = gateway_cookies
        self._max_header_bytes = limits.max_header_bytes
        self._max_body_bytes = limits.max_body_bytes
        self._body_idle = limits.body_idle_timeout
        self._buffer_up_to = limits.buffered_body_bytes
        self._site = site
        self._login_url = login_url
        self._own_headers = own_headers  # on the redirect to login (see dispatch.py)
        self._on_retry = on_retry  # counts a request sent again with a new token, per route
        # The request headers the hot path reads, collected in one pass. A route without a
        # token reads only the body's framing and the request id; a token route also what the
        # authorization policy reads and Accept (login redirect). One plan per kind of route
        # (token or not, forwarding cookies or not, identity headers it forwards), found by
        # the route's name.
        common = {b"content-length", b"transfer-encoding", REQUEST_ID_HEADER}
        for_token = {b"accept", *authorizer.wanted}
        plans: dict[tuple[bool, bool, frozenset[bytes]], RequestHeaderPlan] = {}
        self._header_plans: dict[str, RequestHeaderPlan] = {}
        for route in routes:
            kind = (route.needs_token, route.forward_cookies, route.forward_identity_headers)
            if kind not in plans:
                plans[kind] = RequestHeaderPlan(
                    wanted=frozenset(common | for_token if route.needs_token else common),
                    gateway_cookies=gateway_cookies,
                    forward_cookies=route.forward_cookies,
                    replace_request_id=True,
                    forward_identity=route.forward_identity_headers,
                )
            self._header_plans[route.name] = plans[kind]
        # The server (origin) of each route's upstream: its DPoP nonces are remembered by it.
        self._servers = {route.name: server_of(route.settings.upstream) for route in routes}

    def _request_body(
        self, size: int, found: dict[bytes, str], method: str, route: Route, receive: Receive
    ) -> RequestBody | None:
        """Refuse headers over their limit and a declared body over the route's; the body to
        stream (counted against that limit as it arrives), or None for a request without one."""
        if size > self._max_header_bytes:
            raise HeadersTooLarge("the request headers are too large")
        limit = route.max_body_bytes
        limit = self._max_body_bytes if limit is None else limit
        length = found.get(b"content-length")
        if length is not None:
            length = length.strip()
            if length in ("", "0"):
                return None
            # ASCII digits only ("²" is a digit to isdigit and not to int), and no int() of
            # thousands of them (Python refuses; more than 18 is over any limit anyway).
            declared: int | None = None
            if length.isascii() and length.isdigit():
                if len(length) <= 18:
                    declared = int(length)
                if limit and (declared is None or declared > limit):
                    raise PayloadTooLarge(f"the request body is over {limit} bytes")
            return RequestBody(
                receive,
                limit,
                idle=self._body_idle,
                declared=declared,
                buffer_up_to=self._buffer_up_to,
            )
        if b"transfer-encoding" in found or method not in _BODYLESS:
            return RequestBody(receive, limit, idle=self._body_idle)
        return None

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext, raw_path: str
    ) -> None:
        """Route, authorization, upstream; raises what the dispatcher answers. ``raw_path``:
        the request's path as sent (below the mount point), still percent-encoded."""
        context.route = UNMATCHED_ROUTE  # until a configured route matches
        path = proxied_path(raw_path)
        route = self._routes.match(path)
        if route is None:
            raise NotFound("no route matches this path")
        context.route = route.name
        size, found, headers = self._header_plans[route.name].scan(scope["headers"])
        bind_request_id(context, found.get(REQUEST_ID_HEADER))
        method: str = scope["method"]
        body = self._request_body(size, found, method, route, receive)
        session, bearer = PUBLIC
        try:
            if route.needs_token:
                session, bearer = await self._authorizer.authorize(
                    route, method, found, login_url=self._login_url
                )
                context.sub = session.sub if session is not None else None
            query = scope.get("query_string", b"").decode("latin-1")
            url = route.upstream_url(path, query)
            proof = None
            if type(bearer) is DPoPBound:  # sender-constrained: a fresh proof per request
                server = self._servers[route.name]
                proof = await self._authorizer.dpop_proof(session, bearer, method, url, server)
            add_forwarding(
                headers,
                client_ip=(scope.get("client") or ("unknown", 0))[0],
                site=self._site,
                bearer=bearer,
                request_id=context.request_id,
                proof=proof,
            )
            sent_at = time.perf_counter()
            try:
                upstream = await self._upstream.send(
                    method,
                    url,
                    headers,
                    await body.ready() if body is not None else None,
                    timeout=route.timeout,
                    route=route.name,
                )
                if proof is not None and self._new_nonce(upstream, route) is not None:
                    await self._remember_nonce(upstream, route)
                if upstream.status == 401 and bearer is not None:
                    upstream = await self._after_refusal(
                        upstream, route, session, bearer, method, url, headers, body
                    )
            except GatewayError:
                if body is not None and body.failure is not None:  # 413 or 408, not upstream's
                    raise body.failure from None
                raise
            finally:
                context.upstream_seconds = time.perf_counter() - sent_at  # to response headers
        except LoginRequired as exc:
            if method == "GET" and "text/html" in (found.get(b"accept") or ""):
                await self._redirect_to_login(scope, send, path, context, exc)
                return
            raise
        # Streamed answers end with the session (connections.py).
        session_id = session.id if session is not None else None
        try:
            context.status = upstream.status
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": filter_response_headers(
                        upstream.headers,
                        gateway_cookies=self._gateway_cookies,
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

    async def _after_refusal(
        self,
        upstream: UpstreamResponse,
        route: Route,
        session: Session | None,
        bearer: str,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: RequestBody | None,
    ) -> UpstreamResponse:
        """An upstream's 401 to a request with a token: the answer to relay, or raise.

        ``Bearer error="invalid_token"``: the token was revoked or died early: drop it, mint
        another (single flight as always) and send the request once more, when its body can
        be sent again (none, or read whole and small). ``DPoP error="use_dpop_nonce"`` to a
        DPoP-bound token: once more on the same terms, the proof carrying the new nonce.
        ``insufficient_user_authentication`` (RFC 9470) on a user's token: ``401
        step_up_required`` asking for what it named.
        Any other 401 is the upstream's answer, relayed as it is.
        """
        bound = type(bearer) is DPoPBound
        challenge = bearer_challenge(
            (v.decode("latin-1") for k, v in upstream.headers if k.lower() == b"www-authenticate"),
            "dpop" if bound else "bearer",
        )
        if challenge is None:
            return upstream
        if challenge.step_up and session is not None:
            upstream.close()
            raise StepUpRequired(
                f"the upstream of route {route.name} asks for a stronger or more recent login",
                login_url=self._login_url,
                acr_values=challenge.acr_values,
                max_age=challenge.max_age,
            )
        nonce = bound and challenge.use_dpop_nonce  # RFC 9449 §9: the nonce is remembered
        if not (nonce or challenge.invalid_token) or (body is not None and not body.replayable):
            return upstream
        upstream.close()
        self._on_retry(route.name)
        fresh = bearer if nonce else await self._authorizer.renewed_token(route, session, bearer)
        proof = await self._authorizer.dpop_proof(
            session, fresh, method, url, self._servers[route.name]
        )
        authorization = ("DPoP " if proof is not None else "Bearer ") + fresh
        headers = [
            (name, authorization) if name == "authorization" else (name, value)
            for name, value in headers
            if name != "dpop"
        ]
        if proof is not None:
            headers.append(("dpop", proof))
        answer = await self._upstream.send(
            method,
            url,
            headers,
            body.__aiter__() if body is not None else None,
            timeout=route.timeout,
            route=route.name,
        )
        if proof is not None and self._new_nonce(answer, route) is not None:
            await self._remember_nonce(answer, route)
        return answer

    def _new_nonce(self, upstream: UpstreamResponse, route: Route) -> str | None:
        """The answer's ``DPoP-Nonce`` when it differs from the one held for the upstream's
        server, else None: checked without a coroutine (an upstream may send the same nonce
        on every answer)."""
        nonce = nonce_in(upstream.headers)
        dpop = self._authorizer.dpop
        if nonce is None or dpop is None or nonce == dpop.nonces.get(self._servers[route.name]):
            return None
        return nonce

    async def _remember_nonce(self, upstream: UpstreamResponse, route: Route) -> None:
        """A new ``DPoP-Nonce`` replaces the one held for the upstream's server, here and in
        the store (``DPoPNonces.remember``)."""
        nonce = self._new_nonce(upstream, route)
        dpop = self._authorizer.dpop
        if nonce is not None and dpop is not None:
            await dpop.nonces.remember(self._servers[route.name], nonce)

    async def _relay_rest(
        self, upstream: UpstreamResponse, chunk: bytes, send: Send, session_id: str | None
    ) -> None:
        """A body longer than its first ``chunk``, relayed as it arrives.

        It registers with the connections registry while it is relayed (an event stream above
        all), so that the end of its session (logout, back-channel logout) cuts it short.
        """
        next_chunk = upstream.body.__anext__  # as in handle: no anext() wrapper per chunk
        with self._connections.stream(session_id) as stream:
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
        self, scope: Scope, send: Send, path: str, context: RequestContext, exc: LoginRequired
    ) -> None:
        """A navigation without a (strong enough) session goes to the login the refusal names
        and comes back here afterwards."""
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + (f"?{query}" if query else "")
        location = with_query(exc.extra["login_url"], [("return_to", target)])
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
