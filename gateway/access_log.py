"""AccessLogMiddleware: request id in and out, per-request metrics, one access-log line.

Pure ASGI (no BaseHTTPMiddleware: no extra task, streaming untouched). The line is written on
``gateway.access`` once the response is complete; it names the configured route, never the
path or query (paths and queries can carry codes, states or an application's own secrets), and
no header. Nothing is formatted when the logger is disabled.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import GatewayMetrics
from .observability import (
    CONTEXT_KEY,
    REQUEST_ID_HEADER,
    RequestContext,
    current_request_id,
    incoming_request_id,
    new_request_id,
    user_for_log,
)
from .settings import LogSettings

access_logger = logging.getLogger("gateway.access")

# nginx's code for "the client went away before an answer was started".
CLIENT_CLOSED_REQUEST = 499


class AccessLog:
    """Per-request metrics and the access line, once a request is answered.

    Shared by :class:`AccessLogMiddleware` (the gateway's own paths) and the proxy's fast path
    (``GatewayApp.__call__`` with ``proxy_endpoint.ProxyFastPath.finish``), which records its
    requests without a middleware."""

    def __init__(
        self, *, metrics: GatewayMetrics, settings: LogSettings, user_key: bytes = b""
    ) -> None:
        self._user_key = user_key
        self._metrics = metrics
        self._log_enabled = settings.access_log
        self._user_mode = settings.user

    def record(self, method: str, context: RequestContext, status: int, seconds: float) -> None:
        upstream = context.upstream_seconds
        self._metrics.observe_request(context.route, status, seconds, upstream)
        if not (self._log_enabled and access_logger.isEnabledFor(logging.INFO)):
            return
        extra: dict[str, object] = {
            "request_id": context.request_id,
            "method": method,
            "route": context.route,
            "status": status,
            "upstream_ms": round(upstream * 1000, 1) if upstream is not None else None,
            "duration_ms": round(seconds * 1000, 1),
        }
        user = user_for_log(context.sub, self._user_mode, self._user_key)
        if user is not None:
            extra["user"] = user
        access_logger.info(
            "%s %s %d %.1fms", method, context.route, status, seconds * 1000, extra=extra
        )


class AccessLogMiddleware:
    """Outermost gateway middleware: sees every request and its final status."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: GatewayMetrics,
        settings: LogSettings,
        user_key: bytes = b"",
    ) -> None:
        self.app = app
        self._access = AccessLog(metrics=metrics, settings=settings, user_key=user_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        request_id = incoming_request_id(headers)
        if request_id is None:
            # Missing or invalid: ours replaces it, so the upstream sees the same id we log.
            request_id = new_request_id()
            scope["headers"] = [(k, v) for k, v in headers if k != REQUEST_ID_HEADER]
            scope["headers"].append((REQUEST_ID_HEADER, request_id.encode()))
        context = scope[CONTEXT_KEY] = RequestContext(request_id=request_id)
        id_header = (REQUEST_ID_HEADER, request_id.encode())
        status = CLIENT_CLOSED_REQUEST

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                out = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER
                ]
                out.append(id_header)
                message = {**message, "headers": out}
            await send(message)

        token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status == CLIENT_CLOSED_REQUEST:
                status = 500  # rendered by Starlette's outermost error middleware
            raise
        finally:
            current_request_id.reset(token)
            self._access.record(scope["method"], context, status, time.perf_counter() - started)
