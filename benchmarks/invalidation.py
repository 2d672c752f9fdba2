"""How long a write takes to reach another instance's tracked cache, under load.

``python -m benchmarks.invalidation [--redis URL] [--probes 300] [--workers 64]``: instance A
(a RedisSessionStore) serves ``--workers`` concurrent loads over ``--sessions`` sessions in its
event loop; instance B, in another thread with its own loop and connections, rewrites one of
A's cached sessions at a time. The delay of a probe runs from just before B sends its write to
the moment A's invalidation connection hands the key to the cache (both on the same
``time.perf_counter`` clock). Prints p50, p99 and the worst probe.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from dataclasses import replace

from gateway.crypto import SessionCipher
from gateway.errors import SessionStoreUnavailable
from gateway.sessions import Session
from gateway.sessions.redis import RedisSessionStore

KEY = "invalidation-benchmark-secret-key-0123456789"


def _store(url: str, prefix: str) -> RedisSessionStore:
    return RedisSessionStore(
        url=url, key_prefix=prefix, idle_timeout=600, cipher=SessionCipher([KEY])
    )


def _session(i: int) -> Session:
    now = time.time()
    return Session(
        id=f"{i:064x}",
        sub=f"user-{i}",
        refresh_token=f"rt-{i}",
        created_at=now,
        absolute_expiry=now + 3600,
        sid=f"sid-{i}",
        claims={"sub": f"user-{i}"},
    )


async def _measure(args: argparse.Namespace) -> list[float]:
    prefix = f"gw-invalidation-{os.getpid()}-{time.time_ns()}:"
    a = _store(args.redis, prefix)
    sessions = [_session(i) for i in range(args.sessions)]
    for session in sessions:
        await a.save(session)
    await a.load(sessions[0].id)
    while not a._cache.is_live:  # noqa: ASYNC110 (polls another object's state)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    arrived: dict[str, float] = {}
    if a.tracker is not None:
        a.tracker.on_invalidated = lambda key, _t: arrived.setdefault(key, time.perf_counter())
    stop = asyncio.Event()

    async def load_forever(n: int) -> None:
        while not stop.is_set():
            try:
                await a.load(sessions[n % len(sessions)].id)
            except SessionStoreUnavailable:  # a loaded machine: a miss may time out
                await asyncio.sleep(0.01)
            n += 1

    workers = [asyncio.create_task(load_forever(i)) for i in range(args.workers)]
    await asyncio.sleep(1.0)
    delays: list[float] = []
    loop = asyncio.get_running_loop()
    for probe in range(args.probes):
        session = sessions[probe % len(sessions)]
        key = f"{prefix}sess:{session.id}"
        arrived.pop(key, None)
        sent = await loop.run_in_executor(None, _write, args.redis, prefix, session, probe)
        deadline = time.monotonic() + 10
        while key not in arrived and time.monotonic() < deadline:  # noqa: ASYNC110 (polls another object's state)
            await asyncio.sleep(0.0005)
        if key in arrived:
            delays.append((arrived[key] - sent) * 1000)
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*workers)
    for session in sessions:
        await a.delete(session.id)
    await a.close()
    return delays


_writer: dict[int, tuple[asyncio.AbstractEventLoop, RedisSessionStore]] = {}


def _write(url: str, prefix: str, session: Session, probe: int) -> float:
    """Instance B's write, from its own thread and loop; returns when it was sent."""
    ident = threading.get_ident()
    if ident not in _writer:
        loop = asyncio.new_event_loop()
        _writer[ident] = (loop, loop.run_until_complete(_make(url, prefix)))
    loop, b = _writer[ident]
    sent = time.perf_counter()
    loop.run_until_complete(b.save(replace(session, refresh_token=f"rt-{probe}")))
    return sent


async def _make(url: str, prefix: str) -> RedisSessionStore:
    return _store(url, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args()
    delays = sorted(asyncio.run(_measure(args)))
    if not delays:
        raise SystemExit("no invalidation arrived")
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    print(
        f"{len(delays)}/{args.probes} probes, {args.workers} concurrent loads: "
        f"p50 {statistics.median(delays):.2f} ms, p99 {p99:.2f} ms, worst {delays[-1]:.2f} ms"
    )


if __name__ == "__main__":
    main()
