"""Test doubles shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.proxy import UpstreamResponse


class RecordingUpstream:
    """An UpstreamClient that answers 200 and records the headers it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[list[tuple[str, str]]] = []

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
        self.sent.append(headers)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"ok"

        return UpstreamResponse(200, ((b"Content-Length", b"2"),), chunks(), _Released())  # type: ignore[arg-type]

    async def close(self) -> None:
        return None


class _Released:
    def release(self) -> None:
        return None
