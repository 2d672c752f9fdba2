"""The request body reader (gateway/request_body.py): idle timeout, small bodies read first."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import ClientDisconnected, PayloadTooLarge, RequestBodyTimeout
from gateway.request_body import RequestBody

pytestmark = pytest.mark.anyio

IDLE = 0.05  # seconds; the stalled receive below never answers, so this bounds each test


class Client:
    """An ASGI ``receive`` that hands out the given body parts, then ends the body (``end``),
    stalls for ever (``stall``: a client that went quiet) or says it disconnected."""

    def __init__(self, *parts: bytes, then: str = "end") -> None:
        self._parts = list(parts)
        self._then = then
        self.reads = 0

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        if self._parts:
            part = self._parts.pop(0)
            more = bool(self._parts) or self._then != "end"
            return {"type": "http.request", "body": part, "more_body": more}
        if self._then == "disconnect":
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # a client that sends nothing more
        raise AssertionError("unreachable")


def _stalling(*parts: bytes) -> Client:
    return Client(*parts, then="stall")


async def _drain(body: RequestBody) -> list[bytes]:
    return [chunk async for chunk in await body.ready()]


async def test_a_body_that_goes_quiet_is_cut_with_408_after_the_idle_timeout() -> None:
    client = _stalling(b"a", b"b")
    body = RequestBody(client.receive, 0, idle=IDLE)
    got: list[bytes] = []
    with pytest.raises(RequestBodyTimeout):
        async with asyncio.timeout(5):  # the test's own bound: without the timeout, a hang
            async for chunk in await body.ready():
                got.append(chunk)
    assert got == [b"a", b"b"]
    assert isinstance(body.failure, RequestBodyTimeout)
    assert body.failure.status_code == 408
    assert body.failure.headers() == {"Connection": "close"}


async def test_a_body_that_keeps_arriving_is_not_cut() -> None:
    parts = [b"x"] * 5
    body = RequestBody(Client(*parts).receive, 0, idle=IDLE)
    assert await _drain(body) == parts and body.failure is None


async def test_a_small_declared_body_is_read_whole_before_anything_is_sent() -> None:
    client = Client(b"ab", b"cd")
    body = RequestBody(client.receive, 0, idle=IDLE, declared=4, buffer_up_to=4)
    chunks = await body.ready()
    assert client.reads == 2  # read before the upstream is even asked for a connection
    assert [chunk async for chunk in chunks] == [b"ab", b"cd"]


async def test_a_slow_small_body_fails_before_an_upstream_connection_is_taken() -> None:
    body = RequestBody(_stalling(b"a").receive, 0, idle=IDLE, declared=100, buffer_up_to=65536)
    with pytest.raises(RequestBodyTimeout):
        async with asyncio.timeout(5):
            await body.ready()


async def test_a_large_or_chunked_body_streams() -> None:
    for declared in (65537, None):
        client = Client(b"ab", b"cd")
        body = RequestBody(client.receive, 0, declared=declared, buffer_up_to=65536)
        chunks = await body.ready()
        assert client.reads == 0
        assert [chunk async for chunk in chunks] == [b"ab", b"cd"]


async def test_over_the_limit_is_413_and_a_disconnect_is_said() -> None:
    body = RequestBody(Client(b"abc", b"def").receive, 4)
    with pytest.raises(PayloadTooLarge):
        await _drain(body)
    assert body.too_large
    gone = RequestBody(Client(b"abc", then="disconnect").receive, 0, idle=IDLE)
    with pytest.raises(ClientDisconnected):
        await _drain(gone)
