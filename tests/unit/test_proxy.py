"""One contract suite for every UpstreamClient (gateway/proxy.py), run against real loopback
upstreams that write their answers byte by byte (tests/unit/raw_upstream.py).

What the proxy relies on: the body arrives whole and exactly as sent; ``at_eof`` says True only
once the last byte was read; ``close`` releases an answer at any point without poisoning the
pool; a refused connection is an UpstreamError (502), a silent upstream an UpstreamTimeout
(504), a body cut off or stalled midway ends the stream with an UpstreamError; cancelling stays
a cancellation. Messages name the route, never the URL (its query may hold secrets).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.proxy import AiohttpUpstreamClient, UpstreamClient, UpstreamResponse

from .raw_upstream import (
    ReceivedRequest,
    answer,
    raw_upstream,
    refusing_port,
    response_head,
)

pytestmark = pytest.mark.anyio

ROUTE = "orders"
SECRET = "query-secret-0123456789"
TIMEOUT = 5.0  # the route's upstream timeout, where the test does not wait for it
SHORT_TIMEOUT = 0.2  # where it does: a real socket timeout, the only clock aiohttp reads
BOUND = 10.0  # no test waits longer than this for anything
BIG = bytes(range(256)) * 4096  # 1 MiB: several reads

CLIENTS: dict[str, Callable[[], UpstreamClient]] = {"aiohttp": AiohttpUpstreamClient}


@pytest.fixture(params=sorted(CLIENTS))
async def client(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamClient]:
    made = CLIENTS[request.param]()
    try:
        yield made
    finally:
        await made.close()


async def _get(
    client: UpstreamClient,
    url: str,
    *,
    timeout: float = TIMEOUT,
    body: AsyncIterator[bytes] | None = None,
) -> UpstreamResponse:
    return await client.send("GET", url, [], body, timeout=timeout, route=ROUTE)


async def _read_all(response: UpstreamResponse) -> bytes:
    return b"".join([chunk async for chunk in response.body])


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_upstream_client_relays_status_headers_and_the_whole_body(
    client: UpstreamClient,
) -> None:
    headers = [("X-Mixed-Case", "1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    async with raw_upstream(answer(201, BIG, headers)) as upstream:
        async with asyncio.timeout(BOUND):
            response = await _get(client, upstream.url + "/big")
            assert response.status == 201
            assert (b"X-Mixed-Case", b"1") in response.headers
            assert [v for n, v in response.headers if n.lower() == b"set-cookie"] == [
                b"a=1",
                b"b=2",
            ]
            assert await _read_all(response) == BIG
            assert response.at_eof()
            response.close()


async def test_upstream_client_at_eof_only_once_the_last_byte_was_read(
    client: UpstreamClient,
) -> None:
    sent_first = asyncio.Event()
    send_rest = asyncio.Event()

    async def two_chunks(request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(response_head(200, [("Transfer-Encoding", "chunked")]) + b"5\r\nfirst\r\n")
        await writer.drain()
        sent_first.set()
        await send_rest.wait()
        writer.write(b"4\r\nlast\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async with raw_upstream(two_chunks) as upstream:
        async with asyncio.timeout(BOUND):
            response = await _get(client, upstream.url + "/")
            await sent_first.wait()
            assert await response.body.__anext__() == b"first"
            assert not response.at_eof()  # more is coming: the proxy must read on
            send_rest.set()
            assert await _read_all(response) == b"last"
            assert response.at_eof()
            response.close()


async def test_upstream_client_at_eof_right_after_a_body_read_in_one_go(
    client: UpstreamClient,
) -> None:
    # The proxy relays such a body with one read and no second one (the fast path).
    async with raw_upstream(answer(200, b'{"ok":true}')) as upstream:
        async with asyncio.timeout(BOUND):
            response = await _get(client, upstream.url + "/")
            assert await response.body.__anext__() == b'{"ok":true}'
            assert response.at_eof()
            with pytest.raises(StopAsyncIteration):
                await response.body.__anext__()
            response.close()


async def test_upstream_client_sends_method_target_headers_and_streamed_body_as_given(
    client: UpstreamClient,
) -> None:
    target = "/a%2Fb/c%20d?x=1&y=%2F"
    # Repeated names as an ASGI server hands them over (lower case), in their order.
    headers = [("x-dup", "1"), ("x-dup", "2"), ("Content-Type", "application/json")]
    async with raw_upstream(answer(204)) as upstream:
        async with asyncio.timeout(BOUND):
            response = await client.send(
                "PATCH",
                upstream.url + target,
                headers,
                _chunks(b'{"a":', b"1", b"}"),
                timeout=TIMEOUT,
                route=ROUTE,
            )
            assert response.status == 204 and await _read_all(response) == b""
            response.close()
    [received] = upstream.requests
    assert (received.method, received.target) == ("PATCH", target)  # not re-encoded
    assert received.header_values("x-dup") == ["1", "2"]
    assert received.body == b'{"a":1}'
    # Nothing the caller did not ask for: no client identification, no compression offer.
    assert received.header_values("user-agent") == []
    assert received.header_values("accept-encoding") == []


async def test_upstream_client_passes_redirects_and_compressed_bodies_through(
    client: UpstreamClient,
) -> None:
    packed = gzip.compress(b"hello " * 100)
    async with raw_upstream(answer(302, b"", [("Location", "/elsewhere")])) as moved:
        async with raw_upstream(answer(200, packed, [("Content-Encoding", "gzip")])) as zipped:
            async with asyncio.timeout(BOUND):
                redirect = await _get(client, moved.url + "/")
                assert redirect.status == 302  # the browser follows it, not the gateway
                assert (b"Location", b"/elsewhere") in redirect.headers
                await _read_all(redirect)
                redirect.close()
                compressed = await _get(client, zipped.url + "/")
                assert await _read_all(compressed) == packed  # the bytes as sent
                compressed.close()
    assert len(moved.requests) == 1 and moved.requests[0].target == "/"


async def test_upstream_client_reuses_a_connection_after_a_whole_body(
    client: UpstreamClient,
) -> None:
    async with raw_upstream(answer(200, b"ok")) as upstream:
        async with asyncio.timeout(BOUND):
            for _ in range(3):
                response = await _get(client, upstream.url + "/")
                assert await _read_all(response) == b"ok"
                response.close()
    assert (len(upstream.requests), upstream.connections) == (3, 1)


async def test_upstream_client_close_midway_leaves_the_pool_usable(
    client: UpstreamClient,
) -> None:
    # A client that went away: the rest of that answer must not reach the next request.
    async with raw_upstream(answer(200, BIG)) as upstream:
        async with asyncio.timeout(BOUND):
            abandoned = await _get(client, upstream.url + "/first")
            first = await abandoned.body.__anext__()
            assert 0 < len(first) < len(BIG) and not abandoned.at_eof()
            abandoned.close()
            abandoned.close()  # idempotent: the proxy may close on several exits
            response = await _get(client, upstream.url + "/second")
            assert await _read_all(response) == BIG
            response.close()
    assert [r.target for r in upstream.requests] == ["/first", "/second"]
    assert upstream.connections == 2  # the half-read connection was not put back


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_client_upstream_dying_midway_ends_the_body_with_a_502(
    client: UpstreamClient, framing: str, caplog: pytest.LogCaptureFixture
) -> None:
    first_read = asyncio.Event()

    async def die_midway(request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        if framing == "chunked":
            head = response_head(200, [("Transfer-Encoding", "chunked")]) + b"a\r\n0123456789\r\n"
        else:
            head = response_head(200, [("Content-Length", "1000")]) + b"0123456789"
        writer.write(head)
        await writer.drain()
        await first_read.wait()
        return False  # closes the connection: 990 bytes (or the last chunk) never come

    caplog.set_level(logging.DEBUG)
    async with raw_upstream(die_midway) as upstream:
        async with asyncio.timeout(BOUND):
            response = await _get(client, f"{upstream.url}/?token={SECRET}")
            assert response.status == 200
            assert await response.body.__anext__() == b"0123456789"
            first_read.set()
            with pytest.raises(UpstreamError) as caught:
                await _read_all(response)
            assert not response.at_eof()
            response.close()
    assert type(caught.value) is UpstreamError and caught.value.status_code == 502
    assert ROUTE in str(caught.value)
    assert SECRET not in str(caught.value) and SECRET not in caplog.text


async def test_upstream_client_connection_refused_is_a_502(
    client: UpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with refusing_port() as port:
        async with asyncio.timeout(BOUND):
            with pytest.raises(UpstreamError) as caught:
                await _get(client, f"http://127.0.0.1:{port}/?token={SECRET}")
    assert type(caught.value) is UpstreamError and caught.value.status_code == 502
    assert ROUTE in str(caught.value)
    assert SECRET not in str(caught.value) and SECRET not in caplog.text


async def test_upstream_client_silent_upstream_is_a_504(client: UpstreamClient) -> None:
    async def never_answer(request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        await upstream.released.wait()
        return False

    async with raw_upstream(never_answer) as upstream:
        async with asyncio.timeout(BOUND):
            with pytest.raises(UpstreamTimeout) as caught:
                await _get(client, upstream.url + "/", timeout=SHORT_TIMEOUT)
    assert caught.value.status_code == 504 and ROUTE in str(caught.value)
    assert len(upstream.requests) == 1


async def test_upstream_client_body_stalling_midway_ends_with_an_upstream_error(
    client: UpstreamClient,
) -> None:
    # Headers are already relayed: the stream can only end early (a 502 in the access log).
    async def stall(request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(response_head(200, [("Content-Length", "1000")]) + b"0123456789")
        await writer.drain()
        await upstream.released.wait()
        return False

    async with raw_upstream(stall) as upstream:
        async with asyncio.timeout(BOUND):
            response = await _get(client, upstream.url + "/", timeout=SHORT_TIMEOUT)
            assert await response.body.__anext__() == b"0123456789"
            with pytest.raises(UpstreamError):
                await response.body.__anext__()
            response.close()


async def test_upstream_client_cancelled_send_stays_a_cancellation(
    client: UpstreamClient,
) -> None:
    # The browser went away while the upstream thinks: no 502 for a request nobody awaits.
    arrived = asyncio.Event()

    async def think(request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        arrived.set()
        await upstream.released.wait()
        return False

    async with raw_upstream(think) as upstream:
        async with asyncio.timeout(BOUND):
            sending = asyncio.ensure_future(_get(client, upstream.url + "/"))
            await arrived.wait()
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending


async def test_upstream_client_close_is_idempotent(client: UpstreamClient) -> None:
    async with raw_upstream(answer(200, b"ok")) as upstream:
        response = await _get(client, upstream.url + "/")
        assert await _read_all(response) == b"ok"
        response.close()
    await client.close()
    await client.close()
