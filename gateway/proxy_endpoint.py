"""The catch-all ASGI endpoint: route -> session -> CSRF -> token -> upstream, streamed.

Raw ASGI rather than a Starlette endpoint: the hot path builds no Request/Response objects and
runs no extra tasks per request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.types import Receive, Scope, Send

from .errors import (
    GatewayError,
    HeadersTooLarge,
    LoginRequired,
    NotFound,
    PayloadTooLarge,
    render_error,
)
from .headers import build_upstream_headers, filter_response_headers
from .routing import Route, normalize_path
from .security import check_csrf

if TYPE_CHECKING:
    from .app import Gateway

logger = logging.getLogger("gateway.proxy")

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


class ClientDisconnected(Exception):
    """The browser went away while we were reading its request body."""


class _RequestBody:
    """The client's request body as an async iterator, counted against the route's limit."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.too_large = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk: bytes = message.get("body", b"")
            total += len(chunk)
            if self._limit and total > self._limit:
                self.too_large = True
                raise PayloadTooLarge(f"the request body is over {self._limit} bytes")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _has_body(method: str, scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return _header(scope, b"transfer-encoding") is not None or method not in _BODYLESS


class ProxyEndpoint:
    """Forwards every request that no gateway endpoint claimed."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        try:
            await self._handle(scope, receive, send)
        except GatewayError as exc:
            await render_error(exc)(scope, receive, send)
        except ClientDisconnected:
            return

    def _limits(self, scope: Scope, route: Route) -> int:
        settings = self._gw.settings
        if sum(len(k) + len(v) for k, v in scope["headers"]) > settings.limits.max_header_bytes:
            raise HeadersTooLarge("the request headers are too large")
        limit = route.settings.max_body_bytes
        limit = settings.limits.max_body_bytes if limit is None else limit
        length = _header(scope, b"content-length")
        if limit and length is not None and length.strip().isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
        return limit

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self._gw
        await gw.ensure_started()
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = normalize_path(raw_path.decode("latin-1"))
        route = gw.routes.match(path)
        if route is None:
            raise NotFound("no route matches this path")
        limit = self._limits(scope, route)
        method: str = scope["method"]
        bearer: str | None = None
        if route.needs_token:
            cookie = _header(scope, b"cookie")
            session = await gw.sessions.current(cookie)
            if session is None:
                if method == "GET" and "text/html" in (_header(scope, b"accept") or ""):
                    await self._redirect_to_login(scope, send, path)
                    return
                raise LoginRequired("no valid session", login_url=gw.login_url)
            if route.settings.csrf:
                check_csrf(
                    method=method,
                    header_value=_header(scope, gw.csrf_header),
                    expected_value=gw.settings.csrf.value,
                    origin=_header(scope, b"origin"),
                    sec_fetch_site=_header(scope, b"sec-fetch-site"),
                    allowed_origins=gw.settings.allowed_origins,
                )
            bearer = await gw.broker.access_token(session, route)
        query = scope.get("query_string", b"").decode("latin-1")
        url = route.upstream_url(path, query)
        headers = build_upstream_headers(
            scope["headers"],
            gateway_cookies=gw.sessions.cookie_names_bytes,
            client_ip=(scope.get("client") or ("unknown", 0))[0],
            proto=gw.public_scheme,
            host=gw.public_host,
            bearer=bearer,
            forward_cookies=route.settings.forward_cookies,
        )
        body = _RequestBody(receive, limit) if _has_body(method, scope) else None
        try:
            upstream = await gw.upstream.send(
                method,
                url,
                headers,
                body.__aiter__() if body is not None else None,
                timeout=route.settings.timeout,
                route=route.name,
            )
        except GatewayError:
            if body is not None and body.too_large:
                raise PayloadTooLarge(f"the request body is over {limit} bytes") from None
            raise
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": upstream.status,
                    "headers": filter_response_headers(
                        upstream.headers, gateway_cookies=gw.sessions.cookie_names_bytes
                    ),
                }
            )
            if method != "HEAD":
                try:
                    async for chunk in upstream.body:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except GatewayError:
                    return  # logged where it happened; the client sees a truncated body
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            upstream.close()

    async def _redirect_to_login(self, scope: Scope, send: Send, path: str) -> None:
        """A navigation without a session goes to login and comes back here afterwards."""
        query = scope.get("query_string", b"").decode("latin-1")
        target = path + (f"?{query}" if query else "")
        location = f"{self._gw.login_url}?return_to={quote(target, safe='')}"
        await send(
            {
                "type": "http.response.start",
                "status": 302,
                "headers": [(b"location", location.encode()), (b"cache-control", b"no-store")],
            }
        )
        await send({"type": "http.response.body", "body": b""})
