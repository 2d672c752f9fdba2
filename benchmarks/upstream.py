"""A fast minimal upstream (asyncio + uvloop + httptools), for what nginx cannot do here.

It answers the benchmark's paths the way the nginx upstream does, so it stands in for nginx
where nginx is not installed, and it is always the sink of the 1 GiB upload (it reads a
request body to the end before answering, which nginx's ``return`` does not promise)::

    GET  /small.json   the same ~207-byte JSON as nginx
    GET  /1m.bin       1 MiB of zeros
    GET  /big?n=N      N bytes of zeros, streamed in 256 KiB writes
    POST /upload       reads the whole body, answers {"received": <bytes>}

    python -m benchmarks.upstream --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import json
from urllib.parse import parse_qs

import httptools
import uvloop

SMALL_JSON = json.dumps(
    {
        "id": "ord_7f3a9c",
        "status": "shipped",
        "customer": {"id": "cus_19ab", "name": "Jane Smith"},
        "items": [{"sku": "KB-104", "qty": 1, "price": "89.00"}],
        "total": "89.00",
        "currency": "EUR",
        "created_at": "2025-11-26T08:00:00Z",
    },
    separators=(",", ":"),
).encode()
ONE_MIB = 1024 * 1024
_ZEROS = bytes(256 * 1024)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._received = 0
        self._writer: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._respond(400, b"text/plain", b"bad request")
            if self._transport is not None:
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._received = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._received += len(body)

    def on_message_complete(self) -> None:
        parsed = httptools.parse_url(self._url)
        path = parsed.path
        if path == b"/small.json":
            self._respond(200, b"application/json", SMALL_JSON)
        elif path == b"/1m.bin":
            self._respond(200, b"application/octet-stream", bytes(ONE_MIB))
        elif path == b"/upload":
            body = json.dumps({"received": self._received}).encode()
            self._respond(200, b"application/json", body)
        elif path == b"/big":
            query = parse_qs((parsed.query or b"").decode())
            size = int(query.get("n", ["0"])[0])
            self._stream(size)
        else:
            self._respond(404, b"text/plain", b"not found")

    def _respond(self, status: int, content_type: bytes, body: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        head = b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (
            status,
            content_type,
            len(body),
        )
        self._transport.write(head + body)

    def _stream(self, size: int) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\n\r\n" % size
        )
        self._writer = asyncio.get_running_loop().create_task(self._write_zeros(size))

    async def _write_zeros(self, size: int) -> None:
        sent = 0
        while sent < size and self._transport is not None and not self._transport.is_closing():
            chunk = _ZEROS[: min(len(_ZEROS), size - sent)]
            self._transport.write(chunk)
            sent += len(chunk)
            # Flow control: wait while the transport's buffer is full, never queue 1 GiB.
            await self._can_write.wait()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
