"""The baseline: the least a streaming reverse proxy on the gateway's stack can do.

Raw ASGI on uvicorn (uvloop + httptools) and one pooled aiohttp ClientSession configured as the
gateway's forwarder is (no cookie jar, no decompression, keep-alive): every request goes to the
same upstream, path and query unchanged, hop-by-hop headers dropped (and the upstream's Date, for
uvicorn's own), bodies streamed both ways.
No routing, sessions, tokens, metrics or logging. The gateway's cost is measured against this.
The process runs with the gateway's allocator setting (gateway/allocator.py: freed buffers are
kept for reuse), as ``gateway run`` does: without it the 1 MiB cells measure page faults, not
the proxies.

    python -m benchmarks.bare_proxy --port 8001 --upstream http://127.0.0.1:8080 [--client httpx]

``--client httpx`` forwards with one pooled ``httpx.AsyncClient`` instead, streaming the same
way: the measurement behind the choice of aiohttp for forwarding (gateway/proxy.py).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import uvicorn
from yarl import URL

from gateway.allocator import keep_freed_memory

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
# Nor, in an answer, the upstream's Date: uvicorn writes its own (two are invalid), as the gateway.
_NOT_RELAYED = _HOP_BY_HOP | {b"date"}
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class BareProxy:
    """ASGI app forwarding everything to one upstream origin."""

    def __init__(self, upstream: str) -> None:
        self._origin = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30),
            )
        return self._session

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._session is not None:
                        await self._session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope["query_string"]
        url = self._origin + raw_path.decode("latin-1")
        if query:
            url += "?" + query.decode("latin-1")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in _HOP_BY_HOP
        ]
        has_body = method not in _BODYLESS or any(
            k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"]
        )

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        try:
            response = await self._client().request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=body() if has_body else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k, v) for k, v in response.raw_headers if k.lower() not in _NOT_RELAYED
                    ],
                }
            )
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.release()


class BareHttpxProxy(BareProxy):
    """The same proxy on httpx's client (the IdP client of the gateway)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._httpx = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000),
            timeout=httpx.Timeout(30.0, connect=10.0),
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        url = self._origin + raw_path.decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        has_body = scope["method"] not in _BODYLESS

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return

        request = self._httpx.build_request(
            scope["method"], url, headers=headers, content=body() if has_body else None
        )
        response = await self._httpx.send(request, stream=True)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v) for k, v in response.headers.raw if k.lower() not in _NOT_RELAYED
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:8080")
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp")
    args = parser.parse_args()
    app = BareHttpxProxy if args.client == "httpx" else BareProxy
    keep_freed_memory()
    uvicorn.run(
        app(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
