"""RedisSessionStore beyond the shared contract: what lands in Redis, TTLs, locks, outages.

Needs a Redis at ``GATEWAY_TEST_REDIS_URL`` (default redis://127.0.0.1:6379/15); every test
works under its own key prefix and deletes its keys afterwards. The pause test starts its own
``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any
from uuid import uuid4

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisClusterUnreachableError, SlotNotCoveredError

from gateway.crypto import SessionCipher
from gateway.errors import ConfigError, SessionEnded, SessionStoreUnavailable
from gateway.sessions import CachedToken, Session
from gateway.sessions.base import LOAD_LATER
from gateway.sessions.redis import DECODED_CACHE_SIZE, MAX_PENDING_LOGINS, RedisSessionStore
from gateway.settings import Settings

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
OLD_KEY = "old-secret-0123456789abcdefghijklmnopqrstuvwxyz"
NEW_KEY = "new-secret-0123456789abcdefghijklmnopqrstuvwxyz"
IDLE = 60.0
OIDC = {"issuer": "https://idp.example/", "client_id": "c", "client_secret": "s"}

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def redis_store(
    *,
    url: str = REDIS_URL,
    prefix: str | None = None,
    keys: list[str] | None = None,
    idle_timeout: float = IDLE,
    clock: Callable[[], float] = time.time,
    timeout: float = 2.0,
    lock_timeout: float = 15.0,
    decoded_cache_size: int = DECODED_CACHE_SIZE,
    max_pending_logins: int = MAX_PENDING_LOGINS,
) -> AsyncIterator[RedisSessionStore]:
    """A store under a fresh key prefix, whose keys are deleted on exit; or under ``prefix``,
    another instance of the same gateway (the owner of the prefix cleans up)."""
    owner = prefix is None
    prefix = prefix if prefix is not None else f"gwtest:{uuid4().hex}:"
    store = RedisSessionStore(
        url=url,
        key_prefix=prefix,
        idle_timeout=idle_timeout,
        cipher=SessionCipher(keys or [NEW_KEY]),
        clock=clock,
        timeout=timeout,
        lock_timeout=lock_timeout,
        decoded_cache_size=decoded_cache_size,
        max_pending_logins=max_pending_logins,
    )
    try:
        yield store
    finally:
        await store.close()
        if owner:
            await _delete_prefix(url, prefix)


async def _delete_prefix(url: str, prefix: str) -> None:
    client = Redis.from_url(url, socket_timeout=5)
    try:
        stale = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if stale:
            await client.delete(*stale)
    finally:
        await client.aclose()


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store() -> AsyncIterator[RedisSessionStore]:
    async with redis_store() as created:
        yield created


def make_session(**overrides: Any) -> Session:
    now = time.time()
    fields: dict[str, Any] = {
        "id": uuid4().hex,
        "sub": "auth0|alice-0f3c9e",
        "sid": "idp-session-77aa",
        "refresh_token": "v1.RT-very-secret-refresh-token",
        "id_token": "eyJ.id-token-payload.sig",
        "created_at": now,
        "absolute_expiry": now + 3600,
        "claims": {"email": "alice@example.com"},
    }
    fields.update(overrides)
    return Session(**fields)


def prefix_of(store: RedisSessionStore) -> str:
    return store._prefix


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def as_bytes(value: bytes | str | None) -> bytes:
    assert value is not None
    return value.encode() if isinstance(value, str) else value


async def dump(raw: Redis, prefix: str) -> dict[bytes, list[bytes]]:
    """Every key under ``prefix`` with every byte string it holds (field names included)."""
    out: dict[bytes, list[bytes]] = {}
    async for key in raw.scan_iter(match=f"{prefix}*"):
        kind = as_bytes(await raw.type(key))
        if kind == b"string":
            out[key] = [as_bytes(await raw.get(key))]
        elif kind == b"hash":
            items = (await raw.hgetall(key)).items()
            out[key] = [as_bytes(b) for pair in items for b in pair]
        elif kind == b"set":
            out[key] = [as_bytes(m) for m in await raw.smembers(key)]
        elif kind == b"zset":
            members = await raw.zrange(key, 0, -1)
            out[key] = [as_bytes(m) for m in members if isinstance(m, bytes | str)]
        else:  # pragma: no cover - the store writes no other type
            raise AssertionError(f"unexpected {kind!r} at {key!r}")
    return out


# What lands in Redis


async def test_redis_store_values_hold_only_ciphertext(
    store: RedisSessionStore, raw: Redis
) -> None:
    session = make_session()
    await store.save(session)
    await store.put_token(session.id, "https://api read", CachedToken("AT-secret-jwt", 2e9, "x"))
    await store.put_login("state-1", {"verifier": "pkce-verifier-secret"}, ttl=60)
    await store.touch(session)
    contents = await dump(raw, prefix_of(store))
    kinds = {key.decode().removeprefix(prefix_of(store)).split(":")[0] for key in contents}
    assert kinds == {"sess", "tok", "login", "logins", "idx"}
    secrets = [
        b"RT-very-secret",
        b"alice",
        b"idp-session-77aa",
        b"id-token-payload",
        b"AT-secret-jwt",
        b"pkce-verifier",
        b"https://api",
    ]
    for key, values in contents.items():
        for secret in secrets:
            assert secret not in key
            assert all(secret not in value for value in values), (key, secret)
    sess = await raw.hgetall(f"{prefix_of(store)}sess:{session.id}".encode())
    assert set(sess) == {b"d", b"exp", b"rtv", b"seen"}
    assert sess[b"d"][0] == 1  # version byte of the SessionCipher format


async def test_redis_store_blob_moved_to_another_key_does_not_load(
    store: RedisSessionStore, raw: Redis
) -> None:
    victim, other = make_session(), make_session()
    await store.save(victim)
    await store.save(other)
    prefix = prefix_of(store)
    blob = await raw.hget(f"{prefix}sess:{victim.id}", "d")
    await raw.hset(f"{prefix}sess:{other.id}", "d", blob)
    assert await store.load(other.id) is None
    assert await store.load(victim.id) is not None


async def test_redis_store_undecryptable_session_is_no_session_and_logs_no_data(
    store: RedisSessionStore, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session()
    await store.save(session)
    await raw.hset(f"{prefix_of(store)}sess:{session.id}", "d", b"\x01garbage" * 8)
    with caplog.at_level(logging.WARNING, logger="gateway.sessions.redis"):
        assert await store.load(session.id) is None
    assert "undecryptable" in caplog.text
    assert session.id not in caplog.text and "alice" not in caplog.text


# TTLs


async def test_redis_store_ttls_follow_idle_timeout_and_touch_slides_them(
    store: RedisSessionStore, raw: Redis
) -> None:
    session = make_session()
    await store.save(session)
    await store.put_token(session.id, "k", CachedToken("at", time.time() + 300, "aud"))
    prefix = prefix_of(store)
    keys = [
        f"{prefix}sess:{session.id}",
        f"{prefix}tok:{session.id}",
        *[k.decode() async for k in raw.scan_iter(match=f"{prefix}idx:*")],
    ]
    assert len(keys) == 4
    for key in keys:
        assert IDLE * 1000 - 2000 < await raw.pttl(key) <= IDLE * 1000
    # Pretend 50 s went by, then touch: every key is back to the full idle timeout.
    for key in keys:
        await raw.pexpire(key, 10_000)
    await store.touch(session)
    for key in keys:
        assert IDLE * 1000 - 2000 < await raw.pttl(key) <= IDLE * 1000
    assert await store.load(session.id) is not None


async def test_redis_store_ttl_capped_by_absolute_expiry(
    store: RedisSessionStore, raw: Redis
) -> None:
    session = make_session(absolute_expiry=time.time() + 30)
    await store.save(session)
    key = f"{prefix_of(store)}sess:{session.id}"
    assert 28_000 < await raw.pttl(key) <= 30_000
    await store.touch(session)
    assert 28_000 < await raw.pttl(key) <= 30_000


async def test_redis_store_touch_does_not_revive_a_deleted_session(
    store: RedisSessionStore, raw: Redis
) -> None:
    session = make_session()
    await store.save(session)
    await store.delete(session.id)
    await store.touch(session)
    assert await dump(raw, prefix_of(store)) == {}


async def test_redis_store_login_expires_with_its_ttl(store: RedisSessionStore, raw: Redis) -> None:
    await store.put_login("state-ttl", {"v": "1"}, ttl=5)
    assert 4000 < await raw.pttl(f"{prefix_of(store)}login:state-ttl") <= 5000


# Deletion and indexes


async def test_redis_store_delete_removes_every_key_of_the_session(
    store: RedisSessionStore, raw: Redis
) -> None:
    session = make_session()
    await store.save(session)
    await store.put_token(session.id, "k", CachedToken("at", time.time() + 300, "aud"))
    deleted = await store.delete(session.id)
    assert deleted is not None and deleted.refresh_token == session.refresh_token
    contents = await dump(raw, prefix_of(store))
    assert contents == {}  # sets emptied by SREM vanish too


async def test_redis_store_find_drops_members_whose_session_expired(
    store: RedisSessionStore, raw: Redis
) -> None:
    alive, expired = make_session(), make_session()
    await store.save(alive)
    await store.save(expired)
    await raw.delete(f"{prefix_of(store)}sess:{expired.id}")  # what its TTL would do
    assert await store.find(sub=alive.sub) == [alive.id]
    index = [k async for k in raw.scan_iter(match=f"{prefix_of(store)}idx:sub:*")]
    assert await raw.smembers(index[0]) == {alive.id.encode()}


async def test_redis_store_save_prunes_index_members_whose_session_expired(
    store: RedisSessionStore, raw: Redis
) -> None:
    expired, fresh = make_session(), make_session()
    await store.save(expired)
    await raw.delete(f"{prefix_of(store)}sess:{expired.id}")  # what its TTL would do
    await store.save(fresh)  # e.g. the next login of the same user
    for index in [k async for k in raw.scan_iter(match=f"{prefix_of(store)}idx:*")]:
        assert await raw.smembers(index) == {fresh.id.encode()}


async def test_redis_store_pending_login_is_single_use_across_instances() -> None:
    async with redis_store() as first:
        async with redis_store(prefix=prefix_of(first)) as second:
            await first.put_login("state-x", {"verifier": "v"}, ttl=60)
            assert await second.pop_login("state-x") == {"verifier": "v"}
            assert await first.pop_login("state-x") is None


# The decoded-session cache: every load reads Redis, only an unchanged blob skips decoding


@pytest.fixture
def decrypts(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The blobs SessionCipher.decrypt is asked to open, in order."""
    seen: list[bytes] = []
    original = SessionCipher.decrypt

    def counting(self: SessionCipher, blob: bytes, *, aad: bytes) -> bytes:
        seen.append(blob)
        return original(self, blob, aad=aad)

    monkeypatch.setattr(SessionCipher, "decrypt", counting)
    return seen


async def test_redis_store_unchanged_session_is_decrypted_once(
    store: RedisSessionStore, decrypts: list[bytes]
) -> None:
    session = make_session()
    await store.save(session)
    loads = [await store.load(session.id) for _ in range(5)]
    assert len(decrypts) == 1
    assert all(s is not None and s.refresh_token == session.refresh_token for s in loads)
    assert len({id(s) for s in loads}) == 5  # a private object per load


async def test_redis_store_session_rotated_by_another_instance_is_seen_at_once(
    decrypts: list[bytes],
) -> None:
    async with redis_store() as first:
        async with redis_store(prefix=prefix_of(first)) as second:
            session = make_session()
            await first.save(session)
            assert await first.load(session.id) is not None  # cached on the first instance
            current = await second.load(session.id)
            assert current is not None
            rotated = replace(
                current, refresh_token="rt-rotated", rt_version=1, claims={"email": "new@x"}
            )
            await second.save(rotated)
            seen = await first.load(session.id)
            assert seen is not None and seen.refresh_token == "rt-rotated"
            assert seen.rt_version == 1 and seen.claims == {"email": "new@x"}
            assert len(decrypts) == 3  # first, second, then first again for the new blob


async def test_redis_store_session_deleted_by_another_instance_is_gone_at_once() -> None:
    async with redis_store() as first:
        async with redis_store(prefix=prefix_of(first)) as second:
            session = make_session()
            await first.save(session)
            assert await first.load(session.id) is not None
            assert len(first._decoded) == 1
            await second.delete(session.id)
            assert await first.load(session.id) is None
            assert len(first._decoded) == 0  # no decrypted refresh token left behind


async def test_redis_store_cached_session_does_not_mask_a_replaced_blob(
    store: RedisSessionStore, raw: Redis
) -> None:
    victim, other = make_session(), make_session()
    await store.save(victim)
    await store.save(other)
    assert await store.load(other.id) is not None  # cached
    prefix = prefix_of(store)
    await raw.hset(
        f"{prefix}sess:{other.id}", "d", await raw.hget(f"{prefix}sess:{victim.id}", "d")
    )
    assert await store.load(other.id) is None
    await raw.hset(f"{prefix}sess:{other.id}", "d", b"\x01garbage" * 8)
    assert await store.load(other.id) is None


async def test_redis_store_save_touch_and_delete_keep_the_cache_coherent(
    store: RedisSessionStore, raw: Redis, decrypts: list[bytes]
) -> None:
    session = make_session(last_seen=time.time() - 30)
    await store.save(session)
    loaded = await store.load(session.id)
    assert loaded is not None and loaded.last_seen == session.last_seen
    # touch rewrites the idle deadline and "seen", not the blob: still no new decrypt.
    await store.touch(loaded)
    touched = await store.load(session.id)
    assert touched is not None and touched.last_seen == loaded.last_seen > session.last_seen
    assert len(decrypts) == 1
    # A rotation saved by this instance is what the next load returns.
    await store.save(replace(touched, refresh_token="rt-2", rt_version=1))
    rotated = await store.load(session.id)
    assert rotated is not None and (rotated.refresh_token, rotated.rt_version) == ("rt-2", 1)
    assert len(decrypts) == 2
    assert (await store.delete(session.id)) is not None
    assert await store.load(session.id) is None
    assert len(store._decoded) == 0


async def test_redis_store_idle_expired_session_is_dropped_from_the_cache() -> None:
    clock = [time.time()]
    async with redis_store(clock=lambda: clock[0]) as store:
        session = make_session()
        await store.save(session)
        assert await store.load(session.id) is not None
        clock[0] += IDLE + 1  # the idle deadline passed (Redis's own TTL has not yet)
        assert await store.load(session.id) is None
        assert len(store._decoded) == 0


async def test_redis_store_tracked_hits_share_one_session_with_immutable_claims(
    store: RedisSessionStore,
) -> None:
    # As the memory store: a hit hands out the cached object itself (no copy per request);
    # its claims cannot be changed, and only last_seen is ever set on it (before a touch,
    # which drops it from the cache).
    await cache_live(store)
    session = make_session()
    await store.save(session)

    async def cached() -> bool:
        return await store.load(session.id) is not None and len(store._cache) > 0

    await until(cached)
    first, second = await store.load(session.id), store.load_now(session.id)
    assert first is not None and second is first
    with pytest.raises(TypeError):
        first.claims["email"] = "mallory@example.com"  # type: ignore[index]
    assert first.claims == {"email": "alice@example.com"}
    await store.touch(first)
    assert store.load_now(session.id) is LOAD_LATER  # the touch dropped the shared entry


async def test_redis_store_loaded_sessions_from_redis_do_not_share_mutations(
    store: RedisSessionStore,
) -> None:
    # Without the tracked cache (not live yet) every load is a private copy.
    store._cache.valid_until = 0.0
    session = make_session()
    await store.save(session)
    decoded = await store.load(session.id)
    again = await store.load(session.id)
    assert decoded is not None and again is not None and again is not decoded
    decoded.last_seen = 1.0
    decoded.refresh_token = "RT-changed"
    later = await store.load(session.id)
    assert later is not None and later.refresh_token == session.refresh_token
    assert later.last_seen == session.last_seen


async def test_redis_store_decoded_cache_is_bounded(decrypts: list[bytes]) -> None:
    async with redis_store(decoded_cache_size=2) as store:
        sessions = [make_session() for _ in range(4)]
        for session in sessions:
            await store.save(session)
            assert await store.load(session.id) is not None
        assert len(store._decoded) == 2
        for session in sessions:  # evicted or not, every one still loads correctly
            loaded = await store.load(session.id)
            assert loaded is not None and loaded.id == session.id
        assert len(store._decoded) == 2
        await store.close()
        assert len(store._decoded) == 0


async def test_redis_store_find_and_delete_use_but_do_not_fill_the_cache(
    store: RedisSessionStore, decrypts: list[bytes]
) -> None:
    cached, other = make_session(), make_session()
    await store.save(cached)
    await store.save(other)
    assert await store.load(cached.id) is not None
    assert sorted(await store.find(sub=cached.sub)) == sorted([cached.id, other.id])
    assert len(store._decoded) == 1 and len(decrypts) == 2  # only ``other`` was decrypted
    removed = await store.delete(cached.id)
    assert removed is not None and removed.refresh_token == cached.refresh_token
    assert len(decrypts) == 2 and len(store._decoded) == 0


# Key rotation


async def test_redis_store_reads_old_key_after_rotation_and_writes_new_key() -> None:
    session = make_session()
    async with redis_store(keys=[OLD_KEY]) as old:
        prefix = prefix_of(old)
        await old.save(session)
        async with redis_store(prefix=prefix, keys=[NEW_KEY, OLD_KEY]) as rotated:
            loaded = await rotated.load(session.id)
            assert loaded is not None and loaded.refresh_token == session.refresh_token
            await rotated.save(loaded)
        async with redis_store(prefix=prefix, keys=[NEW_KEY]) as new_only:
            assert await new_only.load(session.id) is not None
        # The old-only instance cannot read what the new key wrote: no session, no crash.
        assert await old.load(session.id) is None


# The refresh lock


async def test_redis_store_refresh_lock_serialises_two_instances() -> None:
    inside = peak = entries = 0

    async def hold(store: RedisSessionStore) -> None:
        nonlocal inside, peak, entries
        async with store.refresh_lock("shared"):
            inside += 1
            entries += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.02)
            inside -= 1

    async with redis_store() as first, redis_store(prefix=prefix_of(first)) as second:
        await asyncio.gather(*(hold(s) for s in (first, second) for _ in range(5)))
    assert peak == 1
    assert entries == 10


async def test_redis_store_refresh_lock_waits_only_for_a_crashed_holders_lease(
    store: RedisSessionStore, raw: Redis
) -> None:
    await raw.set(f"{prefix_of(store)}lock:s", "crashed-holder", px=400)
    started = time.monotonic()
    async with store.refresh_lock("s"):
        waited = time.monotonic() - started
    assert 0.3 < waited < 1.5


async def test_redis_store_refresh_lock_gives_up_after_the_wait_bound(raw: Redis) -> None:
    async with redis_store(lock_timeout=0.2) as store:
        await raw.set(f"{prefix_of(store)}lock:s", "live-holder", px=10_000)
        started = time.monotonic()
        with pytest.raises(SessionStoreUnavailable, match="refresh lock"):
            async with store.refresh_lock("s"):
                pytest.fail("entered a lock held by someone else")
        assert 1.0 < time.monotonic() - started < 2.5


async def test_redis_store_refresh_lock_renews_its_lease_while_held(raw: Redis) -> None:
    order: list[str] = []
    session = make_session()
    async with (
        redis_store(lock_timeout=0.3) as first,
        redis_store(prefix=prefix_of(first), lock_timeout=0.3) as second,
    ):
        await first.save(session)

        async def slow_holder() -> None:
            async with first.refresh_lock(session.id):
                order.append("first in")
                await asyncio.sleep(1.0)  # a slow IdP: three lease lengths
                await first.save(replace(session, refresh_token="rt-2", rt_version=1))
                order.append("first out")

        async def contender() -> None:
            await asyncio.sleep(0.1)
            async with second.refresh_lock(session.id):
                order.append("second in")

        await asyncio.gather(slow_holder(), contender())
        loaded = await second.load(session.id)
    assert order == ["first in", "first out", "second in"]
    assert loaded is not None and loaded.refresh_token == "rt-2"


@pytest.mark.parametrize("intruder", [None, "another-holder"], ids=["deleted", "replaced"])
async def test_redis_store_save_refused_when_the_lock_was_lost(
    store: RedisSessionStore, raw: Redis, intruder: str | None
) -> None:
    session = make_session()
    await store.save(session)
    lock_key = f"{prefix_of(store)}lock:{session.id}"
    async with store.refresh_lock(session.id):
        if intruder is None:
            await raw.delete(lock_key)
        else:
            await raw.set(lock_key, intruder, px=10_000)
        with pytest.raises(SessionStoreUnavailable, match="lock lost"):
            await store.save(replace(session, refresh_token="rt-stale", rt_version=1))
    # The stored refresh token is untouched, and someone else's lock is not released by us.
    loaded = await store.load(session.id)
    assert loaded is not None and loaded.refresh_token == session.refresh_token
    assert await raw.get(lock_key) == (intruder.encode() if intruder else None)


async def test_redis_store_lock_released_on_exit_and_saves_unfenced_after(
    store: RedisSessionStore, raw: Redis
) -> None:
    session = make_session()
    lock_key = f"{prefix_of(store)}lock:{session.id}"
    async with store.refresh_lock(session.id):
        assert await raw.get(lock_key) is not None
        await store.save(session)
    assert await raw.get(lock_key) is None
    await store.save(replace(session, rt_version=1))


async def test_redis_store_delete_during_refresh_prevents_resurrection(
    store: RedisSessionStore,
) -> None:
    session = make_session()
    await store.save(session)
    async with store.refresh_lock(session.id):
        await store.delete(session.id)  # logout while an exchange is in flight
        with pytest.raises(SessionEnded):  # the broker answers it 401 login_required, not a 503
            await store.save(replace(session, refresh_token="rt-2", rt_version=1))
    assert await store.load(session.id) is None


# Outages


STORE_CALLS: dict[str, Callable[[RedisSessionStore], Awaitable[object]]] = {
    "ping": lambda s: s.ping(),
    "load": lambda s: s.load("x"),
    "save": lambda s: s.save(make_session()),
    "touch": lambda s: s.touch(make_session()),
    "delete": lambda s: s.delete("x"),
    "find": lambda s: s.find(sub="alice"),
    "get_token": lambda s: s.get_token("x", "k"),
    "put_token": lambda s: s.put_token("x", "k", CachedToken("at", 2e9, "aud")),
    "put_login": lambda s: s.put_login("state", {}, ttl=60),
    "pop_login": lambda s: s.pop_login("state"),
    "refresh_lock": lambda s: _enter_lock(s),
}


async def _enter_lock(store: RedisSessionStore) -> None:
    async with store.refresh_lock("x"):
        pass


@pytest.mark.parametrize("call", sorted(STORE_CALLS))
async def test_redis_store_unreachable_raises_unavailable_quickly(call: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with redis_store(url=dead, prefix="gwtest:nothing-written:", timeout=0.5) as store:
        started = time.monotonic()
        with pytest.raises(SessionStoreUnavailable) as info:
            await STORE_CALLS[call](store)
        assert time.monotonic() - started < 1.0
    assert info.value.status_code == 503 and info.value.retry_after >= 1
    assert "session store unavailable" in info.value.message


async def test_redis_store_silent_server_times_out_instead_of_hanging() -> None:
    # Accepts TCP connections (kernel backlog) and never answers: a hung Redis.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        store = RedisSessionStore(
            url=url,
            key_prefix="gwtest:",
            idle_timeout=IDLE,
            cipher=SessionCipher([NEW_KEY]),
            timeout=0.3,
        )
        try:
            started = time.monotonic()
            with pytest.raises(SessionStoreUnavailable):
                await store.load("x")
            assert time.monotonic() - started < 1.5
        finally:
            await store.close()


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A throwaway redis-server on a free port, for tests that pause or stop it."""
    executable = shutil.which("redis-server")
    if executable is None:  # scripts/install installs it: a missing server is a failure
        pytest.fail("redis-server is not installed (run scripts/install)")
    port = free_port()
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_redis_store_paused_redis_fails_fast_then_recovers(own_redis: str) -> None:
    session = make_session()
    async with redis_store(url=own_redis, timeout=0.5) as store:
        await store.save(session)
        admin = Redis.from_url(own_redis)
        try:
            await admin.client_pause(1500, all=True)
            paused_at = time.monotonic()
            with pytest.raises(SessionStoreUnavailable):
                await store.load(session.id)
            assert time.monotonic() - paused_at < 1.2
            await asyncio.sleep(max(0.0, paused_at + 1.7 - time.monotonic()))
            loaded = await store.load(session.id)
            assert loaded is not None and loaded.refresh_token == session.refresh_token
            await store.ping()
        finally:
            await admin.aclose()


# Construction


async def test_redis_store_from_settings_uses_the_session_section() -> None:
    settings = Settings.model_validate(
        {
            "oidc": OIDC,
            "session": {
                "store": "redis",
                "redis_url": REDIS_URL,
                "redis_key_prefix": "gwtest:settings:",
                "redis_timeout": "750ms",
                "idle_timeout": "2h",
                "secret_key": NEW_KEY,
            },
        }
    )
    store = RedisSessionStore.from_settings(settings)
    try:
        assert store.idle_timeout == 7200
        assert store._prefix == "gwtest:settings:"
        assert NEW_KEY not in repr(store)
    finally:
        await store.close()


def test_redis_store_from_settings_without_keys_is_a_config_error() -> None:
    settings = Settings.model_validate({"oidc": OIDC})
    with pytest.raises(ConfigError, match=r"session\.secret_key"):
        RedisSessionStore.from_settings(settings)


# The tracked cache (client-side caching with CLIENT TRACKING invalidations)


async def until(predicate: Callable[[], Awaitable[bool]], *, within: float = 10.0) -> None:
    """Poll ``predicate`` until it holds (a bound, not a timing assertion)."""
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def cache_live(store: RedisSessionStore) -> None:
    await store.load("warm-up")  # starts the tracker

    async def live() -> bool:
        return store._cache.is_live

    await until(live)


class CountingReads:
    """Counts the store's session reads from Redis (HMGET)."""

    def __init__(self, store: RedisSessionStore) -> None:
        self.count = 0
        inner = store._redis.hmget

        async def hmget(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await inner(*args, **kwargs)

        store._redis.hmget = hmget


async def test_redis_store_tracked_hit_makes_no_round_trip() -> None:
    async with redis_store() as store:
        await cache_live(store)
        session = make_session()
        await store.save(session)
        assert store.tracker is not None

        async def own_write_invalidated() -> bool:  # our own write's invalidation came back
            return store.tracker is not None and store.tracker.invalidations >= 1

        await until(own_write_invalidated)
        reads = CountingReads(store)
        for _ in range(5):
            loaded = await store.load(session.id)
            assert loaded is not None and loaded.refresh_token == session.refresh_token
        assert reads.count == 1


async def test_redis_store_write_by_another_instance_reaches_the_cache() -> None:
    async with redis_store() as a, redis_store(prefix=prefix_of(a)) as b:
        await cache_live(a)
        session = make_session()
        await b.save(session)
        assert await a.load(session.id) is not None
        await b.save(replace(session, refresh_token="v2.rotated", rt_version=1))

        async def rotated() -> bool:
            loaded = await a.load(session.id)
            return loaded is not None and loaded.refresh_token == "v2.rotated"

        await until(rotated)
        await b.delete(session.id)

        async def gone() -> bool:
            return await a.load(session.id) is None

        await until(gone)
        assert a.tracker is not None and a.tracker.invalidations >= 2


async def test_redis_store_read_your_own_writes_at_once() -> None:
    async with redis_store() as store:
        await cache_live(store)
        session = make_session()
        await store.save(session)
        assert await store.load(session.id) is not None
        await store.save(replace(session, refresh_token="v2.rotated", rt_version=1))
        loaded = await store.load(session.id)
        assert loaded is not None and loaded.refresh_token == "v2.rotated"
        await store.delete(session.id)
        assert await store.load(session.id) is None


async def test_redis_store_refresh_lock_reads_past_a_late_invalidation() -> None:
    # The holder before us (another instance) rotated the refresh token; its invalidation has
    # not arrived yet. Outside the lock the cache may lag by that delay; inside, never.
    async with redis_store() as a, redis_store(prefix=prefix_of(a)) as b:
        await cache_live(a)
        session = make_session()
        await a.save(session)

        async def cached() -> bool:  # once our own write's invalidation came back
            return await a.load(session.id) is not None and len(a._cache) > 0

        await until(cached)
        assert a.tracker is not None
        a.tracker._invalidate = lambda keys: None  # type: ignore[method-assign]
        await b.save(replace(session, refresh_token="v2.rotated", rt_version=1))
        stale = await a.load(session.id)
        assert stale is not None and stale.refresh_token == session.refresh_token
        async with a.refresh_lock(session.id):
            current = await a.load(session.id)
        assert current is not None and current.refresh_token == "v2.rotated"


async def test_redis_store_lost_invalidation_connection_drops_the_cache(raw: Redis) -> None:
    async with redis_store() as store:
        await cache_live(store)
        session = make_session()
        await store.save(session)

        async def cached() -> bool:  # once our own write's invalidation came back
            return await store.load(session.id) is not None and len(store._cache) > 0

        await until(cached)
        assert store.tracker is not None
        resets = store.tracker.resets
        await raw.client_kill_filter(_id=str(store.tracker.client_ids[0]))

        async def dropped() -> bool:
            return store.tracker is not None and store.tracker.resets > resets

        await until(dropped)
        assert len(store._cache) == 0
        await cache_live(store)  # it reconnects by itself
        loaded = await store.load(session.id)
        assert loaded is not None and loaded.refresh_token == session.refresh_token


async def test_redis_store_tracked_tokens_are_invalidated_too() -> None:
    async with redis_store() as a, redis_store(prefix=prefix_of(a)) as b:
        await cache_live(a)
        session = make_session()
        await a.save(session)
        old = CachedToken("at-1", time.time() + 100, "https://api")
        await a.put_token(session.id, "k", old)
        assert await a.get_token(session.id, "k") == old
        new = CachedToken("at-2", time.time() + 200, "https://api")
        await b.put_token(session.id, "k", new)

        async def replaced() -> bool:
            return await a.get_token(session.id, "k") == new

        await until(replaced)


async def test_redis_store_master_named_anew_by_the_sentinels_drops_the_cache() -> None:
    # Sentinel mode asks the sentinels every second; a new master means the cache (and the
    # connection carrying its invalidations) belonged to the old one.
    async with redis_store() as store:
        assert store.tracker is not None
        moved = [False]

        async def master_changed() -> bool:
            answer, moved[0] = moved[0], False
            return answer

        store.tracker._master_changed = master_changed
        await cache_live(store)
        session = make_session()
        await store.save(session)

        async def cached() -> bool:
            return await store.load(session.id) is not None and len(store._cache) > 0

        await until(cached)
        resets = store.tracker.resets
        moved[0] = True

        async def dropped() -> bool:
            return store.tracker is not None and store.tracker.resets > resets

        await until(dropped)
        assert len(store._cache) == 0
        await cache_live(store)  # following the (new) master again


@pytest.mark.parametrize(
    "error",
    [SlotNotCoveredError("slot 1 is not covered"), RedisClusterUnreachableError("no node")],
)
async def test_redis_store_cluster_client_errors_are_unavailable_not_500(
    store: RedisSessionStore, error: Exception
) -> None:
    # The cluster client's own errors are not RedisErrors (a failover leaves a slot uncovered
    # for a moment; every node unreachable; refused credentials).
    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    store._redis.hmget = failing
    with pytest.raises(SessionStoreUnavailable) as unavailable:
        await store.load("0" * 64)
    assert unavailable.value.retry_after is not None
