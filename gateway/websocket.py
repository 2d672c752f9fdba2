"""WebSocket routes: the upgrade is checked and authorised before it is accepted, then relayed.

Handshake, in order, all before the browser's upgrade is accepted (a refusal is a plain HTTP
answer through the ASGI ``websocket.http.response`` extension when the server has it, as
uvicorn does; else a close before accept, code 4000 + status, which servers send as a 403):

1. a route with ``websocket: true`` matches (else 404);
2. ``Origin`` is one of the allowed origins (403). Browsers send cookies on cross-site
   upgrades and WebSockets have no CORS, so without this check any site could open the user's
   socket (cross-site WebSocket hijacking). The anti-CSRF header cannot be set on a browser
   WebSocket, so the Origin check is the defence; it is required on token routes;
3. the session from the cookie (401 ``login_required``), then the route's token (401/403/503);
4. the upstream upgrade with ``Authorization: Bearer``, the browser's subprotocols and the
   usual forwarded headers (502/504); the browser is accepted with the subprotocol it chose.

The relay (``websocket_connection.py``) carries text, binary and close frames both ways, close
codes and reasons as sent. ASGI has no ping frames, so pings are per hop, never relayed: the
ASGI server answers the browser's and sends its own (uvicorn ``ws_ping_interval``); aiohttp
answers the upstream's and sends its own (``HEARTBEAT``).

Client library, by measurement (echo over loopback, 5 runs, medians, uvicorn echo server in
another process, same machine): aiohttp's client beat ``websockets`` 17.4 in every case:
32 B ping-pong 7,992 vs 6,439 msg/s (74 vs 104 us client CPU per message), 32 B pipelined
38,648 vs 31,850 msg/s (19 vs 31 us), 64 KiB ping-pong 3,673 vs 3,110 msg/s, 64 KiB pipelined
5,483 vs 4,786 msg/s (79 vs 119 us). aiohttp is also already the upstream HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from .errors import (
    CSRFCheckFailed,
    GatewayError,
    HeadersTooLarge,
    LoginRequired,
    NotFound,
    UpstreamError,
    render_error,
)
from .headers import build_upstream_headers, first_header
from .observability import incoming_request_id, new_request_id
from .proxy import map_upstream_error
from .routing import Route, normalize_path
from .websocket_connection import WebSocketConnection

if TYPE_CHECKING:
    from .app import Gateway
    from .sessions.base import Session

logger = logging.getLogger("gateway.websocket")

HEARTBEAT = 30.0  # seconds between aiohttp's pings to the upstream (pong due within half)
CLOSE_TIMEOUT = 5.0  # for a close handshake with either side
_HANDSHAKE_HEADERS = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)


def is_origin_allowed(origin: str | None, allowed: list[str], *, required: bool) -> bool:
    """Browsers always send ``Origin`` on a WebSocket upgrade (RFC 6455 §4.1); a request without
    one is not from a browser page, and is refused where the session cookie would be used."""
    if origin is None:
        return not required
    return origin != "null" and origin in allowed


@dataclass(slots=True)
class Upgrade:
    """What a checked upgrade needs to open (and later reopen) its upstream connection."""

    route: Route
    url: str
    headers: list[tuple[str, str]]  # without Authorization
    subprotocols: list[str]
    session: Session | None
    cookie: str | None

    def __repr__(self) -> str:
        return f"Upgrade(route={self.route.name!r})"


class WebSocketRelay:
    """The gateway's WebSocket endpoint: handshake, then a :class:`WebSocketConnection`."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._session: aiohttp.ClientSession | None = None
        self.opened = 0  # counters (observability, tests)
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        try:
            upgrade = await self._check(scope)
            token = await self.token_for(upgrade)
            upstream = await self.connect(upgrade, token, upgrade.subprotocols)
        except GatewayError as exc:
            self.refused += 1
            await _refuse(scope, send, exc)
            return
        self.opened += 1
        connection = WebSocketConnection(self, upgrade, upstream, token, receive, send)
        await connection.run()

    async def _check(self, scope: Scope) -> Upgrade:
        gw = self._gw
        await gw.ensure_started()
        if sum(len(k) + len(v) for k, v in scope["headers"]) > gw.settings.limits.max_header_bytes:
            raise HeadersTooLarge("the request headers are too large")
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = normalize_path(raw_path.decode("latin-1"))
        route = gw.routes.match(path)
        if route is None or not route.settings.websocket:
            raise NotFound("no WebSocket route matches this path")
        origin = first_header(scope["headers"], b"origin")
        if not is_origin_allowed(origin, gw.settings.allowed_origins, required=route.needs_token):
            raise CSRFCheckFailed("WebSocket upgrade from an origin that is not allowed")
        cookie = first_header(scope["headers"], b"cookie")
        session = None
        if route.needs_token:
            session = await gw.sessions.current(cookie)
            if session is None:
                raise LoginRequired("no valid session", login_url=gw.login_url)
        query = scope.get("query_string", b"").decode("latin-1")
        url = route.upstream_url(path, query)
        url = "ws" + url[4:] if url.startswith("http") else url  # http(s):// -> ws(s)://
        headers = build_upstream_headers(
            [(k, v) for k, v in scope["headers"] if k not in _HANDSHAKE_HEADERS],
            gateway_cookies=gw.sessions.cookie_names_bytes,
            client_ip=(scope.get("client") or ("unknown", 0))[0],
            proto=gw.public_scheme,
            host=gw.public_host,
            bearer=None,
            forward_cookies=route.forward_cookies,
            forward_identity=route.forward_identity_headers,
            # As on HTTP: a valid X-Request-ID goes on, anything else gives way to a new one.
            request_id=incoming_request_id(scope["headers"]) or new_request_id(),
        )
        return Upgrade(
            route=route,
            url=url,
            headers=headers,
            subprotocols=list(scope.get("subprotocols") or ()),
            session=session,
            cookie=cookie,
        )

    async def token_for(self, upgrade: Upgrade, *, fresh_session: bool = False) -> str | None:
        """The route's access token (None on a public route); ``fresh_session`` reloads the
        session first (a reconnect: it may have ended or rotated since the upgrade)."""
        if upgrade.session is None:
            return None
        session = upgrade.session
        if fresh_session:
            current = await self._gw.sessions.current(upgrade.cookie)
            if current is None or current.id != session.id:
                raise LoginRequired("the session has ended", login_url=self._gw.login_url)
            session = upgrade.session = current
        return await self._gw.broker.access_token(session, upgrade.route)

    async def connect(
        self, upgrade: Upgrade, token: str | None, subprotocols: list[str]
    ) -> aiohttp.ClientWebSocketResponse:
        """Open the upstream WebSocket (bounded by the route's timeout)."""
        route = upgrade.route
        headers = list(upgrade.headers)
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        try:
            async with asyncio.timeout(route.timeout):
                return await self._client().ws_connect(
                    URL(upgrade.url, encoded=True),
                    protocols=subprotocols,
                    headers=headers,
                    autoclose=False,
                    autoping=True,
                    heartbeat=HEARTBEAT,
                    # aiohttp refuses a message of exactly max_msg_size bytes; the limit is
                    # the largest size allowed.
                    max_msg_size=route.settings.websocket_max_message_bytes + 1,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamError(
                f"upstream of route {route.name} refused the WebSocket upgrade ({exc.status})"
            ) from None
        except Exception as exc:
            raise map_upstream_error(exc, route.name) from exc

    @property
    def gateway(self) -> Gateway:
        return self._gw

    def _client(self) -> aiohttp.ClientSession:
        # Its own session: upgraded connections are never pooled, and none of the proxy
        # session's settings (decompression, pool limits) apply.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _refuse(scope: Scope, send: Send, exc: GatewayError) -> None:
    """Answer the upgrade with the gateway's JSON error, before accepting it."""
    if exc.status_code >= 500:
        logger.warning("websocket %s: %s", exc.error, exc.message)
    if "websocket.http.response" in (scope.get("extensions") or {}):
        response = render_error(exc)
        start = {"status": response.status_code, "headers": response.raw_headers}
        await send({"type": "websocket.http.response.start", **start})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 4000 + exc.status_code, "reason": exc.error})
