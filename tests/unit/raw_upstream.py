"""A loopback HTTP/1.1 upstream whose answers each test writes byte by byte.

The upstream client's contract is about the wire: where a body ends, what a half-sent answer or
a silent server does to the client. A framework server (tests/e2e/servers.py) always answers
well; here a test's ``Script`` gets the parsed request and the raw writer, and returns whether
the connection may serve another request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

HEAD_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


Script = Callable[[ReceivedRequest, asyncio.StreamWriter], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> ReceivedRequest | None:
    """One request (Content-Length or chunked body), or None when the client hung up."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers = [
        (name.strip(), value.strip()) for name, _, value in (h.partition(":") for h in lines)
    ]
    framing = {name.lower(): value.lower() for name, value in headers}
    if framing.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")  # the (empty) trailer section
    else:
        body = await reader.readexactly(int(framing.get("content-length", "0")))
    return ReceivedRequest(method, target, headers, body)


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answer(
    status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] | None = None
) -> Script:
    """A script answering every request with ``body`` (Content-Length framed, keep-alive)."""

    async def script(request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        framing = [("Content-Length", str(len(body)))]
        writer.write(response_head(status, [*(headers or []), *framing]) + body)
        await writer.drain()
        return True

    return script


class RawUpstream:
    """The server of one test: every request and accepted connection recorded."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[ReceivedRequest] = []
        self.connections = 0
        self.released = asyncio.Event()  # set on exit: scripts waiting on it return
        self._writers: set[asyncio.StreamWriter] = set()
        self._idle = asyncio.Event()
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self._idle.clear()
        self.connections += 1
        try:
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                if not await self.script(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away midway, as some tests make it do
        finally:
            writer.close()
            self._writers.discard(writer)
            if not self._writers:
                self._idle.set()


@asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[RawUpstream]:
    """Serve ``script`` on an ephemeral loopback port until the block ends."""
    upstream = RawUpstream(script)
    server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0, limit=HEAD_LIMIT)
    port = server.sockets[0].getsockname()[1]
    upstream.url = f"http://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        # Scripts waiting on ``released`` return; closed sockets end the handlers' reads.
        upstream.released.set()
        server.close()
        if upstream._writers:
            for writer in list(upstream._writers):
                writer.close()
            async with asyncio.timeout(5):
                await upstream._idle.wait()
        await server.wait_closed()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
