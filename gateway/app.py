"""The composition root: ``create_app(settings) -> Starlette``.

Everything long-lived (IdP client, session store, token broker, upstream pool) hangs off one
``Gateway`` object built here; there are no module globals. The objects that need a running
event loop start on the lifespan, or on the first request when the app is mounted inside
another app (Starlette does not run a mounted app's lifespan).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .access_log import AccessLog, AccessLogMiddleware
from .auth_routes import AuthEndpoints
from .connections import ConnectionRegistry
from .crypto import SessionCipher
from .errors import (
    GatewayError,
    IdentityProviderUnavailable,
    handle_gateway_error,
    handle_unexpected_error,
)
from .forward_auth import ForwardAuthEndpoint
from .metrics import GatewayMetrics
from .observability import CONTEXT_KEY, RequestContext
from .oidc import OIDCClient
from .proxy import AiohttpUpstreamClient, UpstreamClient
from .proxy_endpoint import ProxyEndpoint, ProxyFastPath
from .routing import RouteTable
from .security_headers import SecurityHeadersMiddleware
from .sessions import MemorySessionStore, SessionStore
from .sessions.events import create_session_events
from .sessions.manager import SessionManager
from .settings import Settings
from .static import StaticSite
from .tokens import TokenBroker
from .websocket import WebSocketRelay

logger = logging.getLogger("gateway")

_START_RETRY_SECONDS = 3  # a failed start (IdP unreachable) is retried this long afterwards


def create_store(settings: Settings, cipher: SessionCipher) -> SessionStore:
    """The configured session store."""
    if settings.session.store == "redis":
        from .sessions.redis import RedisSessionStore

        return RedisSessionStore.from_settings(settings)
    return MemorySessionStore(idle_timeout=settings.session.idle_timeout)


class Gateway:
    """All long-lived parts of one gateway, wired together."""

    def __init__(self, settings: Settings, *, upstream: UpstreamClient | None = None) -> None:
        self.settings = settings
        self.routes = RouteTable(settings.routes)
        keys = [k.get_secret_value() for k in settings.session.secret_key]
        if not keys:
            logger.warning(
                "session.secret_key is not set: using a random key, sessions end on restart"
            )
            keys = [secrets.token_urlsafe(48)]
        self.cipher = SessionCipher(keys)
        # Keys the access log's user hash (observability.user_for_log).
        self.log_user_key = hashlib.sha256(
            b"mrrt-gateway access-log user v1" + keys[0].encode()
        ).digest()
        self.store = create_store(settings, self.cipher)
        self.sessions = SessionManager(settings, self.store, self.cipher)
        self.idp_http = httpx.AsyncClient(
            timeout=settings.oidc.http_timeout,
            follow_redirects=False,
            headers={"User-Agent": "mrrt-gateway"},
        )
        self.metrics = GatewayMetrics.from_settings(settings)
        self.metrics.track_sessions(self.store)
        self.metrics_port: int | None = None  # bound port of metrics.port's listener
        # Open WebSockets and streams per session; session ends reach other instances too.
        self.connections = ConnectionRegistry()
        self.connections.export(self.metrics.registry)
        self.session_events = create_session_events(settings)
        self.oidc = OIDCClient(settings, self.idp_http, observe=self.metrics.observe_idp)
        self.broker = TokenBroker(
            oidc=self.oidc,
            store=self.store,
            settings=settings.tokens,
            metrics=self.metrics,
            on_session_ended=self.end_session,
        )
        self.upstream: UpstreamClient = upstream or AiohttpUpstreamClient.from_settings(
            settings.upstream_pool
        )
        self.websockets = WebSocketRelay(self)
        self.login_url = settings.public_url + "/auth/login"
        self.post_logout_redirect_url = (
            settings.oidc.post_logout_redirect_url or settings.public_url + "/"
        )
        public = urlsplit(settings.public_url)
        self.public_scheme = public.scheme
        self.public_host = public.netloc
        self.csrf_header = settings.csrf.header.lower().encode()
        self.csrf_value = settings.csrf.value
        self.allowed_origins = tuple(settings.allowed_origins)
        self.started = False  # discovery and JWKS fetched (ensure_started)
        self._start_lock = asyncio.Lock()
        self._start_failure: tuple[float, GatewayError | None] = (0.0, None)

    async def ensure_started(self, *, fresh: bool = False) -> None:
        """Fetch discovery and JWKS once.

        A failure is remembered for a few seconds: requests queued behind a failing attempt
        answer 503 at once instead of each retrying an unreachable IdP in turn. ``fresh``
        (readiness probes) always tries again.
        """
        if self.started:
            return
        async with self._start_lock:
            if self.started:
                return
            failed_at, failure = self._start_failure
            recent = time.monotonic() - failed_at < _START_RETRY_SECONDS
            if failure is not None and recent and not fresh:
                if isinstance(failure, IdentityProviderUnavailable):
                    raise IdentityProviderUnavailable(
                        failure.message, retry_after=_START_RETRY_SECONDS
                    )
                raise type(failure)(failure.message)
            try:
                await self.session_events.start(self.connections.close_session)
                await self.oidc.metadata()
                await self.oidc.refresh_jwks()
            except GatewayError as exc:
                self._start_failure = (time.monotonic(), exc)
                raise
            self.started = True

    async def startup(self) -> None:
        self.metrics_port = self.metrics.start_listener(self.settings.metrics)
        try:
            await self.ensure_started()
        except GatewayError as exc:
            # Start anyway: /readyz reports it and the first request retries.
            logger.warning("identity provider not reachable at startup: %s", exc.message)

    async def shutdown(self) -> None:
        """Close everything, each step on its own: one failing close must not leak the rest."""
        self.connections.close_all()
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("metrics listener", lambda: asyncio.to_thread(self.metrics.stop_listener)),
            ("session events", self.session_events.close),
            ("websockets", self.websockets.close),
            ("upstream client", self.upstream.close),
            ("IdP client", self.idp_http.aclose),
            ("session store", self.store.close),
        ]
        for name, close in steps:
            try:
                await close()
            except Exception as exc:  # shutdown goes on whatever failed
                logger.warning("closing the %s failed: %s", name, type(exc).__name__)

    async def end_session(self, session_id: str, *, revoke: bool = False) -> Any:
        """Delete a session and its cached tokens; optionally revoke its refresh token."""
        session = await self.store.delete(session_id)
        self.broker.forget(session_id)
        await self.session_ended(session_id)
        if session is not None and revoke:
            await self.oidc.revoke(session.refresh_token)
        return session

    async def session_ended(self, session_id: str) -> None:
        """Close the session's open WebSockets (4401) and streams here and, through the
        session events, on every other instance."""
        self.connections.close_session(session_id)
        await self.session_events.publish(session_id)


class GatewayApp(Starlette):
    """Starlette, except that proxied HTTP requests go straight to ``fast_path`` (when set):
    past the error middleware, the gateway's middlewares and the router (see ProxyFastPath)."""

    fast_path: ProxyFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast_path = self.fast_path
        if fast_path is None or not fast_path.claims(scope):
            await super().__call__(scope, receive, send)
            return
        # The fast path's way in, written out here rather than in a coroutine of its own: every
        # resumption of a proxied request passes one coroutine fewer (~1.4 k instructions per
        # request, benchmarks/README.md).
        started = time.perf_counter()
        # No request id yet: handle takes it from its one pass over the headers (failed, for a
        # request refused before that pass), and binds it to the log context.
        context = scope[CONTEXT_KEY] = RequestContext("")
        endpoint = fast_path.endpoint
        try:  # ProxyEndpoint.serve, written out (one coroutine fewer)
            await endpoint.handle(scope, receive, send, context)
        except Exception as exc:
            await endpoint.failed(exc, scope, receive, send, context)
        finally:
            fast_path.finish(scope["method"], context, started)


def create_app(settings: Settings, *, upstream: UpstreamClient | None = None) -> Starlette:
    """The gateway as an ASGI app (standalone, or mounted with ``app.mount("/", ...)``)."""
    gateway = Gateway(settings, upstream=upstream)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            await gateway.ensure_started(fresh=True)
            checks["idp"] = "ok"
        except GatewayError as exc:
            checks["idp"] = exc.error
        try:
            await gateway.store.ping()
            checks["store"] = "ok"
        except GatewayError as exc:
            checks["store"] = exc.error
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await gateway.startup()
        try:
            yield {"gateway": gateway}
        finally:
            await gateway.shutdown()

    proxy = ProxyEndpoint(gateway)
    catch_all: ASGIApp = proxy
    if settings.static is not None:
        # Static files sit in front of the proxy; a longer route prefix still wins.
        catch_all = StaticSite(settings.static, gateway.routes, fallback=catch_all)
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", gateway.metrics.endpoint(settings.metrics), methods=["GET"]),
        *AuthEndpoints(gateway).routes(),
        *(ForwardAuthEndpoint(gateway).routes() if settings.forward_auth.enabled else []),
        Mount("/", app=catch_all),
    ]
    app = GatewayApp(
        routes=routes,
        # Outermost first. AccessLogMiddleware: request id in/out, metrics, access log.
        middleware=[
            Middleware(
                AccessLogMiddleware,
                metrics=gateway.metrics,
                settings=settings.log,
                user_key=gateway.log_user_key,
            ),
            # nosniff, no-referrer, DENY framing, CSP, no-store on /auth: gateway answers only.
            Middleware(SecurityHeadersMiddleware, https=settings.is_https),
        ],
        exception_handlers={GatewayError: handle_gateway_error, Exception: handle_unexpected_error},
        lifespan=lifespan,
    )
    # A path no route pattern matches (Mount's regex stops at a line break) goes to the
    # catch-all too, which answers it in JSON (invalid_path) instead of Starlette's plain 404.
    app.router.default = catch_all
    if settings.static is None:
        # A static site keeps the router: it relies on the exception middleware for
        # StaticFiles' HTTP errors.
        access = AccessLog(
            metrics=gateway.metrics, settings=settings.log, user_key=gateway.log_user_key
        )
        app.fast_path = ProxyFastPath(proxy, access=access, routes=routes)
    app.state.gateway = gateway
    return app
