""" "This session has ended", told to every gateway instance.

A WebSocket opened through instance A must close when the user logs out through instance B.
The instance that ends a session closes its own connections in-process (``Gateway``), then
publishes for the others. With the memory store there are no others. With Redis every instance
subscribes to ``<key_prefix>session-ended`` and gets ``<instance id> <session id>`` (and skips
its own messages). The session id is the SHA-256 of the cookie secret, already a Redis key
name, so the channel carries nothing that the keyspace does not.

In cluster mode the channel is a shard channel (``SSUBSCRIBE``/``SPUBLISH``, Redis 7): a
classic publish would be copied to every node of the cluster, a shard channel lives on the
node that owns its slot (and follows it through a failover).

Pub/sub is fire-and-forget: an instance that is disconnected from Redis at that moment misses
the news. Its connections still end when they next need the session (a token refresh, a
reconnect) or at their limits (lifetime, idle timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ._redis_connect import REDIS_ERRORS, RedisEndpoints, RedisTopology, endpoints_of

if TYPE_CHECKING:
    from ..settings import Settings

logger = logging.getLogger("gateway.sessions")

SessionEndedHandler = Callable[[str], object]

_CHANNEL = "session-ended"
_RETRY_MIN = 0.1
_RETRY_MAX = 5.0


class SessionEvents(Protocol):
    """Delivers "session ended" to the other instances' handlers.

    Each other instance under the same key prefix hears a publish once; the publisher never
    hears its own (it closed its own connections already); a failing handler does not end the
    subscription; ``publish`` and ``close`` never raise (fire-and-forget, see above). With one
    process there are no others: LocalSessionEvents delivers nothing. One contract suite runs
    on both: tests/unit/test_session_events.py.
    """

    async def start(self, on_ended: SessionEndedHandler) -> None:
        """Begin delivering other instances' news to ``on_ended``; again: the handler changes."""

    async def publish(self, session_id: str) -> None:
        """Tell the other instances that the session has ended."""

    async def close(self) -> None:
        """Stop listening (idempotent)."""


class LocalSessionEvents:
    """One process (the memory store): there is nobody else to tell."""

    async def start(self, on_ended: SessionEndedHandler) -> None:
        return None

    async def publish(self, session_id: str) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisSessionEvents:
    """Redis pub/sub on ``<prefix>session-ended``, with its own connection (a subscribed
    connection cannot run other commands, and it blocks on reads without a socket timeout)."""

    def __init__(
        self,
        *,
        url: str,
        key_prefix: str,
        timeout: float = 2.0,
        endpoints: RedisEndpoints | None = None,
    ) -> None:
        self.channel = f"{key_prefix}{_CHANNEL}"
        self.instance = secrets.token_hex(8)
        self._timeout = timeout
        self._topology = RedisTopology(
            endpoints or RedisEndpoints(url=url), pool_size=4, timeout=timeout, socket_timeout=None
        )
        self._sharded = self._topology.cluster
        self._redis = self._topology.client
        self._handler: SessionEndedHandler | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisSessionEvents:
        session = settings.session
        return cls(
            url=session.redis_url,
            key_prefix=session.redis_key_prefix,
            timeout=session.redis_timeout,
            endpoints=endpoints_of(settings),
        )

    def __repr__(self) -> str:
        return f"RedisSessionEvents(channel={self.channel!r})"

    async def start(self, on_ended: SessionEndedHandler) -> None:
        """Subscribe, waiting up to the Redis timeout; keeps retrying in the background."""
        self._handler = on_ended
        if self._listener is not None:
            return
        self._listener = asyncio.create_task(self._listen(), name="session-events")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._subscribed.wait()
        if not self._subscribed.is_set():
            logger.warning("not subscribed to %s yet; retrying in the background", self.channel)

    async def publish(self, session_id: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                message = f"{self.instance} {session_id}"
                if self._sharded:
                    await self._redis.spublish(self.channel, message)
                else:
                    await self._redis.publish(self.channel, message)
        except REDIS_ERRORS as exc:
            # The session is already deleted from the store; only other instances' open
            # connections miss the news (see the module docstring).
            logger.warning("could not publish a session end (%s)", type(exc).__name__)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._topology.close()

    async def _listen(self) -> None:
        delay = _RETRY_MIN
        while True:
            pubsub = self._topology.pubsub()
            try:
                if self._sharded:
                    await pubsub.ssubscribe(self.channel)
                    self._subscribed.set()
                    delay = _RETRY_MIN
                    while True:
                        message = await pubsub.get_sharded_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None and message.get("type") == "smessage":
                            self._deliver(message.get("data"))
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                delay = _RETRY_MIN
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._deliver(message.get("data"))
            except REDIS_ERRORS as exc:
                self._subscribed.clear()
                logger.warning("session-end subscription lost (%s); retrying", type(exc).__name__)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def _deliver(self, data: object) -> None:
        raw = data.decode("ascii", "replace") if isinstance(data, bytes) else str(data)
        instance, _, session_id = raw.partition(" ")
        if instance == self.instance or not session_id or self._handler is None:
            return
        try:
            self._handler(session_id)
        except Exception as exc:  # a bad handler must not kill the subscription
            logger.error("session-end handler failed (%s)", type(exc).__name__)


def create_session_events(settings: Settings) -> SessionEvents:
    """Pub/sub over Redis with the redis store, in-process otherwise."""
    if settings.session.store == "redis":
        return RedisSessionEvents.from_settings(settings)
    return LocalSessionEvents()
