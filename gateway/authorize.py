"""The one per-route authorization policy: session -> CSRF -> token.

The proxy, forward-auth and the WebSocket handshake each read a request their own way (an ASGI
scope, a data plane's subrequest, an upgrade), then ask :meth:`Authorizer.authorize` whether
it may pass and with which bearer token. None of them keeps a copy of any step.

* A route without a token (``auth: none``) needs nothing, not even the IdP: it keeps working
  while the IdP is down. (A WebSocket upgrade still has to come from an allowed origin when it
  names one.)
* A token route needs the IdP's metadata (started on first need), a live session from the
  session cookie, the anti-CSRF proof unless the route opts out (the header plus Origin and
  Sec-Fetch-Site on HTTP; the Origin on a WebSocket upgrade, where a page cannot set a header),
  then the route's access token from the broker (cached, or one exchange per session).
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import LoginRequired
from .routing import Route
from .security import check_csrf, check_websocket_origin
from .services import Services
from .sessions.base import Session
from .sessions.manager import SessionManager
from .tokens import TokenBroker

COOKIE = b"cookie"
ORIGIN = b"origin"
SEC_FETCH_SITE = b"sec-fetch-site"


# What the policy allowed: the session (None on a public route) and the bearer token for the
# route's audience (None on a public route). A plain pair: it is built on every proxied request.
Grant = tuple[Session | None, str | None]
PUBLIC: Grant = (None, None)


class Authorizer:
    """Decides, for a route and a request, whether it may pass and with which token."""

    def __init__(
        self,
        *,
        services: Services,
        sessions: SessionManager,
        broker: TokenBroker,
        csrf_header: str,
        csrf_value: str,
        allowed_origins: list[str],
    ) -> None:
        self._services = services
        self._sessions = sessions
        self._broker = broker
        self.csrf_header = csrf_header.lower().encode()
        self._csrf_value = csrf_value
        self._allowed_origins = tuple(allowed_origins)
        # The request headers the policy reads: callers collect them in their own header pass.
        self.wanted = frozenset({COOKIE, ORIGIN, SEC_FETCH_SITE, self.csrf_header})

    @classmethod
    def from_services(cls, services: Services) -> Authorizer:
        """The policy of ``services``' settings, on its sessions and token broker."""
        settings = services.settings
        return cls(
            services=services,
            sessions=services.sessions,
            broker=services.broker,
            csrf_header=settings.csrf.header,
            csrf_value=settings.csrf.value,
            allowed_origins=settings.allowed_origins,
        )

    async def authorize(
        self,
        route: Route,
        method: str,
        headers: Mapping[bytes, str],
        *,
        login_url: str,
        websocket: bool = False,
    ) -> Grant:
        """The grant for ``route``, or raise what the client is to be answered.

        ``headers``: at least the (lower-case) names in :attr:`wanted`, each Cookie field
        joined into one value; ``login_url``: where a 401 sends the user (each entry knows
        where the user should come back to); ``websocket``: the request is an upgrade.
        """
        if not route.needs_token:
            if websocket:
                check_websocket_origin(headers.get(ORIGIN), self._allowed_origins, required=False)
            return PUBLIC
        services = self._services
        if not services.started:  # only token routes need the IdP
            await services.ensure_started()
        session = await self._sessions.current(headers.get(COOKIE))
        if session is None:
            raise LoginRequired("no valid session", login_url=login_url)
        if websocket:
            check_websocket_origin(headers.get(ORIGIN), self._allowed_origins, required=True)
        elif route.csrf:
            check_csrf(
                method=method,
                header_value=headers.get(self.csrf_header),
                expected_value=self._csrf_value,
                origin=headers.get(ORIGIN),
                sec_fetch_site=headers.get(SEC_FETCH_SITE),
                allowed_origins=self._allowed_origins,
            )
        broker = self._broker
        # A cache hit needs no coroutine: the proxy's hot path awaits nothing for it.
        token = broker.cached_token(session.id, route) or await broker.access_token(session, route)
        return session, token
