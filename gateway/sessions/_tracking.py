"""The connection that keeps ``ClientCache`` coherent: Redis ``CLIENT TRACKING`` invalidations.

One dedicated connection per Redis master (one in standalone and sentinel mode, one per master
in cluster mode) turns on broadcasting tracking for the store's prefixes and redirects the
invalidations to itself (``CLIENT TRACKING on REDIRECT <own id> BCAST PREFIX ...``, then
``SUBSCRIBE __redis__:invalidate``: RESP2, public commands only, Redis >= 6). Every write to a
key under those prefixes, by any client, sends that key's name here.

A PING every ``lease / 4`` proves the connection live: the PONG of a PING sent at t means every
invalidation produced before t was read (one ordered connection), so the cache may serve hits
until ``t + lease`` (``ClientCache.valid_until``). A dropped or silent connection, an error, a
topology change (a node's connection drops on failover): the whole cache is dropped, and the
tracker reconnects, with backoff, to whatever the topology is then. In sentinel mode it also
asks the sentinels for the master every second (``_watch_master``): a failover the old master's
connection does not notice yet is a topology change too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Connection

from ._client_cache import ClientCache
from ._redis_connect import REDIS_ERRORS

__all__ = ["InvalidationTracker"]

logger = logging.getLogger("gateway.sessions")

_CHANNEL = b"__redis__:invalidate"
_RETRY_MIN = 0.05
_RETRY_MAX = 2.0
# How often sentinel mode asks the sentinels for the master (one query per instance and
# process each time: kept at one a second for fleets of many processes).
MASTER_CHECK_INTERVAL = 1.0

OpenConnections = Callable[[], Awaitable[list[Connection]]]
# True when the master changed since the last call (sentinel mode; see ``_redis_connect``).
MasterChanged = Callable[[], Awaitable[bool]]


class TrackingLost(Exception):
    """The invalidation connection stopped answering, or answered something unexpected."""


class InvalidationTracker:
    """Runs the invalidation connections of one store; see the module docstring."""

    def __init__(
        self,
        *,
        cache: ClientCache,
        prefixes: Sequence[str],
        open_connections: OpenConnections,
        timeout: float,
        lease: float,
        master_changed: MasterChanged | None = None,
    ) -> None:
        self._cache = cache
        self._master_changed = master_changed
        self._prefixes = list(prefixes)
        self._open = open_connections
        self._timeout = timeout
        self._lease = lease
        self._interval = lease / 4
        self._confirmed: list[float | None] = []
        self._task: asyncio.Task[None] | None = None
        self.client_ids: list[int] = []  # Redis CLIENT IDs of the live connections (tests)
        self.invalidations = 0  # keys invalidated (tests, benchmarks)
        self.resets = 0  # whole-cache drops after a lost connection
        # Called with (key, monotonic time) for each invalidated key (the delay benchmark).
        self.on_invalidated: Callable[[str, float], None] | None = None

    def __repr__(self) -> str:
        return f"InvalidationTracker(prefixes={self._prefixes!r}, live={self._cache.is_live})"

    def ensure_started(self) -> None:
        """Start following invalidations (idempotent; needs a running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="redis-invalidations"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        # redis-py's connect may swallow a cancellation (it retries): cancel until it ends.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        self._cache.reset()

    async def _run(self) -> None:
        delay = _RETRY_MIN
        while True:
            connections: list[Connection] = []
            try:
                async with asyncio.timeout(self._timeout):
                    connections = await self._open()
                self._confirmed = [None] * len(connections)
                self.client_ids = [0] * len(connections)
                tasks = [
                    asyncio.create_task(self._follow(conn, i)) for i, conn in enumerate(connections)
                ]
                if self._master_changed is not None:
                    tasks.append(asyncio.create_task(self._watch_master(self._master_changed)))
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                for task in done:
                    task.result()  # raises what ended it
            except (*REDIS_ERRORS, TrackingLost) as exc:
                logger.warning(
                    "client-side cache off: invalidation connection lost (%s); reconnecting",
                    type(exc).__name__,
                )
            finally:
                self._cache.reset()
                self.resets += 1
                for conn in connections:
                    with contextlib.suppress(Exception):
                        await conn.disconnect()
            if self._cache_was_confirmed():
                delay = _RETRY_MIN
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def _cache_was_confirmed(self) -> bool:
        return bool(self._confirmed) and all(c is not None for c in self._confirmed)

    async def _follow(self, conn: Connection, index: int) -> None:
        async with asyncio.timeout(self._timeout):
            await conn.send_command("CLIENT", "ID")
            client_id = await conn.read_response()
            self.client_ids[index] = int(client_id)
            command: list[object] = ["CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST"]
            for prefix in self._prefixes:
                command += ["PREFIX", prefix]
            await conn.send_command(*command)
            if await conn.read_response() not in (b"OK", "OK"):
                raise TrackingLost("CLIENT TRACKING refused")
            await conn.send_command("SUBSCRIBE", _CHANNEL)
            await conn.read_response()
        pings: deque[float] = deque()
        # Two tasks on one connection: this one only reads (no read timeout: a timed read
        # can turn a cancellation into a timeout and swallow it), the other one pings and
        # decides when silence means the connection is lost.
        pinger = asyncio.create_task(self._ping(conn, pings))
        reading: asyncio.Future[Any] | None = None
        try:
            while True:
                reading = asyncio.ensure_future(conn.read_response(timeout=math.inf))
                done, _ = await asyncio.wait({reading, pinger}, return_when=asyncio.FIRST_COMPLETED)
                if pinger in done:
                    reading.cancel()
                    pinger.result()  # raises TrackingLost
                message = reading.result()
                if not isinstance(message, list) or not message:
                    raise TrackingLost("unexpected reply on the invalidation connection")
                kind = message[0]
                if kind in (b"pong", "pong"):
                    if not pings:
                        raise TrackingLost("PONG without a PING")
                    self._confirm(index, pings.popleft())
                elif kind in (b"message", "message") and len(message) == 3:
                    self._invalidate(message[2])
        finally:
            pinger.cancel()
            pending = [pinger] if reading is None else [pinger, reading]
            if reading is not None:
                reading.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _ping(self, conn: Connection, pings: deque[float]) -> None:
        while True:
            now = time.monotonic()
            if pings and now - pings[0] > self._timeout:
                raise TrackingLost("no PONG within the Redis timeout")
            await conn.send_command("PING")
            pings.append(now)
            await asyncio.sleep(self._interval)

    async def _watch_master(self, master_changed: MasterChanged) -> None:
        """Sentinel mode: a promoted replica takes writes at once, while the old master may
        take them too until the sentinels reconfigure it (seconds later), and those are lost.
        Asking the sentinels every interval bounds that window: on a change the cache goes,
        this connection follows the new master and the data pool drops its connections."""
        while True:
            await asyncio.sleep(MASTER_CHECK_INTERVAL)
            try:
                async with asyncio.timeout(self._timeout):
                    changed = await master_changed()
            except REDIS_ERRORS:
                continue  # the sentinels unreachable say nothing about the master
            if changed:
                raise TrackingLost("the sentinels named another master")

    def _confirm(self, index: int, sent_at: float) -> None:
        self._confirmed[index] = sent_at
        if all(c is not None for c in self._confirmed):
            oldest = min(c for c in self._confirmed if c is not None)
            self._cache.valid_until = oldest + self._lease

    def _invalidate(self, keys: object) -> None:
        if keys is None:  # FLUSHDB / FLUSHALL: every key may have changed
            valid_until = self._cache.valid_until
            self._cache.reset()
            self._cache.valid_until = valid_until
            return
        if not isinstance(keys, list):
            raise TrackingLost("unexpected invalidation message")
        now = time.monotonic()
        names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
        self._cache.invalidate(names)
        self.invalidations += len(names)
        hook = self.on_invalidated
        if hook is not None:
            for name in names:
                hook(name, now)
