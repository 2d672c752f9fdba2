"""The upstream connection slots (gateway/upstream_slots.py): FIFO, bounded wait, no leaks."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import UpstreamBusy
from gateway.upstream_slots import Slots, UpstreamSlots

pytestmark = pytest.mark.anyio


async def test_a_slot_given_back_goes_to_the_first_waiter() -> None:
    slots = Slots(0)
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.wait()
        order.append(name)

    waiters = [asyncio.ensure_future(wait(name)) for name in ("first", "second")]
    await asyncio.sleep(0)
    slots.give_back()
    slots.give_back()
    await asyncio.gather(*waiters)
    assert order == ["first", "second"] and slots.free == 0


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    slots = Slots(0)
    waiter = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    slots.give_back()  # handed to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.free == 1  # not lost


async def test_a_timed_out_wait_is_busy_and_leaves_every_count_as_it_was() -> None:
    pool = UpstreamSlots(total=2, per_upstream=1, acquire_timeout=0.01)
    one, two = pool.for_origin("http://one:80"), pool.for_origin("http://two:80")
    assert pool.try_take(one) and pool.try_take(two)
    assert not pool.try_take(one)
    with pytest.raises(UpstreamBusy):
        await pool.take(one, "one")  # its own share is used
    three = pool.for_origin("http://three:80")
    with pytest.raises(UpstreamBusy):
        await pool.take(three, "three")  # its share is free, the total is not
    assert three.free == 1  # the share it took while waiting for the total came back
    pool.give_back(one)
    pool.give_back(two)
    assert pool.try_take(three) and pool.try_take(one)
