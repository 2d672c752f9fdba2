"""In-process session store: the default for a single gateway process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ..errors import SessionEnded, SessionStoreUnavailable, TooManyPendingLogins
from ..retry_after import cap_retry_after
from .base import CachedToken, Session

if TYPE_CHECKING:
    from ..settings import Settings

MAX_PENDING_LOGINS = 10_000  # the default of session.max_pending_logins
_RETRY_AFTER = 2  # seconds, as the Redis store's refused writes


class MemorySessionStore:
    """Dict-backed store; expiry is checked on read and swept lazily.

    Sessions are kept as objects: ``load`` hands out the stored object itself, no copy per
    request (ownership: see ``SessionStore``). ``save`` keeps the object it is given and
    compacts its claims (``Session.compact``): ~400 bytes less per session.
    """

    def __init__(
        self,
        *,
        idle_timeout: float,
        clock: Callable[[], float] = time.time,
        max_pending_logins: int = MAX_PENDING_LOGINS,
    ) -> None:
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._max_pending_logins = max_pending_logins
        self._sessions: dict[str, tuple[Session, float]] = {}
        self._tokens: dict[str, dict[str, CachedToken]] = {}
        self._client_tokens: dict[str, CachedToken] = {}
        self._logins: dict[str, tuple[dict[str, Any], float]] = {}
        self._jtis: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._writes = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> MemorySessionStore:
        """Build the store from ``settings.session``."""
        return cls(
            idle_timeout=settings.session.idle_timeout,
            max_pending_logins=settings.session.max_pending_logins,
        )

    def _deadline(self, session: Session) -> float:
        return min(self._clock() + self.idle_timeout, session.absolute_expiry)

    async def save(self, session: Session) -> None:
        entry = self._sessions.get(session.id)
        if entry is None:
            if session.rt_version > 0:
                raise SessionEnded("the session has ended")
        elif entry[0].rt_version > session.rt_version:
            # Fencing, as the Redis store: an older refresh token never replaces a rotated one.
            raise SessionStoreUnavailable(
                "a newer refresh token is already stored; stale write refused",
                retry_after=_RETRY_AFTER,
            )
        session.compact()
        self._sessions[session.id] = (session, self._deadline(session))
        self._writes += 1
        if self._writes % 1024 == 0:
            self._sweep()

    async def load(self, session_id: str) -> Session | None:
        return self.load_now(session_id)

    def load_now(self, session_id: str) -> Session | None:
        """``load`` without a coroutine: nothing here waits (see SessionManager.current)."""
        entry = self._sessions.get(session_id)
        if entry is None:
            return None
        session, deadline = entry
        if self._clock() >= deadline:
            self._drop(session_id)
            return None
        return session

    async def touch(self, session: Session) -> None:
        # Slides the stored session's expiry and nothing else, as the Redis store: the caller's
        # object may be older than the stored one (a rotation since it was loaded).
        entry = self._sessions.get(session.id)
        if entry is None:
            return
        stored, deadline = entry
        now = self._clock()
        if now >= deadline:  # idle-expired, not yet swept: touch never revives
            return
        stored.last_seen = session.last_seen = now
        self._sessions[session.id] = (stored, self._deadline(stored))

    async def delete(self, session_id: str) -> Session | None:
        entry = self._sessions.get(session_id)
        self._drop(session_id)
        return entry[0] if entry else None

    async def find(self, *, sub: str | None = None, sid: str | None = None) -> list[str]:
        if sub is None and sid is None:
            return []
        now = self._clock()
        return [
            key
            for key, (session, deadline) in self._sessions.items()
            if now < deadline
            and (sub is None or session.sub == sub)
            and (sid is None or session.sid == sid)
        ]

    @asynccontextmanager
    async def refresh_lock(self, session_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            # Forget the lock once nobody holds or waits for it (bounded memory).
            if not lock.locked() and self._locks.get(session_id) is lock:
                waiters = getattr(lock, "_waiters", None)
                if not waiters:
                    del self._locks[session_id]

    async def get_token(self, session_id: str, key: str) -> CachedToken | None:
        token = self._tokens.get(session_id, {}).get(key)
        if token is not None and token.expires_at <= self._clock():
            return None
        return token

    async def put_token(self, session_id: str, key: str, token: CachedToken) -> None:
        if session_id in self._sessions:
            self._tokens.setdefault(session_id, {})[key] = token

    async def get_client_token(self, key: str) -> CachedToken | None:
        token = self._client_tokens.get(key)
        if token is not None and token.expires_at <= self._clock():
            del self._client_tokens[key]
            return None
        return token

    async def put_client_token(self, key: str, token: CachedToken) -> None:
        # One per client route's (audience, scopes) at most: bounded by the configuration.
        self._client_tokens[key] = token

    async def put_login(self, state: str, data: dict[str, Any], ttl: float) -> None:
        now = self._clock()
        logins = self._logins
        # Oldest first (every login has the same TTL): drop the expired ones at the front.
        while logins:
            oldest = next(iter(logins))
            if now < logins[oldest][1]:
                break
            del logins[oldest]
        if len(logins) >= self._max_pending_logins and state not in logins:
            # Anyone can start a login: refuse the new one rather than evict pending ones.
            oldest_expiry = next(iter(logins.values()))[1] if logins else now + ttl
            raise TooManyPendingLogins(
                "too many logins are pending; try again shortly",
                retry_after=cap_retry_after(oldest_expiry - now),
            )
        logins[state] = (data, now + ttl)

    async def pop_login(self, state: str) -> dict[str, Any] | None:
        entry = self._logins.pop(state, None)
        if entry is None or self._clock() >= entry[1]:
            return None
        return entry[0]

    async def remember_jti(self, jti: str, ttl: float) -> bool:
        now = self._clock()
        expires = self._jtis.get(jti)
        if expires is not None and now < expires:
            return False
        self._jtis[jti] = now + ttl
        if len(self._jtis) % 256 == 0:
            for key in [k for k, exp in self._jtis.items() if now >= exp]:
                del self._jtis[key]
        return True

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._sessions)

    def _drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._tokens.pop(session_id, None)

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, (_, deadline) in self._sessions.items() if now >= deadline]:
            self._drop(key)
        for state in [s for s, (_, exp) in self._logins.items() if now >= exp]:
            del self._logins[state]
