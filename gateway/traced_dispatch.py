"""The dispatcher with a server span around each HTTP request (tracing on; ``tracing.py``).

A subclass chosen by ``create_app`` when tracing is on, so that the plain dispatcher's way in
stays as it is: with tracing off no request pays for a test of it. The span follows the HTTP
semantic conventions: named ``<method> <route>``, ``http.route`` the configured route's name (or
the gateway's own fixed path, such as ``/auth/callback``), never the raw path or its query; an
incoming ``traceparent`` is its parent. Everything the request does (store, IdP, upstream) runs
in its context and so becomes its children. WebSockets are not traced (a span as long as the
socket would say little).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import Receive, Scope, Send

from . import own_paths
from .dispatch import Dispatcher
from .metrics import GATEWAY_ROUTE
from .observability import CONTEXT_KEY, RequestContext
from .tracing import Tracing, extract_context

_OWN_FIXED_PATHS = frozenset((*own_paths.AUTH_ENDPOINTS, *own_paths.SERVICE_ENDPOINTS))


class TracedDispatcher(Dispatcher):
    """:class:`Dispatcher` with one server span per HTTP request."""

    def __init__(self, *, tracing: Tracing, **options: Any) -> None:
        super().__init__(**options)
        self._tracer = tracing.tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        method: str = scope["method"]
        span = self._tracer.start_span(
            method,
            context=extract_context(scope["headers"]),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.scheme": scope.get("scheme", "http"),
                "network.protocol.version": scope.get("http_version", "1.1"),
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await super().__call__(scope, receive, send)
        finally:
            otel_context.detach(token)
            context: RequestContext | None = scope.get(CONTEXT_KEY)
            if context is not None:
                route = context.route
                if route == GATEWAY_ROUTE and scope["path"] in _OWN_FIXED_PATHS:
                    route = scope["path"]
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("gateway.request_id", context.request_id)
                if context.status is not None:
                    span.set_attribute("http.response.status_code", context.status)
                    if context.status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
            span.end()
