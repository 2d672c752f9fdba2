"""Slow request bodies against a real gateway, and what a user on another route waits meanwhile.

Review finding 2: connections that each send ``POST`` with a ``Content-Length``, one byte of
body, then nothing. Used by tests/e2e/test_slow_bodies.py and benchmarks/slow_bodies.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from .servers import Upstream

OPEN_BATCH = 100  # connections opened at once
STATUS_LINE_TIMEOUT = 30.0


def raise_fd_limit(needed: int) -> None:
    """Raise this process's open-file limit to ``needed`` (within the hard limit), or fail
    with a message that says what to do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(f"needs {needed} open files, the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass
class SlowSenders:
    """Open connections, each in the middle of sending its request body."""

    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]

    async def statuses(self, timeout: float = STATUS_LINE_TIMEOUT) -> list[int | None]:
        """The status each connection was answered with (None: none within ``timeout``)."""

        async def status(reader: asyncio.StreamReader) -> int | None:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except (TimeoutError, ConnectionError):
                return None
            parts = line.split()
            return int(parts[1]) if len(parts) > 1 else None

        return list(await asyncio.gather(*(status(r) for r, _ in self.connections)))

    async def close(self) -> None:
        for _, writer in self.connections:
            writer.close()
        for _, writer in self.connections:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def slow_senders(
    base_url: str, path: str, count: int, *, declared: int
) -> AsyncIterator[SlowSenders]:
    """``count`` connections that sent the head of ``POST path`` (``Content-Length: declared``)
    and one byte of its body; closed on exit."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\nx"
    ).encode()

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head)
        await writer.drain()
        return reader, writer

    senders = SlowSenders([])
    try:
        for start in range(0, count, OPEN_BATCH):
            batch = min(OPEN_BATCH, count - start)
            senders.connections += await asyncio.gather(*(one() for _ in range(batch)))
        yield senders
    finally:
        await senders.close()


async def timed_get(
    client: httpx.AsyncClient, url: str, *, headers: dict[str, str], timeout: float
) -> tuple[float, int | None]:
    """Seconds until the answer to ``GET url`` and its status (None: none within ``timeout``)."""
    started = time.perf_counter()
    try:
        response = await client.get(url, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        return time.perf_counter() - started, None
    return time.perf_counter() - started, response.status_code


async def wait_for_connections(upstream: Upstream, count: int, *, at_most: float) -> None:
    """Until ``upstream`` holds ``count`` connections of the gateway (what slow bodies did to
    the old shared pool), or ``at_most`` seconds: the gateway reads 1,000 request heads in a
    moment, and a victim sent before that would overtake them. (Once slow senders hold no
    upstream connection, nothing says the heads were read: the bound is the wait.)"""
    deadline = time.monotonic() + at_most
    while upstream.open_connections() < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
