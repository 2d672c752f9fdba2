"""Security headers on the gateway's own answers, never on upstream answers it relays.

Gateway-owned are the responses of its own paths (``/auth/*``, ``/healthz``, ``/readyz``,
``/metrics``) and, on any other path, the JSON errors and redirects it renders itself (401, 404,
413, 502 ...). What an upstream answered is relayed untouched: its headers are its own business.
The proxy marks a request as relayed once the upstream has answered (:func:`mark_relayed`),
through a per-request marker held in a context variable. The proxy's fast path skips this
middleware altogether and adds :func:`own_answer_headers` to the answers it renders.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OWNED_PREFIXES = ("/auth/",)
OWNED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# OWASP Secure Headers / HTTP Headers Cheat Sheet: nothing here is meant to be framed, sniffed,
# cached (/auth answers carry state) or to leak its URL in a Referer.
_ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_NO_STORE = (b"cache-control", b"no-store")
_HSTS = (b"strict-transport-security", b"max-age=31536000")


@dataclass(slots=True)
class _Marker:
    relayed: bool = False


_current: ContextVar[_Marker | None] = ContextVar("gateway_response_marker", default=None)


def mark_relayed() -> None:
    """The response about to start is an upstream's: leave its headers alone."""
    marker = _current.get()
    if marker is not None:
        marker.relayed = True


def own_answer_headers(*, https: bool) -> tuple[tuple[bytes, bytes], ...]:
    """The headers for a JSON error or a redirect the proxy renders itself on a proxied path.

    The proxy's fast path (``GatewayApp.__call__``, see ``proxy_endpoint.ProxyFastPath``) runs
    outside this middleware, so the proxy adds them to its own answers; through the middleware
    they are already present and not added twice."""
    return _ALWAYS + (_CSP,) + ((_HSTS,) if https else ())


def is_owned_path(path: str) -> bool:
    return path in OWNED_PATHS or path.startswith(OWNED_PREFIXES)


class SecurityHeadersMiddleware:
    """Pure ASGI: adds the headers to ``http.response.start`` of gateway-owned responses."""

    def __init__(self, app: ASGIApp, *, https: bool = False) -> None:
        self.app = app
        self._https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        owned = is_owned_path(path)
        marker = _Marker()
        token = _current.set(marker)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and not marker.relayed:
                headers = list(message.get("headers", []))
                if owned or _is_gateway_rendered(message["status"], headers):
                    message = {**message, "headers": self._add(headers, no_store=owned)}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _current.reset(token)

    def _add(
        self, headers: list[tuple[bytes, bytes]], *, no_store: bool
    ) -> list[tuple[bytes, bytes]]:
        present = {name.lower() for name, _ in headers}
        extra = [h for h in _ALWAYS if h[0] not in present]
        if _content_type(headers) != b"text/html" and _CSP[0] not in present:
            extra.append(_CSP)
        if no_store:
            # /auth answers carry login state and user data, health answers must be live:
            # never from a cache.
            headers = [(n, v) for n, v in headers if n.lower() != b"cache-control"]
            extra.append(_NO_STORE)
        if self._https and _HSTS[0] not in present:
            extra.append(_HSTS)
        return headers + extra


def _content_type(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";")[0].strip().lower()
    return None


def _is_gateway_rendered(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """On a proxied path, what the gateway answered itself: a JSON error or a redirect (to
    login). Other non-relayed answers, such as static files, keep their own headers."""
    return 300 <= status < 400 or _content_type(headers) == b"application/json"
