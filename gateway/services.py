"""The gateway's long-lived services, built once per app and started on first need.

``create_app`` builds one :class:`Services` and hands each endpoint the parts it uses; nothing
here knows about ASGI. The parts that need a running event loop or the IdP (discovery, JWKS,
the session-event listener) start on the lifespan, or on the first request that needs them when
the app is mounted inside another app (Starlette does not run a mounted app's lifespan).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

from . import own_paths
from .client_tokens import ClientTokenBroker
from .connections import ConnectionRegistry
from .crypto import SessionCipher
from .dpop import DPoP
from .errors import GatewayError, IdentityProviderUnavailable
from .idp_back_off import IdpBackOff
from .metrics import GatewayMetrics
from .observability import user_for_log
from .oidc import OIDCClient
from .proxy import AiohttpUpstreamClient, UpstreamClient
from .routing import RouteTable
from .session_admin import SessionAdmin
from .sessions import MemorySessionStore, SessionStore
from .sessions.base import Session
from .sessions.events import create_session_events
from .sessions.manager import SessionManager
from .settings import Settings
from .tokens import TokenBroker
from .tracing import Tracing

logger = logging.getLogger("gateway")

_START_RETRY_SECONDS = 3  # a failed start (IdP unreachable) is retried this long afterwards

Closer = tuple[str, Callable[[], Awaitable[object]]]


def create_store(settings: Settings) -> SessionStore:
    """The configured session store."""
    if settings.session.store == "redis":
        from .sessions.redis import RedisSessionStore

        return RedisSessionStore.from_settings(settings)
    return MemorySessionStore.from_settings(settings)


class Services:
    """The long-lived parts of one gateway, wired together (no ASGI here)."""

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
        self.login_url = settings.public_url + own_paths.LOGIN
        self.post_logout_redirect_url = (
            settings.oidc.post_logout_redirect_url or settings.public_url + "/"
        )
        public = urlsplit(settings.public_url)
        self.public_scheme = public.scheme
        self.public_host = public.netloc
        # Tracing on: the store, the IdP client and the upstream client are traced wrappers
        # (tracing.py); off, they are the plain objects and nothing else changes.
        self.tracing = Tracing.from_settings(settings)
        plain_store = create_store(settings)
        self.store = self.tracing.store(plain_store) if self.tracing else plain_store
        self.sessions = SessionManager(settings, self.store, self.cipher)
        self.idp_http = httpx.AsyncClient(
            timeout=settings.oidc.http_timeout,
            follow_redirects=False,
            headers={"User-Agent": "mrrt-gateway"},
            transport=self.tracing.idp_transport() if self.tracing else None,
        )
        self.metrics = GatewayMetrics.from_settings(settings)
        self.metrics.track_sessions(plain_store)
        # Open WebSockets and streams per session; session ends reach other instances too.
        self.connections = ConnectionRegistry()
        self.connections.export(self.metrics.registry)
        self.session_events = create_session_events(settings)
        # DPoP keys and nonces (tokens.dpop); the client key derives from the first secret key.
        self.dpop = DPoP(settings.tokens.dpop, store=self.store, client_secret=keys[0])
        self.oidc = OIDCClient(
            settings, self.idp_http, observe=self.metrics.observe_idp, dpop=self.dpop
        )
        # One back-off for both brokers: they ask the same token endpoint.
        back_off = IdpBackOff()
        self.broker = TokenBroker(
            oidc=self.oidc,
            store=self.store,
            settings=settings.tokens,
            metrics=self.metrics,
            login_url=self.login_url,
            on_session_ended=self.end_session,
            dpop=self.dpop,
            tracing=self.tracing,
            back_off=back_off,
        )
        self.client_tokens = ClientTokenBroker(
            oidc=self.oidc,
            store=self.store,
            settings=settings.tokens,
            metrics=self.metrics,
            dpop=self.dpop,
            back_off=back_off,
        )
        self.session_admin = SessionAdmin(
            store=self.store,
            end_session=self.end_session,
            metrics=self.metrics,
            idle_timeout=settings.session.idle_timeout,
            max_per_user=settings.session.max_per_user,
            describe_user=lambda sub: user_for_log(sub, settings.log.user, self.log_user_key),
        )
        self.upstream: UpstreamClient = upstream or AiohttpUpstreamClient.from_settings(
            settings.upstream_pool
        )
        if self.tracing is not None:
            self.upstream = self.tracing.upstream(self.upstream)
        self.metrics_port: int | None = None  # bound port of metrics.port's listener
        self.started = False  # discovery and JWKS fetched (ensure_started)
        self._start_lock = asyncio.Lock()
        self._start_failure: tuple[float, GatewayError | None] = (0.0, None)
        self._closers: list[Closer] = []

    def reconfigure(self, settings: Settings) -> None:
        """Take a reloaded configuration (reload.py: its restart-only parts are the running
        ones): the new route table, and metric series for its routes and audiences."""
        self.settings = settings
        self.routes = RouteTable(settings.routes)
        self.metrics.bind_routes(
            [r.name for r in settings.routes], {r.audience for r in settings.routes if r.audience}
        )

    def close_on_shutdown(self, name: str, close: Callable[[], Awaitable[object]]) -> None:
        """Register an endpoint's own resource (the WebSocket client) for :meth:`shutdown`."""
        self._closers.append((name, close))

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
        """Start what can start (the lifespan's startup)."""
        self.metrics_port = self.metrics.start_listener(self.settings.metrics)
        try:
            await self.ensure_started()
        except GatewayError as exc:
            # Start anyway: /readyz reports it and the first request retries.
            logger.warning("identity provider not reachable at startup: %s", exc.message)

    async def shutdown(self) -> None:
        """Close everything, each step on its own: one failing close must not leak the rest."""
        self.connections.close_all()
        steps: list[Closer] = [
            ("metrics listener", lambda: asyncio.to_thread(self.metrics.stop_listener)),
            ("session events", self.session_events.close),
            *self._closers,
            ("upstream client", self.upstream.close),
            ("IdP client", self.idp_http.aclose),
            ("session store", self.store.close),
        ]
        if self.tracing is not None:
            steps.append(("trace exporter", self.tracing.shutdown))
        for name, close in steps:
            try:
                await close()
            except Exception as exc:  # shutdown goes on whatever failed
                logger.warning("closing the %s failed: %s", name, type(exc).__name__)

    async def end_session(self, session_id: str, *, revoke: bool = False) -> Session | None:
        """End a session the same way wherever it ends (logout, back-channel logout, a refresh
        token refused): delete it and its cached tokens, close its open WebSockets and streams
        here and, through the session events, on every other instance; optionally revoke its
        refresh token at the IdP."""
        session = await self.store.delete(session_id)
        self.broker.forget(session_id)
        self.connections.close_session(session_id)
        await self.session_events.publish(session_id)
        if session is not None and revoke:
            await self.oidc.revoke(session.refresh_token)
        return session
