"""The upstream client (gateway/proxy.py) against real loopback sockets: per-upstream limits, a
bounded wait for a connection, a request body gone quiet, ``Expect: 100-continue``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway import create_app
from gateway.errors import UpstreamBusy, UpstreamError
from gateway.proxy import AiohttpUpstreamClient

from .conftest import make_settings

pytestmark = pytest.mark.anyio

BOUND = 5.0  # seconds: every wait of these tests ends by then, pass or fail


class RawUpstream:
    """HTTP/1.1 written by hand on 127.0.0.1: reads a request head and its Content-Length body,
    answers 200 with the body's length. It never sends ``100 Continue``. ``hold`` keeps every
    answer back until :meth:`release`; a body that ends early is counted in ``cut``."""

    def __init__(self, *, hold: bool = False, slam: bool = False) -> None:
        self._hold = asyncio.Event()
        if not hold:
            self._hold.set()
        self._slam = slam  # close every connection at once, unanswered
        self.heads: list[bytes] = []
        self.arrived = asyncio.Condition()
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        assert self._server is not None
        self._server.close()

    def release(self) -> None:
        self._hold.set()

    async def wait_for_requests(self, count: int) -> None:
        async with asyncio.timeout(BOUND), self.arrived:
            await self.arrived.wait_for(lambda: len(self.heads) >= count)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._slam:
                return
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                async with self.arrived:
                    self.heads.append(head)
                    self.arrived.notify_all()
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                try:
                    body = await reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    self.cut.set()
                    return
                await self._hold.wait()
                answer = str(len(body)).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


async def _send(client: AiohttpUpstreamClient, upstream: RawUpstream, route: str) -> bytes:
    response = await client.send("GET", upstream.url + "x", [], None, timeout=BOUND, route=route)
    try:
        return b"".join([chunk async for chunk in response.body])
    finally:
        response.close()


@contextlib.asynccontextmanager
async def _client(**options: Any) -> AsyncIterator[AiohttpUpstreamClient]:
    client = AiohttpUpstreamClient(**options)
    try:
        yield client
    finally:
        await client.close()


async def test_an_upstream_at_its_limit_answers_busy_while_another_upstream_still_answers() -> None:
    async with (
        RawUpstream(hold=True) as busy,
        RawUpstream() as other,
        _client(pool_size=10, per_upstream=2, acquire_timeout=0.2) as client,
    ):
        held = [asyncio.ensure_future(_send(client, busy, "busy")) for _ in range(2)]
        await busy.wait_for_requests(2)
        with pytest.raises(UpstreamBusy) as refused:
            async with asyncio.timeout(BOUND):
                await _send(client, busy, "busy")
        assert refused.value.status_code == 503
        assert refused.value.headers() == {"Retry-After": "2"}
        assert "busy" in refused.value.message
        async with asyncio.timeout(BOUND):
            assert await _send(client, other, "other") == b"0"
            busy.release()
            assert await asyncio.gather(*held) == [b"0", b"0"]
            assert await _send(client, busy, "busy") == b"0"  # the slots came back


async def test_a_waiting_request_gets_the_next_free_connection() -> None:
    async with (
        RawUpstream(hold=True) as upstream,
        _client(pool_size=10, per_upstream=1, acquire_timeout=BOUND) as client,
    ):
        first = asyncio.ensure_future(_send(client, upstream, "r"))
        await upstream.wait_for_requests(1)
        second = asyncio.ensure_future(_send(client, upstream, "r"))
        await asyncio.sleep(0)
        assert not second.done() and len(upstream.heads) == 1  # waiting for the one slot
        upstream.release()
        async with asyncio.timeout(BOUND):
            assert list(await asyncio.gather(first, second)) == [b"0", b"0"]


async def test_the_total_is_shared_by_every_upstream() -> None:
    async with (
        RawUpstream(hold=True) as one,
        RawUpstream(hold=True) as two,
        _client(pool_size=2, per_upstream=2, acquire_timeout=0.2) as client,
    ):
        held = [
            asyncio.ensure_future(_send(client, one, "one")),
            asyncio.ensure_future(_send(client, two, "two")),
        ]
        await one.wait_for_requests(1)
        await two.wait_for_requests(1)
        with pytest.raises(UpstreamBusy):
            async with asyncio.timeout(BOUND):
                await _send(client, one, "one")
        one.release()
        two.release()
        async with asyncio.timeout(BOUND):
            assert await asyncio.gather(*held) == [b"0", b"0"]


async def test_a_failed_upstream_request_gives_its_connection_slot_back() -> None:
    async with (
        RawUpstream(slam=True) as broken,
        _client(pool_size=10, per_upstream=1, acquire_timeout=0.2) as client,
    ):
        for _ in range(3):  # a leaked slot would make the second one UpstreamBusy
            with pytest.raises(UpstreamError) as failed:
                async with asyncio.timeout(BOUND):
                    await _send(client, broken, "broken")
            assert not isinstance(failed.value, UpstreamBusy)


def _app(upstream: RawUpstream, **limits: Any) -> Any:
    settings = make_settings(
        routes=[{"prefix": "/raw/", "upstream": upstream.url, "auth": "none"}],
        limits=limits,
    )
    return create_app(settings)


async def test_expect_100_continue_reaches_an_upstream_that_never_sends_100() -> None:
    """Review finding 7: forwarded, the expectation made the forwarder wait for a 100 that this
    upstream never sends, while the upstream waited for the body."""
    async with RawUpstream() as upstream:
        app = _app(upstream)
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                async with asyncio.timeout(BOUND):
                    response = await client.post(
                        "/raw/upload", content=b"hello", headers={"Expect": "100-continue"}
                    )
        finally:
            await app.state.services.upstream.close()
    assert response.status_code == 200 and response.content == b"5"
    assert b"expect" not in upstream.heads[0].lower()


async def test_a_request_body_gone_quiet_is_408_and_its_upstream_connection_is_closed() -> None:
    """Review finding 2: the body streams (over buffered_body_bytes) and stops after one byte;
    the client gets 408 and the upstream sees the connection close mid-body."""
    async with RawUpstream() as upstream:
        app = _app(upstream, body_idle_timeout="100ms", buffered_body_bytes=0)
        sent: list[dict[str, Any]] = []
        parts = [{"type": "http.request", "body": b"x", "more_body": True}]

        async def receive() -> dict[str, Any]:
            if parts:
                return parts.pop()
            await asyncio.Event().wait()  # the client goes quiet
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/raw/upload",
            "raw_path": b"/raw/upload",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"gw"), (b"content-length", b"100")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        try:
            async with asyncio.timeout(BOUND):
                await app(scope, receive, send)
                await upstream.cut.wait()
        finally:
            await app.state.services.upstream.close()
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert b'"request_timeout"' in sent[1]["body"]
