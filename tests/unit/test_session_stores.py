"""One contract suite, run against every SessionStore implementation (oauth2-proxy style)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace

import pytest

from gateway.crypto import SessionCipher
from gateway.errors import SessionEnded, SessionStoreUnavailable, TooManyPendingLogins
from gateway.sessions import CachedToken, MemorySessionStore, Session, SessionStore
from gateway.sessions.base import LOAD_LATER
from gateway.sessions.manager import SessionManager
from tests.unit.test_redis_store import redis_store

from .conftest import make_settings

IDLE = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


MAX_PENDING = 5  # session.max_pending_logins of the stores under test
StoreFactory = Callable[[FakeClock], AsyncGenerator[SessionStore, None]]


async def _memory(clock: FakeClock) -> AsyncGenerator[SessionStore, None]:
    yield MemorySessionStore(idle_timeout=IDLE, clock=clock, max_pending_logins=MAX_PENDING)


async def _redis(clock: FakeClock) -> AsyncGenerator[SessionStore, None]:
    # A fresh key prefix per test, deleted afterwards; Redis keeps real time, the store's
    # read-side checks follow the fake clock.
    async with redis_store(idle_timeout=IDLE, clock=clock, max_pending_logins=MAX_PENDING) as store:
        yield store


STORE_FACTORIES: dict[str, StoreFactory] = {"memory": _memory, "redis": _redis}


@pytest.fixture(params=sorted(STORE_FACTORIES))
async def store_and_clock(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[SessionStore, FakeClock]]:
    clock = FakeClock()
    gen = STORE_FACTORIES[request.param](clock)
    store = await gen.__anext__()
    try:
        yield store, clock
    finally:
        await store.close()
        await gen.aclose()


def make_session(clock: FakeClock, sid: str = "s1", sub: str = "alice", **kw: object) -> Session:
    return Session(
        id=f"id-{sid}-{sub}",
        sub=sub,
        sid=sid,
        refresh_token="rt-secret",
        created_at=clock.now,
        absolute_expiry=clock.now + 3600,
        claims={"sub": sub},
        **kw,  # type: ignore[arg-type]
    )


pytestmark = pytest.mark.anyio


async def test_store_save_then_load_roundtrips(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    session = make_session(clock)
    await store.save(session)
    loaded = await store.load(session.id)
    assert loaded is not None
    assert loaded.refresh_token == "rt-secret"
    assert loaded.claims == {"sub": "alice"}
    assert await store.load("missing") is None


async def test_store_keeps_claims_and_id_token_exactly(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    claims = {"sub": "alice", "name": "Zoë", "roles": ["a", "b"], "email_verified": True}
    id_token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    session = make_session(clock, id_token=id_token)
    session.claims = claims
    await store.save(session)
    for _ in range(2):  # the second load reads what the first one left behind
        loaded = await store.load(session.id)
        assert loaded is not None
        assert loaded.claims == claims and loaded.id_token == id_token
        assert (loaded.sub, loaded.sid, loaded.rt_version) == ("alice", "s1", 0)
        await store.touch(loaded)


async def test_store_load_after_idle_timeout_returns_none(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    session = make_session(clock)
    await store.save(session)
    clock.now += IDLE + 1
    assert await store.load(session.id) is None


async def test_store_touch_slides_idle_expiry(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    session = make_session(clock)
    await store.save(session)
    clock.now += IDLE - 10
    await store.touch(session)
    clock.now += IDLE - 10
    assert await store.load(session.id) is not None


async def test_store_touch_never_revives_an_idle_expired_session(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    session = make_session(clock)
    await store.save(session)
    clock.now += IDLE + 1
    await store.touch(session)  # e.g. a request that loaded it just before it expired
    assert await store.load(session.id) is None


async def test_store_touch_with_an_older_copy_keeps_the_rotated_session(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    # touch slides the expiry of what is stored; it writes nothing else, so a request that
    # loaded the session before a rotation cannot put the old refresh token back through it.
    store, clock = store_and_clock
    await store.save(make_session(clock))
    before = await store.load(make_session(clock).id)
    assert before is not None
    await store.save(replace(before, refresh_token="rt-rotated", rt_version=1))
    clock.now += 10
    await store.touch(before)
    loaded = await store.load(before.id)
    assert loaded is not None
    assert (loaded.refresh_token, loaded.rt_version) == ("rt-rotated", 1)
    clock.now += IDLE - 5  # and the expiry did slide
    assert await store.load(before.id) is not None


async def test_store_absolute_expiry_wins_over_touch(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    session = make_session(clock)
    session.absolute_expiry = clock.now + 30
    await store.save(session)
    clock.now += 20
    await store.touch(session)
    clock.now += 11
    assert await store.load(session.id) is None


async def test_store_delete_removes_session_and_tokens(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    session = make_session(clock)
    await store.save(session)
    token = CachedToken("at", clock.now + 100, "https://api")
    await store.put_token(session.id, "k", token)
    assert await store.get_token(session.id, "k") == token
    deleted = await store.delete(session.id)
    assert deleted is not None and deleted.id == session.id
    assert await store.load(session.id) is None
    assert await store.get_token(session.id, "k") is None
    assert await store.delete(session.id) is None


async def test_store_find_by_sid_and_sub(store_and_clock: tuple[SessionStore, FakeClock]) -> None:
    store, clock = store_and_clock
    a = make_session(clock, sid="s1", sub="alice")
    b = make_session(clock, sid="s2", sub="alice")
    c = make_session(clock, sid="s3", sub="bob")
    for s in (a, b, c):
        await store.save(s)
    assert sorted(await store.find(sub="alice")) == sorted([a.id, b.id])
    assert await store.find(sid="s3") == [c.id]
    assert await store.find(sid="s1", sub="bob") == []
    assert await store.find() == []
    await store.delete(a.id)
    assert await store.find(sid="s1") == []


async def test_store_expired_token_not_returned(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    session = make_session(clock)
    await store.save(session)
    await store.put_token(session.id, "k", CachedToken("at", clock.now + 5, "https://api"))
    clock.now += 6
    assert await store.get_token(session.id, "k") is None


async def test_store_put_login_past_the_cap_is_refused_and_keeps_the_pending_ones(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    # Review item 6: anyone can start a login. Before, Redis stored every one and the memory
    # store pushed the oldest (real users' logins) out past its cap.
    store, clock = store_and_clock
    for i in range(MAX_PENDING):
        await store.put_login(f"state{i}", {"i": str(i)}, ttl=600)
    clock.now += 100
    with pytest.raises(TooManyPendingLogins) as refused:
        await store.put_login("flood", {"i": "x"}, ttl=600)
    assert refused.value.status_code == 503
    assert refused.value.error == "too_many_pending_logins"
    assert 1 <= refused.value.retry_after <= 60
    assert await store.pop_login("state0") == {"i": "0"}  # nothing pending was pushed out
    await store.put_login("after-a-callback", {"i": "y"}, ttl=600)  # a finished login frees one
    with pytest.raises(TooManyPendingLogins):
        await store.put_login("flood", {"i": "x"}, ttl=600)
    clock.now += 501  # the first five expired (t + 600); "after-a-callback" is still pending
    for i in range(MAX_PENDING - 1):
        await store.put_login(f"later{i}", {"i": str(i)}, ttl=600)
    with pytest.raises(TooManyPendingLogins):
        await store.put_login("flood", {"i": "x"}, ttl=600)
    assert await store.pop_login("after-a-callback") == {"i": "y"}
    assert await store.pop_login("flood") is None


async def test_store_pending_logins_bounded_under_a_flood(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, _ = store_and_clock
    refused = 0
    for i in range(200):
        try:
            await store.put_login(f"state{i}", {"return_to": "/" + "x" * 2047}, ttl=600)
        except TooManyPendingLogins:
            refused += 1
    assert refused == 200 - MAX_PENDING
    assert sum([await store.pop_login(f"state{i}") is not None for i in range(200)]) == MAX_PENDING


async def test_store_rotated_save_never_revives_a_deleted_session(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    # A logout (delete) while a refresh is in flight: the rotated refresh token must not
    # bring the session back.
    store, clock = store_and_clock
    session = make_session(clock)
    await store.save(session)
    await store.delete(session.id)
    rotated = make_session(clock)
    rotated.refresh_token, rotated.rt_version = "rt-rotated", 1
    with pytest.raises(SessionEnded):
        await store.save(rotated)
    assert await store.load(session.id) is None


async def test_store_stale_refresh_token_write_is_refused(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    # Fencing: a request still holding the session from before a rotation must not put the
    # old (now dead) refresh token back.
    store, clock = store_and_clock
    session = make_session(clock)
    await store.save(session)
    await store.save(replace(session, refresh_token="rt-rotated", rt_version=1))
    with pytest.raises(SessionStoreUnavailable, match="stale write refused"):
        await store.save(replace(session, claims={"late": True}))
    loaded = await store.load(session.id)
    assert loaded is not None
    assert (loaded.refresh_token, loaded.rt_version, loaded.claims) == (
        "rt-rotated",
        1,
        {"sub": "alice"},
    )
    # The same version may still be written (claims, expiry): only older ones are refused.
    await store.save(replace(loaded, claims={"sub": "alice", "name": "Alice"}))
    again = await store.load(session.id)
    assert again is not None and again.claims == {"sub": "alice", "name": "Alice"}


async def test_store_loaded_session_is_not_changed_by_later_writes(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    # What callers may rely on whether or not load copies (see the SessionStore docstring).
    store, clock = store_and_clock
    await store.save(make_session(clock))
    loaded = await store.load(make_session(clock).id)
    assert loaded is not None
    await store.save(replace(loaded, refresh_token="rt-rotated", rt_version=1, claims={}))
    assert (loaded.refresh_token, loaded.rt_version, loaded.claims) == (
        "rt-secret",
        0,
        {"sub": "alice"},
    )
    rotated = await store.load(loaded.id)
    assert rotated is not None and rotated.refresh_token == "rt-rotated"
    await store.delete(loaded.id)
    assert (rotated.refresh_token, rotated.rt_version) == ("rt-rotated", 1)
    assert loaded.id == rotated.id == make_session(clock).id


async def test_store_pop_login_is_single_use(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    await store.put_login("state1", {"nonce": "n", "verifier": "v"}, ttl=60)
    assert await store.pop_login("state1") == {"nonce": "n", "verifier": "v"}
    assert await store.pop_login("state1") is None
    await store.put_login("state2", {"x": "y"}, ttl=10)
    clock.now += 11
    assert await store.pop_login("state2") is None


async def test_store_refresh_lock_serialises_holders(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, _ = store_and_clock
    inside = 0
    peak = 0

    async def hold() -> None:
        nonlocal inside, peak
        async with store.refresh_lock("sess"):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(hold() for _ in range(10)))
    assert peak == 1


async def test_store_refresh_lock_is_per_session(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, _ = store_and_clock
    async with store.refresh_lock("a"):
        # A different session's lock is free while "a" is held.
        await asyncio.wait_for(_enter_and_leave(store, "b"), timeout=2)


async def _enter_and_leave(store: SessionStore, session_id: str) -> None:
    async with store.refresh_lock(session_id):
        pass


async def test_store_ping_answers(store_and_clock: tuple[SessionStore, FakeClock]) -> None:
    store, _ = store_and_clock
    await store.ping()


async def test_store_remember_jti_is_true_once_until_ttl(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    assert await store.remember_jti("jti-1", ttl=0.3) is True
    assert await store.remember_jti("jti-1", ttl=0.3) is False
    assert await store.remember_jti("jti-2", ttl=0.3) is True
    # Past the ttl the id may be forgotten: Redis follows real time, the memory store the clock.
    clock.now += 0.5
    await asyncio.sleep(0.5)
    assert await store.remember_jti("jti-1", ttl=60) is True
    assert await store.remember_jti("jti-1", ttl=60) is False


async def test_memory_store_load_now_answers_as_load() -> None:
    clock = FakeClock()
    store = MemorySessionStore(idle_timeout=IDLE, clock=clock)
    session = make_session(clock)
    await store.save(session)
    # The memory store hands out its own object (no copy per request): the documented
    # difference from the Redis store, whose loads are private copies (SessionStore docstring).
    assert store.load_now(session.id) is session
    assert await store.load(session.id) is session
    assert store.load_now("no-such-session") is None
    clock.now += IDLE + 1  # idle-expired: gone for both, and dropped
    assert store.load_now(session.id) is None
    assert await store.load(session.id) is None
    assert len(store) == 0


class _LoadOnly:
    """A store that reads only through ``load``: no ``load_now``."""

    def __init__(self, inner: MemorySessionStore) -> None:
        self._inner = inner
        self.idle_timeout = inner.idle_timeout
        self.loads = 0

    async def load(self, session_id: str) -> Session | None:
        self.loads += 1
        return await self._inner.load(session_id)

    def __getattr__(self, name: str) -> object:
        if name == "load_now":
            raise AttributeError(name)
        return getattr(self._inner, name)


class _CacheMiss(_LoadOnly):
    """A store whose ``load_now`` cannot answer now (the Redis store on a cache miss)."""

    def load_now(self, session_id: str) -> object:
        return LOAD_LATER


async def test_session_manager_reads_without_a_coroutine_only_where_the_store_can() -> None:
    key = "k" * 48
    settings = make_settings(session={"secret_key": [key]})
    cipher = SessionCipher([key])
    memory = MemorySessionStore(idle_timeout=IDLE)

    async def never_awaited(session_id: str) -> Session | None:
        raise AssertionError("the memory store is read through load_now")

    read_now = MemorySessionStore(idle_timeout=IDLE)
    read_now.load = never_awaited  # type: ignore[method-assign]
    cases = ((read_now, False), (_LoadOnly(memory), True), (_CacheMiss(memory), True))
    for store, loads_through_load in cases:
        manager = SessionManager(settings, store, cipher)  # type: ignore[arg-type]
        session, set_cookie = await manager.create(
            sub="alice", sid="s1", refresh_token="rt", id_token=None, claims={"sub": "alice"}
        )
        cookie = set_cookie.split(";", 1)[0]
        current = await manager.current(cookie)
        assert current is not None and current.id == session.id
        assert await manager.current(cookie + "x") is None  # a bad signature is still refused
        if loads_through_load:
            assert store.loads == 1  # type: ignore[union-attr]


async def test_store_put_login_with_a_cap_of_zero_refuses_cleanly() -> None:
    """No crash on an empty table (a store built without settings, which require >= 1)."""
    memory = MemorySessionStore(idle_timeout=IDLE, max_pending_logins=0)
    async with redis_store(max_pending_logins=0) as redis:
        for store in (memory, redis):
            with pytest.raises(TooManyPendingLogins) as refused:
                await store.put_login("state", {"i": "0"}, ttl=600)
            assert refused.value.retry_after == 60


async def test_store_client_token_needs_no_session_and_expires(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    # The gateway's client-credentials tokens: their own methods, and a lock under
    # ``client:<digest>`` that names no session.
    store, clock = store_and_clock
    token = CachedToken("at-client", clock.now + 100, "https://api")
    await store.put_client_token("https://api read", token)
    assert await store.get_client_token("https://api read") == token
    async with store.refresh_lock("client:0123abcd"):
        assert await store.get_client_token("https://api read") == token
    assert await store.get_token("client:0123abcd", "https://api read") is None
    clock.now += 101
    assert await store.get_client_token("https://api read") is None


async def test_store_put_token_of_an_ended_session_is_not_kept(
    store_and_clock: tuple[SessionStore, FakeClock],
) -> None:
    store, clock = store_and_clock
    await store.put_token("0" * 64, "k", CachedToken("at", clock.now + 100, "https://api"))
    assert await store.get_token("0" * 64, "k") is None
