"""The composition root: ``create_app(settings) -> Starlette``.

Everything long-lived (IdP client, session store, token broker, upstream pool) hangs off one
``Gateway`` object built here; there are no module globals. The objects that need a running
event loop start on the lifespan, or on the first request when the app is mounted inside
another app (Starlette does not run a mounted app's lifespan).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from .auth_routes import AuthEndpoints
from .crypto import SessionCipher
from .errors import GatewayError, handle_gateway_error, handle_unexpected_error
from .oidc import OIDCClient
from .proxy import AiohttpUpstreamClient, UpstreamClient
from .proxy_endpoint import ProxyEndpoint
from .routing import RouteTable
from .sessions import MemorySessionStore, SessionStore
from .sessions.manager import SessionManager
from .settings import Settings
from .tokens import TokenBroker

logger = logging.getLogger("gateway")


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
        self.store = create_store(settings, self.cipher)
        self.sessions = SessionManager(settings, self.store, self.cipher)
        self.idp_http = httpx.AsyncClient(
            timeout=settings.oidc.http_timeout,
            follow_redirects=False,
            headers={"User-Agent": "mrrt-gateway"},
        )
        self.oidc = OIDCClient(settings, self.idp_http)
        self.broker = TokenBroker(oidc=self.oidc, store=self.store, settings=settings.tokens)
        self.upstream: UpstreamClient = upstream or AiohttpUpstreamClient()
        self.login_url = settings.public_url + "/auth/login"
        self.post_logout_redirect_url = (
            settings.oidc.post_logout_redirect_url or settings.public_url + "/"
        )
        public = urlsplit(settings.public_url)
        self.public_scheme = public.scheme
        self.public_host = public.netloc
        self.csrf_header = settings.csrf.header.lower().encode()
        self._started = False
        self._start_lock = asyncio.Lock()

    async def ensure_started(self) -> None:
        """Fetch discovery and JWKS once; a failure is retried on the next request."""
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self.oidc.metadata()
                await self.oidc.refresh_jwks()
                self._started = True

    async def startup(self) -> None:
        try:
            await self.ensure_started()
        except GatewayError as exc:
            # Start anyway: /readyz reports it and the first request retries.
            logger.warning("identity provider not reachable at startup: %s", exc.message)

    async def shutdown(self) -> None:
        await self.upstream.close()
        await self.idp_http.aclose()
        await self.store.close()

    async def end_session(self, session_id: str, *, revoke: bool = False) -> Any:
        """Delete a session and its cached tokens; optionally revoke its refresh token."""
        session = await self.store.delete(session_id)
        self.broker.forget(session_id)
        if session is not None and revoke:
            await self.oidc.revoke(session.refresh_token)
        return session


def create_app(settings: Settings, *, upstream: UpstreamClient | None = None) -> Starlette:
    """The gateway as an ASGI app (standalone, or mounted with ``app.mount("/", ...)``)."""
    gateway = Gateway(settings, upstream=upstream)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            await gateway.ensure_started()
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

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *AuthEndpoints(gateway).routes(),
        Mount("/", app=ProxyEndpoint(gateway)),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={GatewayError: handle_gateway_error, Exception: handle_unexpected_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
