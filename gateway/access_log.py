"""Per-request metrics and one access-log line, once a request is answered.

The dispatcher (``dispatch.py``) records every request here. The line is written on
``gateway.access`` once the response is complete; it names the configured route, never the
path or query (paths and queries can carry codes, states or an application's own secrets), and
no header. Nothing is formatted when the logger is disabled.
"""

from __future__ import annotations

import logging

from .metrics import GatewayMetrics
from .observability import RequestContext, user_for_log
from .settings import LogSettings

access_logger = logging.getLogger("gateway.access")

# nginx's code for "the client went away before an answer was started".
CLIENT_CLOSED_REQUEST = 499


class AccessLog:
    """Per-request metrics and the access line, once a request is answered."""

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
