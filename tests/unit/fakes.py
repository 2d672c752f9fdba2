"""Test doubles shared by the unit tests."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.observability import JSONFormatter
from gateway.proxy import UpstreamResponse
from gateway.sessions import Session


class RecordingUpstream:
    """An UpstreamClient that drains the body, answers 200 ``ok`` and records every call as
    (url, headers it was asked to send)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

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
        if body is not None:
            async for _ in body:
                pass
        self.calls.append((url, headers))

        async def chunks() -> AsyncIterator[bytes]:
            yield b"ok"

        return UpstreamResponse(200, ((b"Content-Length", b"2"),), chunks(), close=_released)

    async def close(self) -> None:
        return None


def _released() -> None:
    return None


def scribble_on(session: Session) -> None:
    """What SessionManager.current does to a loaded session before touch, and what a careless
    caller could do: change its fields and (read-only by contract, a dict at run time) its
    claims. A store that hands out shared objects would let this reach other requests."""
    session.last_seen = 1.0
    session.refresh_token = "RT-changed"
    session.rt_version = 7
    claims = session.claims
    assert isinstance(claims, dict)
    claims["email"] = "mallory@example.com"
    claims.pop("roles", None)


class FormattingHandler(logging.Handler):
    """Formats at emit time, in the request's context, as the StreamHandler in production (a
    record formatted later has lost the request id its context carried)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JSONFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


class LoopbackAiohttpServer:
    """An aiohttp server on an ephemeral loopback port answering every GET with
    :meth:`_handle`; ``url`` once started."""

    def __init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError
