"""RSS of N sessions in the memory store, measured in a fresh process (issue 6, item 5).

Sessions are created through the store API (``MemorySessionStore.save``) with realistic
contents: a 130-character refresh token (Auth0's rotating ones are about that long), a
1,000-character ID token (kept for RP-initiated logout), the public claims the callback keeps,
and, with ``--tokens``, one ~800-character access token cached per session (``put_token``).
Every string is distinct, as in real traffic. Prints one JSON line.

    python -m benchmarks.memory --count 100000 [--tokens]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import time

from gateway.security import new_secret_token, session_id_for
from gateway.sessions.base import CachedToken, Session
from gateway.sessions.memory import MemorySessionStore

from .machine import mib, rss_bytes

REFRESH_TOKEN_CHARS = 130
ID_TOKEN_CHARS = 1000
ACCESS_TOKEN_CHARS = 800


def _text(chars: int) -> str:
    return secrets.token_urlsafe(chars)[:chars]


def make_session(now: float) -> Session:
    user = secrets.token_hex(12)
    name = f"User {user[:8]}"
    sub = f"auth0|{user}"  # one string, as in the callback: sub=str(claims["sub"])
    return Session(
        id=session_id_for(new_secret_token()),
        sub=sub,
        sid=secrets.token_urlsafe(24),
        refresh_token=_text(REFRESH_TOKEN_CHARS),
        id_token=_text(ID_TOKEN_CHARS),
        claims={
            "sub": sub,
            "name": name,
            "given_name": "User",
            "family_name": user[:8],
            "nickname": user[:8],
            "email": f"{user[:8]}@example.com",
            "email_verified": True,
            "picture": f"https://s.gravatar.com/avatar/{secrets.token_hex(16)}?s=480&r=pg",
            "locale": "en",
        },
        created_at=now,
        absolute_expiry=now + 7 * 86400,
        last_seen=now,
    )


async def fill(count: int, *, tokens: bool) -> MemorySessionStore:
    store = MemorySessionStore(idle_timeout=8 * 3600)
    now = time.time()
    for _ in range(count):
        session = make_session(now)
        await store.save(session)
        if tokens:
            token = CachedToken(
                access_token=_text(ACCESS_TOKEN_CHARS),
                expires_at=now + 3600,
                audience="https://api.example.com",
                scope="read:orders",
                issued_at=now,
            )
            await store.put_token(session.id, "https://api.example.com read:orders", token)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--tokens", action="store_true", help="one cached access token each")
    args = parser.parse_args()
    gc.collect()
    before = rss_bytes(os.getpid())
    started = time.perf_counter()
    store = asyncio.run(fill(args.count, tokens=args.tokens))
    seconds = time.perf_counter() - started
    gc.collect()
    after = rss_bytes(os.getpid())
    print(
        json.dumps(
            {
                "sessions": len(store),
                "tokens": args.tokens,
                "rss_before_mib": round(mib(before), 1),
                "rss_total_mib": round(mib(after), 1),
                "bytes_per_session": round((after - before) / max(1, len(store))),
                "seconds": round(seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
