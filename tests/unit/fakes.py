"""Test doubles shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.proxy import UpstreamResponse


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

        return UpstreamResponse(200, ((b"Content-Length", b"2"),), chunks(), _Released())  # type: ignore[arg-type]

    async def close(self) -> None:
        return None


class _Released:
    def release(self) -> None:
        return None
