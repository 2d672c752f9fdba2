"""What this instance read from Redis, kept until Redis says the key changed.

Redis's server-assisted client-side caching (``CLIENT TRACKING``, https://redis.io/docs/latest/
develop/reference/client-side-caching/) tells a subscriber every key that changes under some
prefixes; ``_tracking`` feeds those names to :meth:`ClientCache.invalidate`. A hit then costs
no round trip and is never older than the invalidation in flight.

Two races are closed here, the ones the Redis docs warn of:

- A read and an invalidation travel on different connections. A read that was in flight when
  its key's invalidation arrived may carry the old value: :meth:`finish` does not keep it.
- Tracking starts (or restarts) after a read was sent: the read's value was never covered by
  tracking. :meth:`begin` hands out a ticket only while the cache is confirmed live (see
  ``valid_until``), and every reset makes older tickets worthless.

``valid_until`` is set by the tracker from the last PONG on the invalidation connection: the
PONG of a PING sent at time t proves that every invalidation Redis produced before t has been
read. Past ``t + lease`` nothing is served (a silent partition cannot make a hit stale for
longer than the lease).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["MISS", "ClientCache"]


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS = _Miss()  # "not cached" (None is a value: a key known to be absent)
_NO_TICKET = -1


class ClientCache:
    """A bounded LRU map Redis key -> decoded value, valid while tracking is confirmed."""

    __slots__ = ("_dirty", "_entries", "_epoch", "_maxsize", "_reading", "valid_until")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self._maxsize = maxsize
        self._entries: OrderedDict[str, object] = OrderedDict()
        self._reading: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._epoch = 0
        self.valid_until = 0.0  # time.monotonic(); 0: tracking not confirmed

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ClientCache(size={len(self._entries)}, maxsize={self._maxsize})"

    @property
    def is_live(self) -> bool:
        return time.monotonic() < self.valid_until

    def get(self, key: str) -> object:
        """The cached value of ``key`` (None: known absent), or MISS."""
        if time.monotonic() >= self.valid_until:
            return MISS
        value = self._entries.get(key, MISS)
        if value is not MISS:
            self._entries.move_to_end(key)
        return value

    def begin(self, key: str) -> int:
        """Call before sending a read of ``key``; pass the ticket to :meth:`finish`."""
        self._reading[key] = self._reading.get(key, 0) + 1
        if self._maxsize == 0 or time.monotonic() >= self.valid_until:
            return _NO_TICKET
        return self._epoch

    def finish(self, key: str, ticket: int, value: object = MISS) -> None:
        """The read of ``key`` is over (answered or failed); keep ``value`` if still safe."""
        readers = self._reading.get(key, 1) - 1
        keep = (
            value is not MISS
            and ticket == self._epoch
            and key not in self._dirty
            and time.monotonic() < self.valid_until
        )
        if readers <= 0:
            self._reading.pop(key, None)
            self._dirty.discard(key)
        else:
            self._reading[key] = readers
        if keep:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        """Forget ``key`` now (this instance wrote it); its invalidation follows anyway."""
        self._entries.pop(key, None)
        if key in self._reading:
            self._dirty.add(key)

    def invalidate(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.discard(key)

    def reset(self) -> None:
        """Forget everything and refuse every read in flight (tracking lost or restarted)."""
        self.valid_until = 0.0
        self._epoch += 1
        self._entries.clear()
