"""Open long-lived connections per session, so that the end of a session reaches them.

oauth2-proxy (#2996) and Duende BFF (#762) keep relaying a WebSocket or an event stream after
its session has ended. Here every open WebSocket and every streamed response of a token route
registers under its session id; ``Gateway.end_session`` (local logout, back-channel logout, a
refresh token refused with ``invalid_grant``) calls :meth:`ConnectionRegistry.close_session`,
which ends each of them at once: WebSockets close with 4401, streams stop.

Ending is synchronous (a flag, a task cancel, an event) so that no frame or chunk that arrives
after the call is relayed; the connection's own task does the slow part (close handshakes).
A session ended a moment before a connection registers (logout racing a WebSocket handshake)
is remembered for a while, and such a connection is ended as it registers.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

SESSION_ENDED = 4401  # WebSocket close code: the session (or its token) is over; log in again
GOING_AWAY = 1001  # RFC 6455 §7.4.1: the gateway is shutting down

_TOMBSTONE_TTL = 300.0  # longer than any handshake or upstream connect takes
_TOMBSTONE_MAX = 10_000


class Connection(Protocol):
    """Something long-lived that a session owns (a relayed WebSocket, a streamed response)."""

    kind: str  # "websocket" or "stream"

    def end(self, code: int, reason: str) -> None:
        """Stop relaying now; finish closing in the connection's own task. Idempotent."""


class StreamGuard:
    """A streamed HTTP response that a session end cuts short (``with registry.stream(id)``).

    ``end`` cancels the task relaying the body (so a stream idle between two events stops
    too); leaving the ``with`` block swallows exactly that cancellation, so the proxy can end
    the response its own way. Any other cancellation propagates. A plain object, not a
    generator context manager: it is on the proxy's hot path.
    """

    kind = "stream"
    __slots__ = ("_cancelled", "_registry", "_session_id", "_task", "ended")

    def __init__(self, registry: ConnectionRegistry, session_id: str | None) -> None:
        self._registry = registry
        self._session_id = session_id
        self._task: asyncio.Task[object] | None = None
        self._cancelled = False
        self.ended = False  # the relay loop checks it too (an end while it runs, at register)

    def end(self, code: int, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        # Not the running task itself (an end at register time): a cancellation it never
        # awaits again inside the block would leak out of it.
        if self._task is not None and self._task is not asyncio.current_task():
            self._cancelled = True
            self._task.cancel()

    def __enter__(self) -> StreamGuard:
        if self._session_id is not None:
            self._task = asyncio.current_task()
            self._registry.register(self._session_id, self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._session_id is None:
            return False
        self._registry.unregister(self._session_id, self)
        if exc_type is asyncio.CancelledError and self._cancelled and self._task is not None:
            # Ours, and nobody else asked to cancel the task meanwhile: swallow it.
            return self._task.uncancel() == 0
        return False


class ConnectionRegistry:
    """This process's open connections by session id; counts exported as gauges."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_session: dict[str, set[Connection]] = {}
        self._ended: OrderedDict[str, float] = OrderedDict()
        # Gauges (read by the metrics module) and a counter.
        self.websockets = 0
        self.streams = 0
        self.closed_by_session_end = 0

    def register(self, session_id: str, connection: Connection) -> None:
        """Track ``connection``; end it at once if its session has just ended."""
        self._by_session.setdefault(session_id, set()).add(connection)
        self._count(connection, +1)
        if self._recently_ended(session_id):
            self.closed_by_session_end += 1
            connection.end(SESSION_ENDED, "session ended")

    def unregister(self, session_id: str, connection: Connection) -> None:
        connections = self._by_session.get(session_id)
        if connections is None or connection not in connections:
            return
        connections.discard(connection)
        self._count(connection, -1)
        if not connections:
            del self._by_session[session_id]

    def stream(self, session_id: str | None) -> StreamGuard:
        """A guard for the current task's streamed response (``session_id`` None: untracked)."""
        return StreamGuard(self, session_id)

    def close_session(self, session_id: str, reason: str = "session ended") -> int:
        """End every open connection of a session (4401 / stream end); return how many."""
        self._remember_ended(session_id)
        connections = self._by_session.pop(session_id, set())
        for connection in connections:
            self._count(connection, -1)
            connection.end(SESSION_ENDED, reason)
        self.closed_by_session_end += len(connections)
        return len(connections)

    def close_all(self, reason: str = "gateway shutting down") -> int:
        """End every open connection (shutdown): WebSockets get 1001 Going Away."""
        everything = self._by_session
        self._by_session = {}
        count = 0
        for connections in everything.values():
            for connection in connections:
                self._count(connection, -1)
                connection.end(GOING_AWAY, reason)
                count += 1
        return count

    def count(self, session_id: str) -> int:
        return len(self._by_session.get(session_id, ()))

    def export(self, registry: CollectorRegistry) -> None:
        """Add ``gateway_open_websockets`` / ``gateway_open_streams`` gauges to a Prometheus
        ``CollectorRegistry`` (read at scrape time, nothing on the hot path)."""
        from prometheus_client import Gauge

        websockets = Gauge(
            "gateway_open_websockets",
            "WebSockets relayed by this process.",
            registry=registry,
        )
        websockets.set_function(lambda: self.websockets)
        streams = Gauge(
            "gateway_open_streams",
            "Streamed responses of token routes being relayed by this process.",
            registry=registry,
        )
        streams.set_function(lambda: self.streams)

    def _count(self, connection: Connection, delta: int) -> None:
        if connection.kind == "websocket":
            self.websockets += delta
        else:
            self.streams += delta

    def _remember_ended(self, session_id: str) -> None:
        self._ended[session_id] = self._clock() + _TOMBSTONE_TTL
        self._ended.move_to_end(session_id)
        while len(self._ended) > _TOMBSTONE_MAX:
            self._ended.popitem(last=False)

    def _recently_ended(self, session_id: str) -> bool:
        expires = self._ended.get(session_id)
        if expires is None:
            return False
        if self._clock() >= expires:
            del self._ended[session_id]
            return False
        return True
