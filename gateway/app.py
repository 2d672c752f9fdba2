"""The composition root: ``create_app(settings) -> Starlette``.

It builds the services (``services.py``), hands each endpoint the collaborators it uses, puts
the gateway's own endpoints at their paths (``own_paths``) and gives everything to the one
dispatcher (``dispatch.py``). Nothing else happens here; there are no module globals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette

from . import own_paths
from .access_log import AccessLog
from .auth_routes import AuthEndpoints
from .authorize import Authorizer
from .dispatch import Dispatcher, OwnRoute
from .forward_auth import ForwardAuthEndpoint
from .headers import forwarded_site
from .health import HealthEndpoints
from .proxy import UpstreamClient
from .proxy_endpoint import ProxyEndpoint
from .security_headers import own_answer_headers
from .services import Services
from .settings import Settings
from .static import StaticSite
from .websocket import WebSocketEndpoint


def create_app(settings: Settings, *, upstream: UpstreamClient | None = None) -> Starlette:
    """The gateway as an ASGI app (standalone, or mounted with ``app.mount("/", ...)``)."""
    services = Services(settings, upstream=upstream)
    authorizer = Authorizer.from_services(services)
    own_headers = own_answer_headers(https=settings.is_https)
    gateway_cookies = services.sessions.cookie_names_bytes
    proxy = ProxyEndpoint(
        routes=services.routes,
        authorizer=authorizer,
        upstream=services.upstream,
        connections=services.connections,
        gateway_cookies=gateway_cookies,
        limits=settings.limits,
        site=forwarded_site(services.public_scheme, services.public_host),
        login_url=services.login_url,
        own_headers=own_headers,
        on_retry=services.metrics.token_retried,
    )
    websockets = WebSocketEndpoint(
        routes=services.routes,
        authorizer=authorizer,
        connections=services.connections,
        gateway_cookies=gateway_cookies,
        max_header_bytes=settings.limits.max_header_bytes,
        public_scheme=services.public_scheme,
        public_host=services.public_host,
        login_url=services.login_url,
        token_skew=settings.tokens.skew,
        on_retry=services.metrics.token_retried,
    )
    services.close_on_shutdown("websockets", websockets.close)
    auth = AuthEndpoints(
        services, oidc=services.oidc, routes=services.routes, authorizer=authorizer
    )
    health = HealthEndpoints(services)
    own = {
        own_paths.LOGIN: OwnRoute.of(auth.login, "GET"),
        own_paths.CALLBACK: OwnRoute.of(auth.callback, "GET"),
        own_paths.LOGOUT: OwnRoute.of(auth.logout, "GET", "POST"),
        own_paths.ME: OwnRoute.of(auth.me, "GET"),
        own_paths.BACKCHANNEL_LOGOUT: OwnRoute.of(auth.backchannel_logout, "POST"),
        own_paths.HEALTH: OwnRoute.of(health.healthz, "GET"),
        own_paths.READY: OwnRoute.of(health.readyz, "GET"),
        own_paths.METRICS: OwnRoute.of(services.metrics.endpoint(settings.metrics), "GET"),
    }
    own_subtrees: dict[str, OwnRoute] = {}
    if settings.forward_auth.enabled:
        forward_auth = ForwardAuthEndpoint(
            settings.forward_auth,
            routes=services.routes,
            authorizer=authorizer,
            login_url=services.login_url,
        )
        # Any method: Envoy's ext_authz sends the original one.
        own[forward_auth.path] = own_subtrees[forward_auth.path] = OwnRoute(None, forward_auth)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await services.startup()
        try:
            yield {"services": services}
        finally:
            await services.shutdown()

    app = Dispatcher(
        own=own,
        own_subtrees=own_subtrees,
        static=(
            StaticSite(settings.static, services.routes) if settings.static is not None else None
        ),
        proxy=proxy,
        websockets=websockets,
        access=AccessLog(
            metrics=services.metrics, settings=settings.log, user_key=services.log_user_key
        ),
        https=settings.is_https,
        error_headers=own_headers,
        lifespan=lifespan,
    )
    app.state.services = services
    return app
