"""One relayed WebSocket: browser <-> gateway <-> upstream, until either side or the gateway
ends it.

Two pump tasks copy messages, one per direction, each awaiting every send (back-pressure: a
slow reader slows the writer, nothing is buffered without bound). The connection's own task
waits for either pump to finish or for its next deadline, then closes both sides.

Close codes the gateway chooses (every other code is the peer's, passed through):

* 4401 the session ended (logout, back-channel logout, refresh token refused), the session
  reached its absolute expiry, or, with ``websocket_token_expiry: close``, the access token
  the upstream connection was opened with expired;
* 4408 no message either way for ``websocket_idle_timeout``;
* 1001 ``websocket_max_lifetime`` reached, or the gateway shuts down;
* 1009 a message over ``websocket_max_message_bytes``;
* 1013 ``reconnect`` could not get a fresh token or connection in time;
* 1014 the upstream connection failed (RFC 6455 registry: Bad Gateway).

``websocket_token_expiry: reconnect`` opens a new upstream connection with a fresh token when
the broker would refresh the old one, swaps it in and closes the old one with 1000. State the
upstream kept for the old connection (subscriptions, a message in flight) is lost: use it for
stateless streams. With an opaque token (expiry unknown) ``close`` and ``reconnect`` act as
``keep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from starlette.types import Message, Receive, Send

from ..connections import GOING_AWAY, SESSION_ENDED, ConnectionRegistry
from ..errors import Forbidden, GatewayError, LoginRequired
from ..routing import Route
from ..sessions.base import Session
from ..tokens import unverified_claims

logger = logging.getLogger("gateway.websocket")

IDLE = 4408
TOO_BIG = 1009
TRY_AGAIN_LATER = 1013
BAD_GATEWAY = 1014
_RETRY = 1.0  # seconds between attempts to renew an upstream connection
_CLOSE_TIMEOUT = 5.0
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def sendable_code(code: object, fallback: int) -> int:
    """``code`` if a close frame may carry it (RFC 6455 §7.4), else ``fallback`` (1005, 1006
    and 1015 only describe a closure, they are never sent)."""
    if isinstance(code, int) and (code in _SENDABLE or 3000 <= code <= 4999):
        return code
    return fallback


def short_reason(reason: object) -> str:
    """A close reason fits in 123 bytes of UTF-8 (RFC 6455 §5.5)."""
    text = reason if isinstance(reason, str) else ""
    return text.encode()[:123].decode("utf-8", "ignore")


def token_times(token: str | None) -> tuple[float, float] | None:
    """``(iat, exp)`` of a JWT access token, unverified (the IdP gave it to us), else None."""
    claims = unverified_claims(token) if token is not None else None
    if claims is None:
        return None
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float):
        return None
    return (float(iat) if isinstance(iat, int | float) else 0.0), float(exp)


class Clock(Protocol):
    """The relay's time: deadlines (idle, lifetime, session and token expiry) are measured and
    waited for on it, so tests can move it instead of sleeping."""

    def now(self) -> float:
        """Monotonic seconds."""

    def wall(self) -> float:
        """Seconds since the epoch (session and token expiry are wall times)."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once :meth:`now` has reached ``deadline``."""


class LoopClock:
    """The running event loop's clock and the system's wall clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - self.now()))


@dataclass(slots=True)
class Upgrade:
    """What a checked upgrade needs to open (and later reopen) its upstream connection."""

    route: Route
    url: str
    headers: list[tuple[str, str]]  # without Authorization
    subprotocols: list[str]
    session: Session | None
    policy_headers: dict[bytes, str]  # what the authorization policy reads, for a reconnect

    def __repr__(self) -> str:
        return f"Upgrade(route={self.route.name!r})"


class UpstreamOpener(Protocol):
    """Opens upstream connections for an upgrade (the handshake endpoint)."""

    async def token_for(self, upgrade: Upgrade, *, fresh_session: bool = False) -> str | None:
        """The route's token; ``fresh_session``: authorize again (a reconnect)."""

    async def connect(
        self, upgrade: Upgrade, token: str | None, subprotocols: list[str]
    ) -> aiohttp.ClientWebSocketResponse: ...


@dataclass(frozen=True, slots=True)
class Closing:
    """How a relay ends: the close frame for each side, None for a side that is gone."""

    browser: tuple[int, str] | None
    upstream: tuple[int, str] | None


class WebSocketConnection:
    """A relayed WebSocket; registered with the session's connections while open."""

    kind = "websocket"

    def __init__(
        self,
        opener: UpstreamOpener,
        upgrade: Upgrade,
        upstream: aiohttp.ClientWebSocketResponse,
        token: str | None,
        receive: Receive,
        send: Send,
        *,
        registry: ConnectionRegistry,
        skew: float,
        clock: Clock,
    ) -> None:
        self._opener = opener
        self._registry = registry
        self._skew = skew  # the broker's refresh margin (reconnect when it would refresh)
        self._clock = clock
        self._upgrade = upgrade
        self._ws = upstream
        self._token = token
        self._receive = receive
        self._send = send
        settings = upgrade.route.settings
        self._policy = settings.websocket_token_expiry
        self._max_bytes = settings.websocket_max_message_bytes
        self._idle = settings.websocket_idle_timeout
        now = clock.now()
        self._last_activity = now
        self._lifetime_at = (
            now + settings.websocket_max_lifetime if settings.websocket_max_lifetime else None
        )
        session = upgrade.session
        self._session_id = session.id if session is not None else None
        self._session_at = self._at(session.absolute_expiry) if session is not None else None
        self._token_at: float | None = None
        self._token_exp: float | None = None
        self._plan_token(token)
        self._closing: Closing | None = None
        self._ending = False  # set synchronously by end(): nothing is relayed after it
        self._stop = asyncio.Event()
        self._from_browser: asyncio.Task[Closing] | None = None
        self._from_upstream: asyncio.Task[Closing] | None = None
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"WebSocketConnection(route={self._upgrade.route.name!r})"

    # -- the Connection protocol (connections.py) ------------------------------------------

    def end(self, code: int, reason: str) -> None:
        """Stop relaying now (a session end, shutdown); the run task closes both sides."""
        self._finish(Closing((code, reason), (GOING_AWAY, reason)))

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._send({"type": "websocket.accept", "subprotocol": self._ws.protocol})
        except OSError:  # the browser left during the upstream handshake
            await self._close_upstream(self._ws, GOING_AWAY, "client went away")
            return
        registry = self._registry
        if self._session_id is not None:
            registry.register(self._session_id, self)
        try:
            await self._relay_until_closed()
        finally:
            if self._session_id is not None:
                registry.unregister(self._session_id, self)

    async def _relay_until_closed(self) -> None:
        self._from_browser = asyncio.create_task(self._pump_browser())
        self._from_upstream = asyncio.create_task(self._pump_upstream(self._ws))
        stop = asyncio.create_task(self._stop.wait())
        try:
            while self._closing is None:
                waiting: set[asyncio.Task[object]] = {self._from_browser, self._from_upstream, stop}
                deadline = self._next_deadline()
                timer = None
                if deadline is not None:
                    timer = asyncio.create_task(self._clock.sleep_until(deadline))
                    waiting.add(timer)
                try:
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if timer is not None:
                        timer.cancel()
                for task in (self._from_browser, self._from_upstream):
                    if task in done and not task.cancelled():
                        self._finish(self._outcome(task))
                if self._closing is None and timer is not None and timer in done:
                    await self._on_deadline()
        except asyncio.CancelledError:  # the server gave up waiting for us (shutdown)
            self._finish(Closing((GOING_AWAY, "going away"), (GOING_AWAY, "going away")))
            raise
        finally:
            stop.cancel()
            await self._shutdown()

    def _outcome(self, task: asyncio.Task[Closing]) -> Closing:
        exc = task.exception()
        if exc is None:
            return task.result()
        logger.error("websocket relay failed (%s)", type(exc).__name__)
        return Closing((1011, "internal error"), (1011, "internal error"))

    def _finish(self, closing: Closing) -> None:
        if self._closing is None:
            self._closing = closing
        self._ending = True
        current = asyncio.current_task()
        pumps = [self._from_browser]
        if self._closing.browser is not None:
            # Cancelled, not left to finish: a frame it holds must not reach the browser now.
            pumps.append(self._from_upstream)
        for task in pumps:
            if task is not None and task is not current:
                task.cancel()
        self._stop.set()

    async def _shutdown(self) -> None:
        self._ending = True
        closing = self._closing or Closing((1011, "internal error"), (1011, "internal error"))
        if closing.browser is None and closing.upstream is not None:
            # The browser left: close the upstream while its pump still reads, so aiohttp
            # interrupts that read and waits for the upstream's close reply.
            await self._close_upstream(self._ws, *closing.upstream)
        pumps = [t for t in (self._from_browser, self._from_upstream) if t is not None]
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if closing.browser is not None:
            code, reason = closing.browser
            message = {"type": "websocket.close", "code": code, "reason": short_reason(reason)}
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self._send(message)
        if closing.upstream is not None:
            await self._close_upstream(self._ws, *closing.upstream)
        elif not self._ws.closed:
            await self._close_upstream(self._ws, GOING_AWAY, "")

    async def _close_upstream(
        self, ws: aiohttp.ClientWebSocketResponse, code: int, reason: str
    ) -> None:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await ws.close(code=code, message=short_reason(reason).encode())

    # -- the two directions ---------------------------------------------------------------------

    async def _pump_browser(self) -> Closing:
        """Browser -> upstream, until the browser closes."""
        limit = self._max_bytes
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                code = message.get("code")
                upstream_code = GOING_AWAY if code == 1006 else sendable_code(code, 1000)
                return Closing(None, (upstream_code, short_reason(message.get("reason"))))
            if kind != "websocket.receive":
                continue
            text: str | None = message.get("text")
            data: bytes | None = message.get("bytes")
            # UTF-8 takes at most 4 bytes per character: encode only when that could matter.
            if data is not None:
                size = len(data)
            elif text is not None and len(text) * 4 > limit:
                size = len(text.encode())
            else:
                size = 0
            if size > limit:
                return Closing((TOO_BIG, "message too big"), (GOING_AWAY, "client message too big"))
            self._last_activity = self._clock.now()
            if not await self._send_upstream(text, data):
                return Closing((BAD_GATEWAY, "upstream connection lost"), None)

    async def _send_upstream(self, text: str | None, data: bytes | None) -> bool:
        while True:
            ws = self._ws
            try:
                if text is not None:
                    await ws.send_str(text)
                elif data is not None:
                    await ws.send_bytes(data)
                return True
            except (aiohttp.ClientError, ConnectionError):
                if ws is self._ws:  # not swapped by a reconnect meanwhile: really gone
                    return False

    async def _pump_upstream(self, ws: aiohttp.ClientWebSocketResponse) -> Closing:
        """Upstream -> browser, until the upstream closes or fails."""
        while True:
            msg = await ws.receive()
            if self._ending:
                return Closing(None, None)  # the outcome is already decided
            if msg.type is aiohttp.WSMsgType.TEXT:
                out: Message = {"type": "websocket.send", "text": msg.data}
            elif msg.type is aiohttp.WSMsgType.BINARY:
                out = {"type": "websocket.send", "bytes": msg.data}
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                code = sendable_code(msg.data, 1000)
                reason = short_reason(msg.extra)
                return Closing((code, reason), (code, reason))
            elif msg.type is aiohttp.WSMsgType.ERROR and getattr(msg.data, "code", 0) == TOO_BIG:
                return Closing((TOO_BIG, "upstream message too big"), None)
            else:  # ERROR, CLOSED: the connection broke without a close frame
                return Closing((BAD_GATEWAY, "upstream connection lost"), None)
            self._last_activity = self._clock.now()
            try:
                await self._send(out)
            except OSError:
                return Closing(None, (GOING_AWAY, "client went away"))

    # -- deadlines: session expiry, lifetime, idle, token expiry ---------------------------

    def _at(self, wall_time: float) -> float:
        return self._clock.now() + (wall_time - self._clock.wall())

    def _plan_token(self, token: str | None) -> None:
        times = token_times(token) if self._policy != "keep" else None
        if times is None:
            self._token_at = self._token_exp = None
            return
        iat, exp = times
        self._token_exp = self._at(exp)
        if self._policy == "close":
            self._token_at = self._token_exp
        else:  # reconnect when the broker would refresh it (TokenBroker._due)
            skew = self._skew
            self._token_at = self._at(exp - min(skew, (exp - iat) / 2 if iat else skew))

    def _next_deadline(self) -> float | None:
        idle_at = self._last_activity + self._idle if self._idle else None
        times = (self._session_at, self._lifetime_at, idle_at, self._token_at)
        return min((t for t in times if t is not None), default=None)

    async def _on_deadline(self) -> None:
        now = self._clock.now()
        if self._session_at is not None and now >= self._session_at:
            self._finish(Closing((SESSION_ENDED, "session expired"), (GOING_AWAY, "")))
        elif self._lifetime_at is not None and now >= self._lifetime_at:
            reason = "maximum connection lifetime reached"
            self._finish(Closing((GOING_AWAY, reason), (GOING_AWAY, reason)))
        elif self._idle and now >= self._last_activity + self._idle:
            self._finish(Closing((IDLE, "idle timeout"), (GOING_AWAY, "idle timeout")))
        elif self._token_at is not None and now >= self._token_at:
            if self._policy == "close":
                reason = "access token expired"
                self._finish(Closing((SESSION_ENDED, reason), (GOING_AWAY, reason)))
            else:
                await self._reconnect()

    async def _reconnect(self) -> None:
        """Open a new upstream connection with a fresh token and swap it in."""
        opener, upgrade = self._opener, self._upgrade
        try:
            token = await opener.token_for(upgrade, fresh_session=True)
        except LoginRequired:
            self._finish(Closing((SESSION_ENDED, "session ended"), (GOING_AWAY, "")))
            return
        except Forbidden as exc:
            self._finish(Closing((4403, exc.error), (GOING_AWAY, "")))
            return
        except GatewayError:
            token = None
        if token is None or (self._token is not None and hmac.compare_digest(token, self._token)):
            self._retry_or_give_up()  # the IdP is down, or the broker's token is not due yet
            return
        protocol = self._ws.protocol
        try:
            new = await opener.connect(upgrade, token, [protocol] if protocol else [])
        except GatewayError:
            self._retry_or_give_up()
            return
        old, old_pump = self._ws, self._from_upstream
        if (
            self._closing is not None
            or new.protocol != protocol
            or old_pump is None
            or old_pump.done()
        ):
            # Ended meanwhile, the old upstream closed by itself, or a changed subprotocol.
            await self._close_upstream(new, GOING_AWAY, "")
            if self._closing is None and (old_pump is None or not old_pump.done()):
                self._finish(Closing((BAD_GATEWAY, "upstream changed subprotocol"), None))
            return
        self._ws, self._token = new, token
        self._from_upstream = asyncio.create_task(self._pump_upstream(new))
        old_pump.cancel()
        await asyncio.gather(old_pump, return_exceptions=True)
        await self._close_upstream(old, 1000, "token renewed")
        self._plan_token(token)
        self.reconnects += 1

    def _retry_or_give_up(self) -> None:
        now = self._clock.now()
        if self._token_exp is not None and now + _RETRY >= self._token_exp:
            self._finish(
                Closing(
                    (TRY_AGAIN_LATER, "could not renew the upstream connection"), (GOING_AWAY, "")
                )
            )
        else:
            self._token_at = now + _RETRY
