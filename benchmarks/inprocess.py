"""The gateway's own cost per request, without a network: the ASGI app called directly.

A fake upstream answers at once with a 207-byte JSON, so what is measured is the gateway's code
path alone (middleware, routing, session, token cache, header rewriting, relay), per route kind:
``auth: none`` and a token route (session + cached token), beside ``bare``: the bare proxy's
per-request work over the same fake upstream. With ``--upstream URL`` both use a real upstream
through their real aiohttp clients (only uvicorn is left out). Deterministic enough to compare two
versions of the code on one machine in seconds, where wrk's req/s moves with background load:

    .venv/bin/python -m benchmarks.inprocess            # best of 5 x 5,000 requests per kind
    .venv/bin/python -m benchmarks.inprocess --profile  # plus a cProfile of the token route
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import time
from collections.abc import AsyncIterator
from typing import Any

from gateway import create_app
from gateway.dpop import DPoPBound, DPoPKey
from gateway.proxy import UpstreamResponse
from gateway.sessions.base import CachedToken
from gateway.settings import Settings

from .upstream import SMALL_JSON

API = "https://api.example.com"
_SETTINGS: dict[str, Any] = {
    "public_url": "http://127.0.0.1:8000",
    "oidc": {
        "issuer": "http://127.0.0.1:9/",
        "client_id": "bench",
        "client_secret": "bench-secret",
    },
    "session": {"secret_key": "x" * 48},
    "log": {"level": "warning"},
    "routes": [
        {"prefix": "/api/", "upstream": "http://127.0.0.1:9/", "audience": API},
        {"prefix": "/pub/", "upstream": "http://127.0.0.1:9/", "auth": "none"},
    ],
}
_UPSTREAM_HEADERS = (
    (b"Server", b"nginx"),
    (b"Date", b"Thu, 26 Nov 2026 10:00:00 GMT"),
    (b"Content-Type", b"application/json"),
    (b"Content-Length", str(len(SMALL_JSON)).encode()),
    (b"Connection", b"keep-alive"),
)


class _Body:
    def __init__(self) -> None:
        self._sent = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if self._sent:
            raise StopAsyncIteration
        self._sent = True
        return SMALL_JSON

    def at_eof(self) -> bool:
        return self._sent


def _released() -> None:
    return None


class InstantUpstream:
    """An UpstreamClient that answers every request at once with the small JSON."""

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
        body_iter = _Body()
        return UpstreamResponse(
            200,
            _UPSTREAM_HEADERS,
            body_iter,
            close=_released,
            at_eof=body_iter.at_eof,
        )

    async def close(self) -> None:
        return None


_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"host", b"te"})
_NOT_RELAYED = _HOP_BY_HOP | {b"date"}


class BareInProcess:
    """benchmarks/bare_proxy.py's per-request work over the same InstantUpstream: the floor
    that the gateway's kinds are compared with."""

    def __init__(self) -> None:
        self._upstream = InstantUpstream()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope["query_string"]
        url = "http://127.0.0.1:9" + raw_path.decode("latin-1")
        if query:
            url += "?" + query.decode("latin-1")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in _HOP_BY_HOP
        ]
        response = await self._upstream.send(
            scope["method"], url, headers, None, timeout=30, route="bare"
        )
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(k, v) for k, v in response.headers if k.lower() not in _NOT_RELAYED],
            }
        )
        async for chunk in response.body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        response.close()


def _scope(path: str, cookie: str) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"wrk"),
        (b"accept", b"*/*"),
        (b"x-csrf", b"1"),
    ]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


async def _prepare(
    upstream_url: str | None, redis_url: str | None = None, *, dpop: bool = False
) -> tuple[Any, str]:
    """The app and a session cookie with a cached token; ``redis_url``: the Redis store with
    its tracked cache; ``dpop``: tokens.dpop required, the session's key made at login and its
    cached token DPoP-bound (a proof per request)."""
    settings = dict(_SETTINGS)
    if redis_url:
        # The Redis store with its tracked cache: a hit makes no round trip (the prefix is
        # this run's own; its keys expire with the session's idle timeout).
        settings["session"] = {
            "store": "redis",
            "redis_url": redis_url,
            "redis_key_prefix": f"gw-inprocess-{os.getpid()}-{time.time_ns()}:",
            "secret_key": ["inprocess-benchmark-secret-key-0123456789"],
            "idle_timeout": 600,
        }
    if upstream_url:
        settings["routes"] = [dict(r, upstream=upstream_url) for r in _SETTINGS["routes"]]
    if dpop:
        settings["tokens"] = {"dpop": "required"}
    fake = None if upstream_url else InstantUpstream()
    app = create_app(Settings(**settings), upstream=fake)
    gw = app.state.services
    gw.started = True  # no IdP: discovery and JWKS are not needed for a cached token
    session, set_cookie = await gw.sessions.create(
        sub="user-1",
        sid="sid-1",
        refresh_token="rt",
        id_token=None,
        claims={"sub": "user-1"},
        dpop_jwk=DPoPKey.generate().to_jwk() if dpop else None,
    )
    cookie = set_cookie.split(";", 1)[0]
    # A token of a real one's size (an RS256 JWT of ~800 characters): the proof hashes it.
    value = "at" if not dpop else DPoPBound("e" * 800)
    token = CachedToken(access_token=value, expires_at=time.time() + 3600, audience=API)
    gw.broker._cache.put((session.id, API, ""), token)
    tracker = getattr(gw.store, "tracker", None)
    if tracker is not None:  # wait until the tracked cache serves hits
        await gw.store.load(session.id)
        deadline = time.monotonic() + 10
        while not gw.store._cache.is_live and time.monotonic() < deadline:  # noqa: ASYNC110 (polls another object's state)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # our own save's invalidation comes back
    return app, cookie


async def _run(app: Any, scope: dict[str, Any], count: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.perf_counter()
    for _ in range(count):
        await app(dict(scope, headers=list(scope["headers"])), receive, send)
    elapsed = time.perf_counter() - started
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses: {sorted(set(statuses))}")
    return elapsed / count * 1e6


async def main_async(args: argparse.Namespace) -> None:
    app, cookie = await _prepare(args.upstream, args.redis)
    dpop_app, dpop_cookie = await _prepare(args.upstream, args.redis, dpop=True)
    bare: Any = BareInProcess()
    if args.upstream:
        from .bare_proxy import BareProxy  # the benchmark's bare proxy app itself

        bare = BareProxy(args.upstream)
    kinds = {
        "bare": (bare, _scope("/small.json", "")),
        "auth: none": (app, _scope("/pub/small.json", "")),
        "token route": (app, _scope("/api/small.json", cookie)),
        "dpop token route": (dpop_app, _scope("/api/small.json", dpop_cookie)),
    }
    for name, (target, scope) in kinds.items():
        if args.kind and name != args.kind:
            continue
        await _run(target, scope, args.warmup)
        best = min([await _run(target, scope, args.requests) for _ in range(args.rounds)])
        print(f"{name:12s} {best:6.1f} µs/request (best of {args.rounds} x {args.requests})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        target, scope = kinds[args.profile_kind]
        await _run(target, scope, args.requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-kind", default="token route")
    parser.add_argument(
        "--kind", help="only this kind: bare, 'auth: none', 'token route' or 'dpop token route'"
    )
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument(
        "--upstream",
        help="a real upstream (e.g. nginx serving /small.json): the gateway's aiohttp client "
        "and benchmarks/bare_proxy.py's app instead of the instant fake",
    )
    parser.add_argument("--redis", help="a Redis URL: the gateway on the Redis store")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
