"""The one way in: every HTTP request and WebSocket upgrade, whatever the configuration.

Standalone or mounted under a sub-path, with or without a static site, a request takes the same
steps, in this order:

1. the request context (request id, route, status) for the access line and metrics;
2. the gateway's own paths (``own_paths``: ``/auth/*``, health, metrics, forward-auth) go to
   their endpoints; any other path under ``/auth/`` is a 404, never proxied;
3. else the static site, when one is configured and has the file (a longer route wins);
4. else the proxy (``proxy_endpoint``), which routes, authorizes and forwards.

Whatever any of them raises is answered here, by one renderer: the JSON error of ``errors``,
with the gateway's security headers and the request id; a 5xx is logged naming the route. The
security-headers rule has three cases and no guessing: an answer on the gateway's own paths gets
all of them (``security_headers.own_path_headers``); an error or redirect the gateway renders on
any other path gets ``security_headers.own_answer_headers``; what an upstream or the static site
answered keeps its own headers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send

from .access_log import CLIENT_CLOSED_REQUEST, AccessLog
from .errors import (
    ClientDisconnected,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    as_gateway_error,
    render_error,
)
from .headers import first_header
from .observability import (
    CONTEXT_KEY,
    REQUEST_ID_HEADER,
    RequestContext,
    bind_request_id,
    current_request_id,
    new_request_id,
)
from .own_paths import is_owned_path
from .proxy_endpoint import ProxyEndpoint
from .security_headers import own_path_headers
from .static import StaticSite

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class OwnRoute:
    """One of the gateway's own endpoints: the methods it answers (None: any) and the ASGI app."""

    methods: frozenset[str] | None
    app: ASGIApp

    @classmethod
    def of(cls, endpoint: Endpoint, *methods: str) -> OwnRoute:
        """A Starlette-style endpoint (Request -> Response) answering ``methods``."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            response = await endpoint(Request(scope, receive))
            await response(scope, receive, send)

        allowed = set(methods)
        if "GET" in allowed:
            allowed.add("HEAD")
        return cls(frozenset(allowed), app)


class Dispatcher(Starlette):
    """The gateway's ASGI app (see module docstring). A Starlette app for its lifespan and
    ``state``: the requests themselves never pass Starlette's middleware or router. Its own
    ``__call__`` is the way in, with no coroutine of another object in between (every
    resumption of a proxied request passes each coroutine frame on its way)."""

    def __init__(
        self,
        *,
        own: dict[str, OwnRoute],
        own_subtrees: dict[str, OwnRoute],
        static: StaticSite | None,
        proxy: ProxyEndpoint,
        websockets: Callable[[Scope, Receive, Send, str], Awaitable[None]],
        access: AccessLog,
        https: bool,
        error_headers: tuple[tuple[bytes, bytes], ...],
        lifespan: Lifespan[Starlette] | None = None,
    ) -> None:
        super().__init__(lifespan=lifespan)
        self._own = own
        # An own endpoint that also answers every path below its own (forward-auth's
        # ``/auth/forward/<original path>``, Envoy's path_prefix).
        self._own_subtrees = tuple((path + "/", route) for path, route in own_subtrees.items())
        self._static = static
        self._proxy = proxy
        self._websockets = websockets
        self._access = access
        self._https = https
        self._error_headers = error_headers

    def reconfigure(
        self,
        *,
        own: dict[str, OwnRoute],
        own_subtrees: dict[str, OwnRoute],
        static: StaticSite | None,
        proxy: ProxyEndpoint,
        access: AccessLog,
    ) -> None:
        """Serve a reloaded configuration's endpoints from the next request on (reload.py).

        One synchronous step: a request reads these before its first await, so it runs on
        one configuration from start to end."""
        self._own = own
        self._own_subtrees = tuple((path + "/", route) for path, route in own_subtrees.items())
        self._static = static
        self._proxy = proxy
        self._access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket":
                await self._websockets(scope, receive, send, _raw_path(scope))
            elif kind == "lifespan":
                await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        # No request id yet: the proxy takes it from its one pass over the headers; the others
        # from a pass of their own (_bind_request_id).
        context = scope[CONTEXT_KEY] = RequestContext("")
        path: str = scope["path"]
        mounted = scope.get("root_path")
        if mounted:
            path = _below_mount(scope)
        static = self._static
        try:
            if is_owned_path(path):
                await self._serve_own(path, scope, receive, send, context)
            else:
                raw: bytes | None = scope.get("raw_path")
                raw_path = raw.decode("latin-1") if raw and not mounted else _raw_path(scope)
                if static is not None and static.serves(scope["method"], raw_path):
                    await self._serve_static(static, scope, receive, send, context)
                else:
                    await self._proxy.handle(scope, receive, send, context, raw_path)
        except Exception as exc:
            await self._failed(exc, scope, receive, send, context)
        finally:
            if context.bound is not None:
                current_request_id.reset(context.bound)
            elif not context.request_id:  # cancelled before any header pass
                context.request_id = new_request_id()
            status = context.status if context.status is not None else CLIENT_CLOSED_REQUEST
            self._access.record(scope["method"], context, status, time.perf_counter() - started)

    async def _serve_own(
        self, path: str, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        _bind_request_id(scope, context)
        route = self._own.get(path)
        if route is None:
            route = next((r for prefix, r in self._own_subtrees if path.startswith(prefix)), None)
            if route is None:
                raise NotFound("the gateway has no endpoint at this path")
        if route.methods is not None and scope["method"] not in route.methods:
            raise MethodNotAllowed(allow=tuple(sorted(route.methods)))
        https = self._https

        async def send_own(message: Message) -> None:
            if message["type"] == "http.response.start":
                context.status = message["status"]
                headers = own_path_headers(_without_request_id(message), https=https)
                headers.append((REQUEST_ID_HEADER, context.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await route.app(scope, receive, send_own)

    async def _serve_static(
        self,
        static: StaticSite,
        scope: Scope,
        receive: Receive,
        send: Send,
        context: RequestContext,
    ) -> None:
        _bind_request_id(scope, context)

        async def send_file(message: Message) -> None:
            if message["type"] == "http.response.start":
                context.status = message["status"]
                headers = _without_request_id(message)
                headers.append((REQUEST_ID_HEADER, context.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await static(scope, receive, send_file)

    async def _failed(
        self, exc: Exception, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        """Answer what an endpoint raised, unless its answer has started already."""
        if not context.request_id:  # refused before any pass over the headers
            _bind_request_id(scope, context)
        if isinstance(exc, ClientDisconnected):
            return
        error = as_gateway_error(exc, context.route)
        if context.status is None:
            await self.render(error, scope, receive, send, context)

    async def render(
        self, exc: GatewayError, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        """The JSON error, with the gateway's security headers and the request id."""
        response = render_error(exc)
        response.raw_headers += self._error_headers
        response.raw_headers.append((REQUEST_ID_HEADER, context.request_id.encode()))
        context.status = exc.status_code
        await response(scope, receive, send)


def _without_request_id(start: Message) -> list[tuple[bytes, bytes]]:
    """An answer's headers without its own X-Request-ID (the gateway's replaces it)."""
    return [(k, v) for k, v in start.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]


def _bind_request_id(scope: Scope, context: RequestContext) -> None:
    bind_request_id(context, first_header(scope["headers"], REQUEST_ID_HEADER))


def _below_mount(scope: Scope) -> str:
    """The request's path below the mount point (``root_path``) of an enclosing app."""
    path: str = scope["path"]
    root: str = scope["root_path"]
    if path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _raw_path(scope: Scope) -> str:
    """The request's path as sent, still percent-encoded, below the mount point."""
    raw: bytes | None = scope.get("raw_path")
    text = raw.decode("latin-1") if raw else scope["path"]
    root: str = scope.get("root_path") or ""
    if root:
        if text.startswith(root):
            return text[len(root) :] or "/"
        return _below_mount(scope)  # a mount point with encoded characters: decoded path
    return text
