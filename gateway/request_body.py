"""The client's request body on its way upstream: counted, bounded in idle time, small ones
read whole first.

A body that stops arriving held its upstream connection for as long as the client liked: uvicorn
has no body timeout, and 1,000 such requests on a public route starved every route of the one
shared pool (issue "Findings of an adversarial review", item 2). So each wait for the next part
of the body is bounded (``limits.body_idle_timeout``: then ``408``, and the upstream request is
abandoned, its connection closed), and a body declared small (``limits.buffered_body_bytes``) is
read whole before an upstream connection is taken at all, so a slow sender holds none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.types import Message, Receive

from .errors import ClientDisconnected, GatewayError, PayloadTooLarge, RequestBodyTimeout


async def read_small_body(request: Request, limit: int) -> bytes:
    """The whole body of a request to one of the gateway's own endpoints, at most ``limit``
    bytes (413 as soon as its Content-Length or what has arrived says more)."""
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
    return bytes(body)


# A request sent again (a new token after the upstream's invalid_token) carries its body again:
# only a body read whole, and no larger than this.
RETRY_BODY_LIMIT = 64 * 1024


class RequestBody:
    """The client's request body as an async iterator, counted against the route's limit.

    ``failure`` is what cut it short (the forwarder may report it as its own error; the proxy
    answers this one instead). ``declared``: its Content-Length, or None when chunked.
    """

    __slots__ = ("_buffered", "_receive", "buffer_up_to", "declared", "failure", "idle", "limit")

    def __init__(
        self,
        receive: Receive,
        limit: int,
        *,
        idle: float = 0.0,
        declared: int | None = None,
        buffer_up_to: int = 0,
    ) -> None:
        self._receive = receive
        self.limit = limit
        self.idle = idle  # seconds; 0: wait for ever
        self.declared = declared
        self.buffer_up_to = buffer_up_to
        self.failure: GatewayError | None = None
        self._buffered: list[bytes] | None = None

    @property
    def replayable(self) -> bool:
        """Read whole, and small (at most ``RETRY_BODY_LIMIT``): it can be sent again."""
        return (
            self._buffered is not None
            and self.declared is not None
            and self.declared <= RETRY_BODY_LIMIT
        )

    @property
    def too_large(self) -> bool:
        return isinstance(self.failure, PayloadTooLarge)

    async def ready(self) -> AsyncIterator[bytes]:
        """The body to send upstream: read whole first when its declared length is at most
        ``buffer_up_to``, so that no upstream connection waits on the client."""
        if self.declared is not None and self.declared <= self.buffer_up_to:
            self._buffered = [chunk async for chunk in self._chunks()]
        return self.__aiter__()

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._buffered is not None:
            return _replay(self._buffered)
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        total = 0
        while True:
            message = await (self._next_message() if self.idle else self._receive())
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk: bytes = message.get("body", b"")
            total += len(chunk)
            if self.limit and total > self.limit:
                self.failure = PayloadTooLarge(f"the request body is over {self.limit} bytes")
                raise self.failure
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def _next_message(self) -> Message:
        try:
            async with asyncio.timeout(self.idle):
                return await self._receive()
        except TimeoutError:
            self.failure = RequestBodyTimeout(
                f"the request body sent nothing for {self.idle:g} seconds"
            )
            raise self.failure from None


async def _replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
