"""Redis session store: sessions shared by every gateway instance, encrypted at rest.

Key layout (under ``key_prefix``)::

    sess:<id>             HASH  d = AES-GCM(Session JSON), exp = idle deadline, seen, rtv
    tok:<id>              HASH  sha256(cache key) -> AES-GCM(CachedToken JSON); TTL of sess
    login:<state>         STRING AES-GCM(pending login); single use through GETDEL
    logins                ZSET  pending login states by expiry: at most max_pending_logins
    idx:sub:<sha256(sub)> SET   session ids, for back-channel logout; TTL >= its members'
    idx:sid:<sha256(sid)> SET   idem, by the IdP's session id
    lock:<id>             STRING random token of the refresh-lock holder (a lease)
    jti:<sha256(jti)>     STRING back-channel logout token ids seen, until the token expires
    client-tok:<sha256>   STRING AES-GCM(the gateway's client-credentials token), until it expires

In cluster mode (``session.redis_mode: cluster``) the id in ``sess``, ``tok`` and ``lock`` is a
hash tag (``sess:{<id>}``): every key of one session is in one slot, so the scripts that update
them together run on one node. The indexes are in their own slots and kept outside those
scripts (index first, then the session: a crash in between leaves only an index member that
``find`` prunes). Pending logins share the tag ``{logins}`` with the set that bounds them.
Client tokens and their lock (``lock:{client:<digest>}``) are single-key operations.

Reads are served from a per-instance cache of decoded values (``_client_cache``) kept coherent
by Redis client tracking (``_tracking``): a hit costs no round trip, a write by any instance
invalidates it within the time an invalidation takes to arrive (benchmarks/README.md), and if
the invalidation connection is lost or silent the whole cache is dropped.

Every ciphertext is bound to its key name (AES-GCM associated data), so a value copied under
another key does not decrypt. Redis TTLs enforce the idle and absolute timeouts; the idle
deadline is also kept in clear (``exp``) and checked on read against the injected clock, so a
store behaves like the memory store when tests move a fake clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ..crypto import DecryptionFailed, SessionCipher
from ..errors import ConfigError, SessionEnded, SessionStoreUnavailable, TooManyPendingLogins
from ..retry_after import cap_retry_after
from . import _redis_scripts as scripts
from ._client_cache import MISS, ClientCache
from ._redis_connect import REDIS_ERRORS, RedisEndpoints, connect, endpoints_of
from ._session_cache import SessionCache
from ._tracking import InvalidationTracker
from .base import LOAD_LATER, CachedToken, Session, _LoadLater

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["RedisSessionStore"]

logger = logging.getLogger(__name__)

_RETRY_AFTER = 2
_LOCK_POLL_MIN = 0.005
_LOCK_POLL_MAX = 0.1
_DPOP_NONCE_TTL_MS = 3_600_000  # a DPoP nonce older than this is stale anyway
# Decoded sessions kept per instance: ~3.2 KB each with a 1,000-character ID token, ~13 MiB.
DECODED_CACHE_SIZE = 4096
MAX_PENDING_LOGINS = 10_000  # the default of session.max_pending_logins
CACHE_SIZE = 100_000  # the default of session.redis_cache_size
CACHE_LEASE = 1.0  # the default of session.redis_cache_lease

# A cached ``sess`` key: (decoded session with its last_seen, idle deadline), or None (no key).
_SessionEntry = tuple[Session | None, float]


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _bytes(value: bytes | str | None) -> bytes | None:
    # The client is built without decode_responses, so replies are bytes; str only in typing.
    return value.encode() if isinstance(value, str) else value


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _float(value: bytes | str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _LocalLock:
    """Serialises this instance's tasks before they compete for the Redis lock."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class RedisSessionStore:
    """SessionStore on Redis (``redis.asyncio``); the store for more than one gateway instance.

    ``refresh_lock`` is a lease (``SET NX PX``) renewed while held, and a ``save`` made while
    holding it is fenced on the lock token: if the lease was lost, the write is refused rather
    than storing a refresh token another holder may already have rotated.

    ``load`` and ``get_token`` answer from the tracked cache when they can (see the module
    docstring); on a miss they read Redis, and decrypt and parse only a blob not decoded
    before (``_session_cache``).
    """

    def __init__(
        self,
        *,
        url: str,
        key_prefix: str,
        idle_timeout: float,
        cipher: SessionCipher,
        pool_size: int = 50,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = 15.0,
        decoded_cache_size: int = DECODED_CACHE_SIZE,
        max_pending_logins: int = MAX_PENDING_LOGINS,
        endpoints: RedisEndpoints | None = None,
        cache_size: int = CACHE_SIZE,
        cache_lease: float = CACHE_LEASE,
    ) -> None:
        self.idle_timeout = idle_timeout
        self._max_pending_logins = max_pending_logins
        self._prefix = key_prefix
        self._cipher = cipher
        self._clock = clock
        self._timeout = timeout
        self._lock_timeout = lock_timeout
        # A crashed holder's lease runs out within lock_timeout; waiting longer means a live
        # holder is still renewing, and the caller gets a 503 instead of hanging.
        self._lock_wait = lock_timeout + 1.0
        self._topology = connect(
            endpoints or RedisEndpoints(url=url), pool_size=pool_size, timeout=timeout
        )
        self._cluster = self._topology.cluster
        self._logins_key = f"{key_prefix}{{logins}}" if self._cluster else f"{key_prefix}logins"
        self._redis = self._topology.client
        self._save_script = self._redis.register_script(scripts.SAVE)
        self._touch_script = self._redis.register_script(scripts.TOUCH)
        self._put_token_script = self._redis.register_script(scripts.PUT_TOKEN)
        self._release_script = self._redis.register_script(scripts.RELEASE)
        self._renew_script = self._redis.register_script(scripts.RENEW)
        self._put_login_script = self._redis.register_script(scripts.PUT_LOGIN)
        self._pop_login_script = self._redis.register_script(scripts.POP_LOGIN)
        self._index_add_script = self._redis.register_script(scripts.INDEX_ADD)
        self._cache = ClientCache(cache_size)
        self.tracker: InvalidationTracker | None = None
        if cache_size > 0:
            self.tracker = InvalidationTracker(
                cache=self._cache,
                prefixes=[f"{key_prefix}sess:", f"{key_prefix}tok:"],
                open_connections=self._topology.open_tracking_connections,
                timeout=timeout,
                lease=cache_lease,
                master_changed=(
                    self._topology.master_changed if self._topology.mode == "sentinel" else None
                ),
            )
        self._local_locks: dict[str, _LocalLock] = {}
        self._held: dict[str, str] = {}
        self._renewals: set[asyncio.Task[None]] = set()
        self._decoded = SessionCache(decoded_cache_size)
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisSessionStore:
        """Build the store from ``settings.session`` (secret keys encrypt at rest)."""
        session = settings.session
        try:
            cipher = SessionCipher(session.secret_key)
        except ValueError as exc:
            raise ConfigError(f"session.secret_key: {exc}") from exc
        return cls(
            url=session.redis_url,
            key_prefix=session.redis_key_prefix,
            idle_timeout=session.idle_timeout,
            cipher=cipher,
            pool_size=session.redis_pool_size,
            timeout=session.redis_timeout,
            max_pending_logins=session.max_pending_logins,
            endpoints=endpoints_of(settings),
            cache_size=session.redis_cache_size,
            cache_lease=session.redis_cache_lease,
        )

    def __repr__(self) -> str:
        return (
            f"RedisSessionStore(prefix={self._prefix!r}, mode={self._topology.mode!r}, "
            f"idle_timeout={self.idle_timeout})"
        )

    # Sessions

    async def save(self, session: Session) -> None:
        now = self._clock()
        deadline = min(now + self.idle_timeout, session.absolute_expiry)
        if deadline <= now:
            await self.delete(session.id)
            return
        key = self._key("sess", session.id)
        blob = self._cipher.encrypt(session.to_json(), aad=key.encode())
        token = self._held.get(session.id, "")
        ttl = _ms(deadline - now)
        keys = [key, self._key("tok", session.id), self._key("lock", session.id)]
        if self._cluster:
            await self._add_to_indexes(session, ttl, "save")
        else:
            keys += self._index_keys(session)
        args: list[bytes | str | int] = [
            blob,
            repr(deadline),
            ttl,
            session.id,
            token,
            session.rt_version,
            self._prefix,
        ]
        self._decoded.discard(key)
        self._cache.discard(key)
        try:
            async with self._translate("save"):
                result = await self._save_script(keys=keys, args=args)
        finally:
            # Again once written: a read of this instance that raced the write is not kept
            # (read-your-writes here; other instances follow with the invalidation).
            self._cache.discard(key)
        if result == -3:
            raise SessionEnded("the session has ended")
        if result == -1:
            raise SessionStoreUnavailable(
                "refresh lock lost before the session was saved; write refused",
                retry_after=_RETRY_AFTER,
            )
        if result == -2:
            raise SessionStoreUnavailable(
                "a newer refresh token is already stored; stale write refused",
                retry_after=_RETRY_AFTER,
            )

    def load_now(self, session_id: str) -> Session | _LoadLater | None:
        """``load`` answered by the tracked cache without a coroutine, else LOAD_LATER.

        The session is the cached object itself, shared by the requests that read it: its
        claims are immutable (``Session.compact``) and only ``last_seen`` is ever set on it
        (SessionManager, just before a ``touch`` that drops it from the cache)."""
        # Under the refresh lock, always Redis: the holder before us (maybe another instance)
        # saved a rotated refresh token, and its invalidation may not have arrived yet.
        if session_id in self._held:
            return LOAD_LATER
        key = self._key("sess", session_id)
        cached = self._cache.get(key)
        if cached is MISS:
            return LOAD_LATER
        return self._from_entry(key, cached)  # type: ignore[arg-type]

    async def load(self, session_id: str) -> Session | None:
        found = self.load_now(session_id)
        if not isinstance(found, _LoadLater):
            return found
        key = self._key("sess", session_id)
        if self.tracker is not None:
            self.tracker.ensure_started()
        ticket = self._cache.begin(key)
        kept: object = MISS
        try:
            async with self._translate("load"):
                blob, deadline, seen = await self._redis.hmget(key, ["d", "exp", "seen"])
            entry = self._entry_of(key, _bytes(blob), _float(deadline), _float(seen))
            kept = entry
        finally:
            self._cache.finish(key, ticket, kept)
        return self._from_entry(key, entry)

    async def touch(self, session: Session) -> None:
        now = self._clock()
        deadline = min(now + self.idle_timeout, session.absolute_expiry)
        if deadline <= now:
            return
        ttl = _ms(deadline - now)
        key = self._key("sess", session.id)
        keys = [key, self._key("tok", session.id)]
        if not self._cluster:
            keys += self._index_keys(session)
        self._cache.discard(key)
        try:
            async with self._translate("touch"):
                touched = await self._touch_script(keys=keys, args=[repr(now), repr(deadline), ttl])
        finally:
            self._cache.discard(key)  # see ``save``
        if touched == 1:
            session.last_seen = now
            if self._cluster:
                await self._add_to_indexes(session, ttl, "touch")

    async def delete(self, session_id: str) -> Session | None:
        key = self._key("sess", session_id)
        tok_key = self._key("tok", session_id)
        async with self._translate("delete"):
            blob = _bytes(await self._redis.hget(key, "d"))
        session = None
        if blob is not None:
            session = self._decoded.open(key, blob, self._decrypt_session, remember=False)
        self._decoded.discard(key)
        self._cache.discard(key)
        self._cache.discard(tok_key)
        index_keys = self._index_keys(session) if session is not None else []
        # The lock goes too: an exchange still in flight then fails its fenced save instead
        # of bringing the logged-out session back.
        async with self._translate("delete"):
            if self._cluster:  # one slot for the session's keys, the indexes apart
                await self._redis.delete(key, tok_key, self._key("lock", session_id))
                for index_key in index_keys:
                    await self._redis.srem(index_key, session_id)
            else:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.delete(key, tok_key, self._key("lock", session_id))
                    for index_key in index_keys:
                        pipe.srem(index_key, session_id)
                    await pipe.execute()
        self._cache.discard(key)  # see ``save``
        self._cache.discard(tok_key)
        return session

    async def find(self, *, sub: str | None = None, sid: str | None = None) -> list[str]:
        if sid is not None:
            index_key = self._key("idx:sid", _digest(sid))
        elif sub is not None:
            index_key = self._key("idx:sub", _digest(sub))
        else:
            return []
        async with self._translate("find"):
            members = sorted(
                m.decode() if isinstance(m, bytes) else m
                for m in await self._redis.smembers(index_key)
            )
            if not members:
                return []
            # Cluster mode: the pipeline splits by node (each session in its own slot).
            async with self._redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hmget(self._key("sess", member), ["d", "exp", "seen"])
                rows = await pipe.execute()
        found: list[str] = []
        gone: list[str] = []
        for member, (blob, deadline, seen) in zip(members, rows, strict=True):
            if blob is None:
                gone.append(member)  # expired by its TTL: drop the stale membership
                continue
            session = self._open_session(
                self._key("sess", member),
                _bytes(blob),
                _bytes(deadline),
                _bytes(seen),
                remember=False,  # back-channel logout: no reason to keep these
            )
            if session is None or session.id != member:
                continue
            if (sub is None or session.sub == sub) and (sid is None or session.sid == sid):
                found.append(member)
        if gone:
            async with self._translate("find"):
                await self._redis.srem(index_key, *gone)
        return found

    async def _add_to_indexes(self, session: Session, ttl: int, operation: str) -> None:
        async with self._translate(operation):
            for index_key in self._index_keys(session):
                await self._index_add_script(keys=[index_key], args=[session.id, ttl])

    # The refresh lock

    @asynccontextmanager
    async def refresh_lock(self, session_id: str) -> AsyncIterator[None]:
        """Distributed lock around a refresh-token exchange; see the class docstring.

        Tasks of this instance queue on a local lock first, so only one of them polls Redis.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_wait
        local = self._local_locks.setdefault(session_id, _LocalLock())
        local.users += 1
        try:
            try:
                async with asyncio.timeout(self._lock_wait):
                    await local.lock.acquire()
            except TimeoutError:
                raise self._lock_busy() from None
            try:
                token = await self._acquire(session_id, deadline)
                self._held[session_id] = token
                renewal = asyncio.create_task(self._renew(session_id, token))
                self._renewals.add(renewal)
                renewal.add_done_callback(self._forget_renewal)
                try:
                    yield
                finally:
                    # Not awaited: a renewal racing the release only finds the token gone.
                    renewal.cancel()
                    self._held.pop(session_id, None)
                    await self._release(session_id, token)
            finally:
                local.lock.release()
        finally:
            local.users -= 1
            if local.users == 0 and self._local_locks.get(session_id) is local:
                del self._local_locks[session_id]

    async def _acquire(self, session_id: str, deadline: float) -> str:
        loop = asyncio.get_running_loop()
        key = self._key("lock", session_id)
        token = secrets.token_hex(16)
        delay = _LOCK_POLL_MIN
        while True:
            async with self._translate("refresh_lock"):
                acquired = await self._redis.set(key, token, nx=True, px=_ms(self._lock_timeout))
            if acquired:
                return token
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._lock_busy()
            # Jittered exponential backoff: waiters of several instances do not poll in step.
            await asyncio.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))  # noqa: S311
            delay = min(delay * 2, _LOCK_POLL_MAX)

    async def _renew(self, session_id: str, token: str) -> None:
        key = self._key("lock", session_id)
        while True:
            await asyncio.sleep(self._lock_timeout / 3)
            try:
                async with self._translate("refresh_lock renewal"):
                    renewed = await self._renew_script(
                        keys=[key], args=[token, _ms(self._lock_timeout)]
                    )
            except SessionStoreUnavailable:
                logger.warning("could not renew the refresh lock; retrying")
                continue
            if renewed != 1:
                logger.warning("refresh lock lost while held; a save will be refused")
                return

    def _forget_renewal(self, task: asyncio.Task[None]) -> None:
        self._renewals.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("refresh lock renewal failed: %s", type(task.exception()).__name__)

    async def _release(self, session_id: str, token: str) -> None:
        try:
            async with self._translate("refresh_lock release"):
                await self._release_script(keys=[self._key("lock", session_id)], args=[token])
        except SessionStoreUnavailable:
            # Harmless: the lease runs out by itself within lock_timeout.
            logger.warning("could not release the refresh lock; it will expire")

    def _lock_busy(self) -> SessionStoreUnavailable:
        return SessionStoreUnavailable(
            f"refresh lock still held after {self._lock_wait:.1f}s",
            retry_after=_RETRY_AFTER,
        )

    # Tokens and pending logins

    async def get_token(self, session_id: str, key: str) -> CachedToken | None:
        tok_key = self._key("tok", session_id)
        field = _digest(key)
        tokens = self._cache.get(tok_key)
        if tokens is MISS or session_id in self._held:  # see ``load``
            if self.tracker is not None:
                self.tracker.ensure_started()
            ticket = self._cache.begin(tok_key)
            read: dict[str, CachedToken | None] | object = MISS
            try:
                async with self._translate("get_token"):
                    raw = await self._redis.hgetall(tok_key)
                read = {
                    (f.decode() if isinstance(f, bytes) else f): self._decrypt_token(tok_key, f, b)
                    for f, b in raw.items()
                }
            finally:
                self._cache.finish(tok_key, ticket, read)
            tokens = read
        token = tokens.get(field) if isinstance(tokens, dict) else None
        return token if token is not None and token.expires_at > self._clock() else None

    async def put_token(self, session_id: str, key: str, token: CachedToken) -> None:
        tok_key = self._key("tok", session_id)
        field = _digest(key)
        blob = self._cipher.encrypt(token.to_json(), aad=f"{tok_key}\n{field}".encode())
        self._cache.discard(tok_key)
        try:
            async with self._translate("put_token"):
                await self._put_token_script(
                    keys=[self._key("sess", session_id), tok_key], args=[field, blob]
                )
        finally:
            self._cache.discard(tok_key)  # see ``save``

    async def get_client_token(self, key: str) -> CachedToken | None:
        redis_key = self._key("client-tok", _digest(key))
        async with self._translate("get_client_token"):
            blob = _bytes(await self._redis.get(redis_key))
        if blob is None:
            return None
        try:
            token = CachedToken.from_json(self._cipher.decrypt(blob, aad=redis_key.encode()))
        except (DecryptionFailed, ValueError, TypeError):
            logger.warning("unreadable cached client token ignored")
            return None
        return token if token.expires_at > self._clock() else None

    async def put_client_token(self, key: str, token: CachedToken) -> None:
        redis_key = self._key("client-tok", _digest(key))
        ttl = token.expires_at - self._clock()
        if ttl <= 0:
            return
        blob = self._cipher.encrypt(token.to_json(), aad=redis_key.encode())
        async with self._translate("put_client_token"):
            await self._redis.set(redis_key, blob, px=_ms(ttl))

    async def put_login(self, state: str, data: dict[str, Any], ttl: float) -> None:
        key = self._login_key(state)
        now = self._clock()
        payload = json.dumps({"exp": now + ttl, "data": data}).encode()
        blob = self._cipher.encrypt(payload, aad=key.encode())
        args: list[bytes | str | int] = [
            blob,
            _ms(ttl),
            math.floor(now * 1000),
            math.floor((now + ttl) * 1000),
            self._max_pending_logins,
            state,
        ]
        async with self._translate("put_login"):
            stored, oldest = await self._put_login_script(keys=[key, self._logins_key], args=args)
        if stored != 1:
            raise TooManyPendingLogins(
                "too many logins are pending; try again shortly",
                retry_after=cap_retry_after(float(oldest) / 1000 - now),
            )

    async def pop_login(self, state: str) -> dict[str, Any] | None:
        key = self._login_key(state)
        async with self._translate("pop_login"):
            blob = _bytes(await self._pop_login_script(keys=[key, self._logins_key], args=[state]))
        if blob is None:
            return None
        try:
            payload = json.loads(self._cipher.decrypt(blob, aad=key.encode()))
            expires, data = float(payload["exp"]), payload["data"]
        except (DecryptionFailed, ValueError, TypeError, KeyError):
            logger.warning("unreadable pending login ignored")
            return None
        if self._clock() >= expires or not isinstance(data, dict):
            return None
        return data

    async def remember_jti(self, jti: str, ttl: float) -> bool:
        # SET NX is atomic: of several instances receiving the same logout token, one wins.
        key = self._key("jti", _digest(jti))
        async with self._translate("remember_jti"):
            return bool(await self._redis.set(key, b"1", nx=True, px=_ms(ttl)))

    async def get_dpop_nonce(self, server: str) -> str | None:
        # Not secret (a server sends it in the clear), so stored as it is.
        async with self._translate("get_dpop_nonce"):
            raw = _bytes(await self._redis.get(self._key("dpop-nonce", _digest(server))))
        return raw.decode("latin-1") if raw is not None else None

    async def put_dpop_nonce(self, server: str, nonce: str) -> None:
        key = self._key("dpop-nonce", _digest(server))
        async with self._translate("put_dpop_nonce"):
            await self._redis.set(key, nonce.encode("latin-1"), px=_DPOP_NONCE_TTL_MS)

    # Lifecycle

    async def ping(self) -> None:
        async with self._translate("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._decoded.clear()
        for renewal in list(self._renewals):
            renewal.cancel()
        if self.tracker is not None:
            await self.tracker.close()
        await self._topology.close()

    # Helpers

    def _key(self, kind: str, name: str) -> str:
        if self._cluster and kind in ("sess", "tok", "lock"):
            return f"{self._prefix}{kind}:{{{name}}}"  # the id is the hash tag
        return f"{self._prefix}{kind}:{name}"

    def _login_key(self, state: str) -> str:
        if self._cluster:
            return f"{self._prefix}login:{{logins}}{state}"  # the slot of the logins set
        return f"{self._prefix}login:{state}"

    def _decrypt_token(
        self, tok_key: str, field: bytes | str, blob: bytes | str
    ) -> CachedToken | None:
        name = field.decode() if isinstance(field, bytes) else field
        try:
            raw = self._cipher.decrypt(_bytes(blob) or b"", aad=f"{tok_key}\n{name}".encode())
            return CachedToken.from_json(raw)
        except (DecryptionFailed, ValueError, TypeError):
            logger.warning("unreadable cached token ignored")
            return None

    def _entry_of(
        self, key: str, blob: bytes | None, deadline: float | None, seen: float | None
    ) -> _SessionEntry | None:
        """What the cache keeps of a ``sess`` read: None when there is no such key."""
        if blob is None or deadline is None:
            self._decoded.discard(key)
            return None
        session = self._decoded.open(key, blob, self._decrypt_session)  # a private copy
        if session is not None:
            session.compact()  # immutable claims: the entry is shared (``load_now``)
            if seen is not None:
                session.last_seen = seen
        return (session, deadline)

    def _from_entry(self, key: str, entry: _SessionEntry | None) -> Session | None:
        """The live session of a cache entry (shared, see ``load_now``), else None."""
        if entry is None:
            return None
        session, deadline = entry
        now = self._clock()
        if session is None or now >= deadline or session.is_expired(now):
            self._decoded.discard(key)  # no dead session lingers in either cache
            self._cache.discard(key)
            return None
        return session

    def _index_keys(self, session: Session) -> list[str]:
        keys = [self._key("idx:sub", _digest(session.sub))]
        if session.sid is not None:
            keys.append(self._key("idx:sid", _digest(session.sid)))
        return keys

    def _decrypt_session(self, key: str, blob: bytes) -> Session | None:
        try:
            return Session.from_json(self._cipher.decrypt(blob, aad=key.encode()))
        except (DecryptionFailed, ValueError, TypeError):
            # No data in the log: the value may be a session encrypted with a retired key.
            logger.warning("undecryptable session value treated as no session")
            return None

    def _open_session(
        self,
        key: str,
        blob: bytes | None,
        deadline: bytes | None,
        seen: bytes | None,
        *,
        remember: bool = True,
    ) -> Session | None:
        """A private copy of the live session in ``blob`` (see ``SessionCache``), else None."""
        now = self._clock()
        try:
            live = blob is not None and deadline is not None and now < float(deadline)
        except ValueError:
            live = False
        if not live or blob is None:
            self._decoded.discard(key)
            return None
        session = self._decoded.open(key, blob, self._decrypt_session, remember=remember)
        if session is None or session.is_expired(now):
            self._decoded.discard(key)
            return None
        if seen is not None:
            session.last_seen = float(seen)
        return session

    @asynccontextmanager
    async def _translate(self, operation: str) -> AsyncIterator[None]:
        """Map every redis-py error to SessionStoreUnavailable (503 + Retry-After), and bound
        the whole operation by the Redis timeout (a failover's reconnects included)."""
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except REDIS_ERRORS as exc:
            raise SessionStoreUnavailable(
                f"session store unavailable during {operation} ({type(exc).__name__})",
                retry_after=_RETRY_AFTER,
            ) from exc
