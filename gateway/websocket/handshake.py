"""WebSocket routes: the upgrade is checked and authorised before it is accepted, then relayed.

Handshake, in order, all before the browser's upgrade is accepted (a refusal is a plain HTTP
answer through the ASGI ``websocket.http.response`` extension when the server has it, as
uvicorn does; else a close before accept, code 4000 + status, which servers send as a 403):

1. a route with ``websocket: true`` matches (else 404);
2. the one authorization policy (``authorize.py``): on a token route the session from the
   cookie (401 ``login_required``), the Origin as the anti-CSRF proof (403: a page cannot set
   the anti-CSRF header on a WebSocket, and without the check any site could open the user's
   socket: cross-site WebSocket hijacking), then the route's token (401/403/503);
3. the upstream upgrade with ``Authorization: Bearer`` (or ``DPoP`` and a proof), the browser's
   subprotocols and the usual forwarded headers (502/504); the browser is accepted with the
   subprotocol it chose.

The relay (``relay.py``) carries text, binary and close frames both ways, close
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
from collections.abc import Callable

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from ..authorize import Authorizer
from ..challenge import bearer_challenge
from ..connections import GOING_AWAY, ConnectionRegistry
from ..dpop import DPoPBound, server_of
from ..errors import (
    GatewayError,
    HeadersTooLarge,
    LoginRequired,
    NotFound,
    StepUpRequired,
    UpstreamError,
    as_gateway_error,
    render_error,
)
from ..headers import build_upstream_headers, read_headers
from ..observability import incoming_request_id, new_request_id
from ..own_paths import is_owned_path
from ..proxy import map_upstream_error
from ..routing import RouteTable, normalize_path
from .relay import Clock, LoopClock, Upgrade, WebSocketConnection

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


class TokenRefused(UpstreamError):
    """The upstream refused the upgrade's token with ``invalid_token`` (RFC 6750 §3.1)."""


class _NonceRequired(UpstreamError):
    """The upstream asked for a DPoP proof with its nonce (RFC 9449 §9)."""


def _no_count(route: str) -> None:
    return None


class WebSocketEndpoint:
    """The gateway's WebSocket entry: handshake, then a :class:`WebSocketConnection`."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        authorizer: Authorizer,
        connections: ConnectionRegistry,
        gateway_cookies: frozenset[bytes],
        max_header_bytes: int,
        public_scheme: str,
        public_host: str,
        login_url: str,
        token_skew: float,
        clock: Clock | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._routes = routes
        self._authorizer = authorizer
        self._connections = connections
        self._gateway_cookies = gateway_cookies
        self._max_header_bytes = max_header_bytes
        self._public_scheme = public_scheme
        self._public_host = public_host
        self._login_url = login_url
        self._token_skew = token_skew
        self._clock = clock or LoopClock()
        self._on_retry = on_retry or _no_count  # counts an upgrade retried with a new token
        self._session: aiohttp.ClientSession | None = None
        self._relayed: dict[WebSocketConnection, str] = {}  # relayed now -> its route's name
        self.opened = 0  # counters (observability, tests)
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send, raw_path: str) -> None:
        """Answer one upgrade; ``raw_path``: the path as sent, below the mount point."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        route_name = "unmatched"
        try:
            upgrade = await self._check(scope, raw_path)
            route_name = upgrade.route.name
            token = await self.token_for(upgrade)
            try:
                upstream = await self.connect(upgrade, token, upgrade.subprotocols)
            except TokenRefused:
                # The upstream refused a token that died early: one more upgrade, with a new
                # token (as the proxy sends a request once more).
                assert token is not None
                self._on_retry(route_name)
                token = await self._authorizer.renewed_token(upgrade.route, upgrade.session, token)
                upstream = await self.connect(upgrade, token, upgrade.subprotocols)
        except GatewayError as exc:
            self.refused += 1
            await _refuse(scope, send, as_gateway_error(exc, route_name))
            return
        self.opened += 1
        connection = WebSocketConnection(
            self,
            upgrade,
            upstream,
            token,
            receive,
            send,
            registry=self._connections,
            skew=self._token_skew,
            clock=self._clock,
        )
        self._relayed[connection] = route_name
        try:
            await connection.run()
        finally:
            self._relayed.pop(connection, None)

    def reconfigure(
        self, *, routes: RouteTable, authorizer: Authorizer, max_header_bytes: int
    ) -> int:
        """Take a reloaded route table (reload.py): new upgrades use it; a relayed WebSocket
        whose route is gone, or no longer takes WebSockets, closes with 1001 Going Away (the
        others stay open on the route they were opened with). Returns how many closed."""
        self._routes = routes
        self._authorizer = authorizer
        self._max_header_bytes = max_header_bytes
        kept = {r.name for r in routes if r.settings.websocket}
        closing = [c for c, name in self._relayed.items() if name not in kept]
        for connection in closing:
            connection.end(GOING_AWAY, "route removed")
        return len(closing)

    async def _check(self, scope: Scope, raw_path: str) -> Upgrade:
        if sum(len(k) + len(v) for k, v in scope["headers"]) > self._max_header_bytes:
            raise HeadersTooLarge("the request headers are too large")
        path = normalize_path(raw_path)
        route = self._routes.match(path)
        if route is None or not route.settings.websocket or is_owned_path(path):
            raise NotFound("no WebSocket route matches this path")
        query = scope.get("query_string", b"").decode("latin-1")
        url = route.upstream_url(path, query)
        url = "ws" + url[4:] if url.startswith("http") else url  # http(s):// -> ws(s)://
        headers = build_upstream_headers(
            [(k, v) for k, v in scope["headers"] if k not in _HANDSHAKE_HEADERS],
            gateway_cookies=self._gateway_cookies,
            client_ip=(scope.get("client") or ("unknown", 0))[0],
            proto=self._public_scheme,
            host=self._public_host,
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
            session=None,
            policy_headers=read_headers(scope["headers"], self._authorizer.wanted),
        )

    async def token_for(self, upgrade: Upgrade, *, fresh_session: bool = False) -> str | None:
        """The authorization policy's token for the upgrade (None on a public route).

        ``fresh_session``: a reconnect runs the policy again (the session may have ended or
        rotated since the upgrade) and must find the same session.
        """
        session, token = await self._authorizer.authorize(
            upgrade.route,
            "GET",
            upgrade.policy_headers,
            login_url=self._login_url,
            websocket=True,
        )
        if fresh_session and upgrade.session is not None:
            if session is None or session.id != upgrade.session.id:
                raise LoginRequired("the session has ended", login_url=self._login_url)
        upgrade.session = session
        return token

    async def connect(
        self, upgrade: Upgrade, token: str | None, subprotocols: list[str]
    ) -> aiohttp.ClientWebSocketResponse:
        """Open the upstream WebSocket (bounded by the route's timeout); an upstream's
        ``use_dpop_nonce`` (RFC 9449 §9) is answered with one more upgrade carrying it."""
        try:
            return await self._open(upgrade, token, subprotocols)
        except _NonceRequired:
            self._on_retry(upgrade.route.name)
            return await self._open(upgrade, token, subprotocols, nonce_retry=True)

    async def _open(
        self,
        upgrade: Upgrade,
        token: str | None,
        subprotocols: list[str],
        *,
        nonce_retry: bool = False,
    ) -> aiohttp.ClientWebSocketResponse:
        route = upgrade.route
        headers = list(upgrade.headers)
        bound = type(token) is DPoPBound
        server = server_of(upgrade.url)
        if token is not None:
            # The proof's htu is the upgrade's HTTP URL (the opening handshake is an HTTP GET).
            url = "http" + upgrade.url[2:] if upgrade.url.startswith("ws") else upgrade.url
            proof = await self._authorizer.dpop_proof(upgrade.session, token, "GET", url, server)
            if proof is not None:
                headers += [("authorization", f"DPoP {token}"), ("dpop", proof)]
            else:
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
            if exc.status == 401 and token is not None:
                found = exc.headers.getall("WWW-Authenticate", []) if exc.headers else []
                challenge = bearer_challenge(found, "dpop" if bound else "bearer")
                # Its DPoP-Nonce is remembered already (_remember_nonce, as on every answer).
                if bound and challenge is not None and challenge.use_dpop_nonce:
                    if not nonce_retry:
                        raise _NonceRequired(route.name) from None
                if challenge is not None and challenge.step_up and upgrade.session is not None:
                    raise StepUpRequired(
                        f"the upstream of route {route.name} asks for a stronger or more "
                        "recent login",
                        login_url=self._login_url,
                        acr_values=challenge.acr_values,
                        max_age=challenge.max_age,
                    ) from None
                if challenge is not None and challenge.invalid_token:
                    raise TokenRefused(
                        f"upstream of route {route.name} refused the token (invalid_token)"
                    ) from None
            raise UpstreamError(
                f"upstream of route {route.name} refused the WebSocket upgrade ({exc.status})"
            ) from None
        except Exception as exc:
            raise map_upstream_error(exc, route.name) from exc

    def _client(self) -> aiohttp.ClientSession:
        # Its own session: upgraded connections are never pooled, and none of the proxy
        # session's settings (decompression, pool limits) apply.
        if self._session is None:
            traces = []
            if self._authorizer.dpop is not None:
                trace = aiohttp.TraceConfig()
                trace.on_request_end.append(self._remember_nonce)
                traces.append(trace)
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=None),
                trace_configs=traces,
            )
        return self._session

    async def _remember_nonce(
        self,
        _session: aiohttp.ClientSession,
        _context: object,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        """The upgrade answer's ``DPoP-Nonce``, a 101's included (RFC 9449 §8.2: a server may
        hand out its next nonce on any answer), replaces the one held for the upstream."""
        dpop = self._authorizer.dpop
        nonce = params.response.headers.get("DPoP-Nonce")
        if dpop is not None and nonce is not None:
            await dpop.nonces.remember(server_of(str(params.url)), nonce)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _refuse(scope: Scope, send: Send, exc: GatewayError) -> None:
    """Answer the upgrade with the gateway's JSON error, before accepting it."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        response = render_error(exc)
        start = {"status": response.status_code, "headers": response.raw_headers}
        await send({"type": "websocket.http.response.start", **start})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 4000 + exc.status_code, "reason": exc.error})
