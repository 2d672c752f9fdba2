"""How many upstream requests may be in flight: per upstream and in all, with a bounded wait.

One shared pool without a per-upstream limit let 1,000 slow request bodies on one public route
hold every upstream connection, and every other route wait behind them for as long as the
attacker liked (issue "Findings of an adversarial review", item 2). Each upstream (scheme, host
and port) now has its own share of the pool, and a request waits for a free slot at most
``acquire_timeout``: then it is answered ``503 upstream_busy`` with ``Retry-After``.

A slot is taken before the upstream request and given back when its answer is closed, so it
counts what aiohttp's connector would count (connections in use, not idle keep-alive ones).
Usage: ``try_take(slots) or await take(slots, route)``, then ``give_back(slots)`` once.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import UpstreamBusy

_RETRY_AFTER = 2  # seconds: a busy upstream frees slots as its answers end


class Slots:
    """A counting gate: taken without a wait while one is free, else FIFO. A slot given back
    goes straight to the first waiter, so a newcomer cannot overtake the queue."""

    __slots__ = ("_waiters", "free")

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def wait(self) -> None:
        """Wait for a slot handed over by :meth:`give_back` (call only when none is free)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # handed a slot just as the wait ended: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def give_back(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class UpstreamSlots:
    """Slots per upstream origin within a total; :meth:`take` and :meth:`give_back` pair up."""

    def __init__(self, *, total: int, per_upstream: int, acquire_timeout: float) -> None:
        self._total = Slots(total)
        self._per_upstream = per_upstream
        self._acquire_timeout = acquire_timeout
        # origin -> its slots; origins come from the route table, never from a client
        self._by_origin: dict[str, Slots] = {}

    def for_origin(self, origin: str) -> Slots:
        """The slots of one upstream origin (``scheme://host:port``)."""
        slots = self._by_origin.get(origin)
        if slots is None:
            slots = self._by_origin[origin] = Slots(self._per_upstream)
        return slots

    def try_take(self, slots: Slots) -> bool:
        """One slot of ``slots`` and one of the total if both are free now (the common case:
        no wait, no coroutine); else False, and :meth:`take` waits."""
        total = self._total
        if slots.free > 0 and total.free > 0:
            slots.free -= 1
            total.free -= 1
            return True
        return False

    async def take(self, slots: Slots, route: str) -> None:
        """One slot of ``slots`` and one of the total, or :class:`UpstreamBusy` once
        ``acquire_timeout`` has passed without both."""
        total = self._total
        took_own = False
        try:
            async with asyncio.timeout(self._acquire_timeout):
                if slots.free > 0:
                    slots.free -= 1
                else:
                    await slots.wait()
                took_own = True
                if total.free > 0:
                    total.free -= 1
                else:
                    await total.wait()
        except TimeoutError:
            if took_own:
                slots.give_back()
            raise UpstreamBusy(
                f"upstream of route {route} has no free connection", retry_after=_RETRY_AFTER
            ) from None
        except BaseException:
            if took_own:
                slots.give_back()
            raise

    def give_back(self, slots: Slots) -> None:
        slots.give_back()
        self._total.give_back()
