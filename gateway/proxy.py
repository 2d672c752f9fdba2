"""Streaming forwarder: one pooled upstream client behind a small interface.

aiohttp's client forwards; httpx stays for the IdP calls. The choice is by measurement: under
64 concurrent connections httpx's pool spends a third of the CPU polling pooled connections and
is 5-7x slower than aiohttp's client here (see benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from yarl import URL

from .errors import GatewayError, UpstreamError, UpstreamTimeout
from .settings import UpstreamPoolSettings
from .upstream_slots import Slots, UpstreamSlots

logger = logging.getLogger("gateway.proxy")

_CHUNK = 64 * 1024


def _unknown_eof() -> bool:
    return False


@dataclass(slots=True)
class UpstreamResponse:
    """Status and headers of an upstream answer; ``body`` streams it; ``close`` releases it.

    ``at_eof``: the whole body has been read (the chunk just read was the last); always False
    when the client cannot tell. Both are the client's own callables, called as they are (no
    wrapper call per request)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: AsyncIterator[bytes]
    close: Callable[[], None]
    at_eof: Callable[[], bool] = _unknown_eof


class UpstreamClient(Protocol):
    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        *,
        timeout: float,
        route: str,
    ) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class AiohttpUpstreamClient:
    """Forwards with one shared aiohttp ClientSession (keep-alive pool, no cookie jar, no
    decompression: bytes pass through exactly as the upstream sent them).

    Requests in flight are bounded per upstream and in all (:class:`UpstreamSlots`), with a
    bounded wait for a free one; aiohttp's own connector limit is off (the slots are it).
    """

    def __init__(
        self,
        *,
        pool_size: int = 1000,
        per_upstream: int | None = None,
        acquire_timeout: float = 5.0,
    ) -> None:
        self._slots = UpstreamSlots(
            total=pool_size,
            per_upstream=pool_size if per_upstream is None else per_upstream,
            acquire_timeout=acquire_timeout,
        )
        self._slots_by_route: dict[str, Slots] = {}  # route names come from the config
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}  # per route timeout, built once

    @classmethod
    def from_settings(cls, pool: UpstreamPoolSettings) -> AiohttpUpstreamClient:
        return cls(
            pool_size=pool.max_connections,
            per_upstream=pool.max_connections_per_upstream,
            acquire_timeout=pool.acquire_timeout,
        )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        *,
        timeout: float,
        route: str,
    ) -> UpstreamResponse:
        client_timeout = self._timeouts.get(timeout)
        if client_timeout is None:
            client_timeout = self._timeouts[timeout] = aiohttp.ClientTimeout(
                total=None, sock_connect=min(timeout, 10.0), sock_read=timeout
            )
        slots = self._slots_by_route.get(route)
        if slots is None:
            # The upstream's origin: scheme://host:port, up to the path (always present).
            origin = url[: url.find("/", url.find("//") + 2)]
            slots = self._slots_by_route[route] = self._slots.for_origin(origin)
        if not self._slots.try_take(slots):
            await self._slots.take(slots, route)
        try:
            response = await self._client().request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=client_timeout,
            )
        except BaseException as exc:
            self._slots.give_back(slots)
            # The request body's own failure (413, 408, the client gone) stays what it is, and
            # so do cancellation, KeyboardInterrupt and SystemExit: only the client's errors map.
            if isinstance(exc, GatewayError) or not isinstance(exc, Exception):
                raise
            raise map_upstream_error(exc, route) from exc
        return UpstreamResponse(
            response.status,
            response.raw_headers,
            _Body(response, route),
            _Release(response, self._slots, slots).close,
            response.content.at_eof,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Release:
    """Closes an upstream answer: its connection back to the pool (or closed), its slot
    given back, once."""

    __slots__ = ("_pool", "_response", "_slots")

    def __init__(
        self, response: aiohttp.ClientResponse, pool: UpstreamSlots, slots: Slots | None
    ) -> None:
        self._response = response
        self._pool = pool
        self._slots = slots

    def close(self) -> None:
        self._response.release()
        slots, self._slots = self._slots, None
        if slots is not None:
            self._pool.give_back(slots)


def map_upstream_error(exc: BaseException, route: str) -> BaseException:
    """aiohttp/asyncio failures -> the error tree (timeouts 504, everything else 502)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"upstream of route {route} timed out")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamError(f"upstream of route {route} is unavailable")
    if isinstance(exc, asyncio.CancelledError):
        return exc
    return UpstreamError(f"upstream of route {route} failed ({type(exc).__name__})")


class _Body:
    """The upstream body as an async iterator of chunks, as they arrive.

    A class, not an async generator: asyncio registers every async generator in a weak set on
    its first iteration (and finalises it in a task when left early); on the hot path that
    cost more than the iteration itself.
    """

    __slots__ = ("_content", "_route")

    def __init__(self, response: aiohttp.ClientResponse, route: str) -> None:
        self._content = response.content
        self._route = route

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Headers are already sent: all we can do is end the stream early, and say so.
            logger.warning(
                "upstream of route %s broke mid-body (%s)", self._route, type(exc).__name__
            )
            raise UpstreamError(f"upstream of route {self._route} broke mid-body") from exc
        if not chunk:
            raise StopAsyncIteration
        return chunk
