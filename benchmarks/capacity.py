"""The Redis capacity model's figures (README, "Redis capacity"), on a throwaway redis-server.

``python -m benchmarks.capacity [--sessions 1000000] [--spread 500]``:

1. Commands per request, from Redis's own ``INFO commandstats``: the gateway app (in process,
   an instant upstream, a fake token endpoint that rotates the refresh token) serves one
   request on each of ``--spread`` sessions (load spread over many sessions, not one hot one):
   first with nothing cached (a refresh: the token is exchanged), then again (a hit: the
   tracked cache), then from a second instance with a cold cache (a miss: read from Redis).
2. Bytes per session: one session as the gateway writes it (the record, two access tokens, its
   two index sets), copied ``--sessions`` times with DUMP/RESTORE; ``INFO memory``'s
   ``used_memory`` before and after, divided by the count (and MEMORY USAGE of each key).

Prints one JSON document. The machine's shared Redis is never used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import redis

from gateway import create_app
from gateway.oidc import TokenResponse
from gateway.settings import Settings
from tests.e2e.processes import redis_process

from .inprocess import InstantUpstream, _run, _scope

API = "https://api.example.com"
BILLING = "https://billing.example.com"
ID_TOKEN = "e" * 1000  # a typical signed ID token's length
ACCESS_TOKEN_LENGTH = 800  # a typical JWT access token


def _settings(url: str, prefix: str) -> Settings:
    return Settings(
        public_url="http://127.0.0.1:8000",
        oidc={"issuer": "http://127.0.0.1:9/", "client_id": "c", "client_secret": "s"},
        session={
            "store": "redis",
            "redis_url": url,
            "redis_key_prefix": prefix,
            "secret_key": ["capacity-benchmark-secret-key-0123456789"],
        },
        tokens={"allow_opaque": True},
        log={"level": "warning"},
        routes=[
            {"prefix": "/api/", "upstream": "http://127.0.0.1:9/", "audience": API},
            {"prefix": "/billing/", "upstream": "http://127.0.0.1:9/", "audience": BILLING},
        ],
    )


def _app(url: str, prefix: str) -> Any:
    app = create_app(_settings(url, prefix), upstream=InstantUpstream())
    gw = app.state.services
    gw.started = True
    counter = iter(range(10**9))

    async def refresh(refresh_token: str, *, audience: str, scopes: list[str]) -> TokenResponse:
        n = next(counter)
        return TokenResponse(
            access_token=f"{n:0{ACCESS_TOKEN_LENGTH}d}",
            expires_in=3600,
            refresh_token=f"rt-rotated-{n}",  # rotation on: every exchange saves the session
            id_token=None,
            scope=None,
            token_type="Bearer",
        )

    gw.oidc.refresh = refresh
    return app


def _commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _requests(app: Any, cookies: list[str], path: str) -> None:
    for cookie in cookies:
        await _run(app, _scope(path, cookie), 1)


async def _wait_live(app: Any) -> None:
    store = app.state.services.store
    deadline = time.monotonic() + 10
    while not store._cache.is_live and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def commands_per_request(url: str, spread: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    prefix = "gw:"
    first = _app(url, prefix)
    gw = first.state.services
    cookies = []
    for n in range(spread):
        _, set_cookie = await gw.sessions.create(
            sub=f"user-{n}@example.com",
            sid=f"idp-session-{n:08d}",
            refresh_token=f"rt-{n:040d}",
            id_token=ID_TOKEN,
            claims={
                "sub": f"user-{n}@example.com",
                "name": "Firstname Lastname",
                "email": f"user-{n}@example.com",
                "email_verified": True,
            },
        )
        cookies.append(set_cookie.split(";", 1)[0])
    await gw.store.load("0" * 64)  # starts the tracker
    await _wait_live(first)
    result: dict[str, Any] = {}
    for kind, app, path in (
        ("refresh", first, "/api/x"),
        ("reload_after_own_write", first, "/api/x"),
        ("hit", first, "/api/x"),
        ("refresh_second_audience", first, "/billing/y"),
    ):
        await asyncio.sleep(0.2)  # the invalidations of the previous pass have arrived
        client.config_resetstat()
        await _requests(app, cookies, path)
        result[kind] = _per_request(_commands(client), spread)
    second = _app(url, prefix)
    await second.state.services.store.load("0" * 64)
    await _wait_live(second)
    client.config_resetstat()
    await _requests(second, cookies, "/api/x")
    result["miss"] = _per_request(_commands(client), spread)
    for app in (first, second):
        await app.state.services.store.close()
    client.close()
    return result


def _per_request(calls: dict[str, int], requests: int) -> dict[str, Any]:
    calls.pop("ping", None)  # the invalidation connection's lease, per instance not request
    calls.pop("config|resetstat", None)
    calls.pop("config", None)
    total = sum(calls.values())
    # commandstats counts the commands a script runs too: the round trips on this path are
    # EVALSHA and the commands no script of the store runs (SET NX, HMGET, HGETALL).
    sent = sum(calls.get(name, 0) for name in ("evalsha", "set", "hmget", "hgetall"))
    return {
        "commands": round(total / requests, 2),
        "round_trips": round(sent / requests, 2),
        "by_command": calls,
    }


def bytes_per_session(url: str, count: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    # One session as the gateway wrote it above (record, tokens of two audiences, indexes).
    sess = next(k for k in client.scan_iter(match="gw:sess:*", count=1000))
    session_id = sess.decode().removeprefix("gw:sess:")
    sub_index = next(
        k
        for k in client.scan_iter(match="gw:idx:sub:*", count=1000)
        if client.sismember(k, session_id)
    )
    sid_index = next(
        k
        for k in client.scan_iter(match="gw:idx:sid:*", count=1000)
        if client.sismember(k, session_id)
    )
    keys = {"sess": sess, "tok": f"gw:tok:{session_id}".encode(), "idx:sub": sub_index}
    keys["idx:sid"] = sid_index
    usage = {name: int(client.memory_usage(key) or 0) for name, key in keys.items()}
    dumps = {name: client.dump(key) for name, key in keys.items()}
    client.flushdb()  # the throwaway server: only the copies are measured
    before = int(client.info("memory")["used_memory"])
    started = time.monotonic()
    batch = 2000
    for start in range(0, count, batch):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(start + batch, count)):
            name = f"{n:064x}"
            ttl = 8 * 3600 * 1000
            pipe.restore(f"gw:sess:{name}", ttl, dumps["sess"])
            pipe.restore(f"gw:tok:{name}", ttl, dumps["tok"])
            pipe.restore(f"gw:idx:sub:{name}", ttl, dumps["idx:sub"])
            pipe.restore(f"gw:idx:sid:{name}", ttl, dumps["idx:sid"])
        pipe.execute()
    after = int(client.info("memory")["used_memory"])
    client.close()
    return {
        "sessions": count,
        "bytes_per_session": round((after - before) / count),
        "used_memory_mib": round(after / 2**20),
        "memory_usage_per_key": usage,
        "seconds_to_write": round(time.monotonic() - started, 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with redis_process() as server:
        commands = await commands_per_request(server.url, args.spread)
        memory = bytes_per_session(server.url, args.sessions)
        return {"commands_per_request": commands, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--spread", type=int, default=500, help="sessions the requests use")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
