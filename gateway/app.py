"""The composition root: ``create_app(settings) -> Starlette``.

It builds the services (``services.py``), hands each endpoint the collaborators it uses, puts
the gateway's own endpoints at their paths (``own_paths``) and gives everything to the one
dispatcher (``dispatch.py``). Nothing else happens here; there are no module globals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette

from . import own_paths
from .access_log import AccessLog
from .admin import AdminEndpoint, AdminListener
from .auth_routes import AuthEndpoints
from .authorize import Authorizer
from .dispatch import Dispatcher, OwnRoute
from .forward_auth import ForwardAuthEndpoint
from .headers import forwarded_site
from .health import HealthEndpoints
from .proxy import UpstreamClient
from .proxy_endpoint import ProxyEndpoint
from .reload import Reloader
from .security_headers import own_answer_headers
from .services import Services
from .settings import Settings
from .static import StaticSite
from .traced_dispatch import TracedDispatcher
from .websocket import WebSocketEndpoint


@dataclass(frozen=True, slots=True)
class _Live:
    """What the endpoints build from one configuration (a reload builds it again)."""

    authorizer: Authorizer
    own: dict[str, OwnRoute]
    own_subtrees: dict[str, OwnRoute]
    static: StaticSite | None
    proxy: ProxyEndpoint
    access: AccessLog


def _compose(settings: Settings, services: Services) -> _Live:
    """The per-configuration part: the route table's endpoints and the gateway's own paths."""
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
    return _Live(
        authorizer=authorizer,
        own=own,
        own_subtrees=own_subtrees,
        static=(
            StaticSite(settings.static, services.routes) if settings.static is not None else None
        ),
        proxy=proxy,
        access=AccessLog(
            metrics=services.metrics, settings=settings.log, user_key=services.log_user_key
        ),
    )


def create_app(
    settings: Settings,
    *,
    upstream: UpstreamClient | None = None,
    settings_source: Callable[[], Settings] | None = None,
) -> Starlette:
    """The gateway as an ASGI app (standalone, or mounted with ``app.mount("/", ...)``).

    ``settings_source``: how to read the configuration again (``gateway run``: the file and the
    environment); with it, SIGHUP reloads (``reload.py``; also ``app.state.reloader.reload()``).
    """
    services = Services(settings, upstream=upstream)
    live = _compose(settings, services)
    websockets = WebSocketEndpoint(
        routes=services.routes,
        authorizer=live.authorizer,
        connections=services.connections,
        gateway_cookies=services.sessions.cookie_names_bytes,
        max_header_bytes=settings.limits.max_header_bytes,
        public_scheme=services.public_scheme,
        public_host=services.public_host,
        login_url=services.login_url,
        token_skew=settings.tokens.skew,
        on_retry=services.metrics.token_retried,
    )
    services.close_on_shutdown("websockets", websockets.close)
    admin: AdminListener | None = None
    if settings.admin.port is not None and settings.admin.token is not None:
        admin = AdminListener(
            AdminEndpoint(services.session_admin, token=settings.admin.token.get_secret_value()),
            settings.admin,
        )
        services.close_on_shutdown("admin listener", admin.close)

    def apply(new: Settings) -> None:
        services.reconfigure(new)
        fresh = _compose(new, services)
        websockets.reconfigure(
            routes=services.routes,
            authorizer=fresh.authorizer,
            max_header_bytes=new.limits.max_header_bytes,
        )
        app.reconfigure(
            own=fresh.own,
            own_subtrees=fresh.own_subtrees,
            static=fresh.static,
            proxy=fresh.proxy,
            access=fresh.access,
        )

    reloader = (
        Reloader(settings, source=settings_source, apply=apply, metrics=services.metrics)
        if settings_source is not None
        else None
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await services.startup()
        if admin is not None:
            await admin.start()
        on_signal = reloader is not None and reloader.install_signal_handler()
        try:
            yield {"services": services}
        finally:
            if on_signal and reloader is not None:
                reloader.remove_signal_handler()
            await services.shutdown()

    tracing = services.tracing
    app = (TracedDispatcher if tracing is not None else Dispatcher)(
        **({"tracing": tracing} if tracing is not None else {}),
        own=live.own,
        own_subtrees=live.own_subtrees,
        static=live.static,
        proxy=live.proxy,
        websockets=websockets,
        access=live.access,
        https=settings.is_https,
        error_headers=own_answer_headers(https=settings.is_https),
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.admin = admin
    app.state.reloader = reloader
    return app
