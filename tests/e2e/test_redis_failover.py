"""Failover of real Redis topologies on loopback (issue 22, item 3): one master, one replica and
three sentinels, then a cluster of three masters with a replica each; a master is killed.

While Redis fails over, a request gets 200 (from the tracked cache, until its lease) or 503 +
Retry-After, never a 500 or a 401, and never waits much past ``redis_timeout``; the gateway then
follows the new master by itself and the sessions replicated before the kill keep working.
The last tests pin down the one-exchange-at-a-time guarantee when the lock is lost with the
master (README, "Redis: the guarantee across a failover").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TypeVar
from uuid import uuid4

import httpx
import pytest

from gateway.crypto import SessionCipher
from gateway.errors import SessionStoreUnavailable
from gateway.sessions import CachedToken, Session
from gateway.sessions._redis_connect import RedisEndpoints
from gateway.sessions.redis import RedisSessionStore

from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .redis_topologies import (
    ACL_USER,
    MASTER,
    ClusterTopology,
    SentinelTopology,
    cluster_topology,
    sentinel_topology,
    wait_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
T = TypeVar("T")

REDIS_TIMEOUT = 1.0
# A request makes a few Redis operations, each bounded by REDIS_TIMEOUT; the rest is slack for
# a shared machine (this bounds a hang, it does not time the gateway).
REQUEST_BOUND = 3 * REDIS_TIMEOUT + 5.0
FAILOVER_WITHIN = 60.0
KEY = "failover-secret-key-failover-secret-key"


@pytest.fixture
def sentinel() -> Iterator[SentinelTopology]:
    with sentinel_topology() as topology:
        yield topology


@pytest.fixture
def cluster() -> Iterator[ClusterTopology]:
    with cluster_topology() as topology:
        yield topology


def sentinel_endpoints(topology: SentinelTopology) -> RedisEndpoints:
    return RedisEndpoints(
        url="redis://127.0.0.1:6379/0",
        mode="sentinel",
        sentinels=topology.addresses,
        sentinel_master=MASTER,
    )


def cluster_endpoints(topology: ClusterTopology) -> RedisEndpoints:
    return RedisEndpoints(url=topology.url, mode="cluster", cluster_nodes=topology.seeds)


@asynccontextmanager
async def topology_store(
    endpoints: RedisEndpoints, prefix: str, *, lock_timeout: float = 15.0
) -> AsyncIterator[RedisSessionStore]:
    store = RedisSessionStore(
        url=endpoints.url,
        key_prefix=prefix,
        idle_timeout=600,
        cipher=SessionCipher([KEY]),
        timeout=REDIS_TIMEOUT,
        lock_timeout=lock_timeout,
        endpoints=endpoints,
    )
    try:
        yield store
    finally:
        await store.close()


def new_session(**overrides: object) -> Session:
    now = time.time()
    session = Session(
        id=uuid4().hex,
        sub="alice",
        sid="idp-sid",
        refresh_token="rt-1",
        created_at=now,
        absolute_expiry=now + 3600,
        claims={"sub": "alice"},
    )
    return replace(session, **overrides)  # type: ignore[arg-type]


async def eventually(call: Callable[[], Awaitable[T]], within: float = FAILOVER_WITHIN) -> T:
    """The first result of ``call`` that does not raise SessionStoreUnavailable, retried while
    Redis fails over; every failure must be that one error, within the operation's bound."""
    deadline = time.monotonic() + within
    while True:
        started = time.monotonic()
        try:
            return await call()
        except SessionStoreUnavailable:
            assert time.monotonic() - started < REQUEST_BOUND
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def until(predicate: Callable[[], bool], what: str, within: float = FAILOVER_WITHIN) -> None:
    """``wait_for`` off the event loop (the predicates run redis-cli), so the store's own tasks
    (invalidations, lock renewal) keep running meanwhile."""
    await asyncio.to_thread(wait_for, predicate, what, within)


# The gateway in front of a topology


def topology_session(endpoints: RedisEndpoints, prefix: str) -> dict[str, object]:
    """The ``session`` section of a gateway on ``endpoints``."""
    session: dict[str, object] = {
        "store": "redis",
        "redis_url": endpoints.url,
        "redis_mode": endpoints.mode,
        "redis_key_prefix": prefix,
        "redis_timeout": f"{REDIS_TIMEOUT}s",
    }
    if endpoints.mode == "sentinel":
        session["redis_sentinels"] = list(endpoints.sentinels)
        session["redis_sentinel_master"] = endpoints.sentinel_master
    else:
        session["redis_cluster_nodes"] = list(endpoints.cluster_nodes)
    return session


async def load_through(
    gateway: GatewayUnderTest,
    client: httpx.AsyncClient,
    kill: Callable[[], None],
    recovered: Callable[[], bool],
    *,
    concurrency: int = 4,
) -> Counter[int]:
    """Steady requests on one session while ``kill`` runs, until ``recovered()`` and then ten
    answers in a row are 200. Every answer is 200 or 503 + Retry-After, within REQUEST_BOUND."""
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    done = asyncio.Event()
    streak = 0
    deadline = time.monotonic() + FAILOVER_WITHIN

    async def one_worker() -> None:
        nonlocal streak
        while not done.is_set():
            started = time.monotonic()
            try:
                response = await client.get(f"{gateway.base_url}/api/x", headers=CSRF)
            except httpx.HTTPError as exc:
                problems.append(f"transport error {exc!r}")
                done.set()
                return
            elapsed = time.monotonic() - started
            statuses[response.status_code] += 1
            if response.status_code == 503 and "retry-after" not in response.headers:
                problems.append("503 without Retry-After")
            if response.status_code not in (200, 503):
                problems.append(f"{response.status_code}: {response.text}")
            if elapsed > REQUEST_BOUND:
                problems.append(f"a request took {elapsed:.1f}s")
            if problems or time.monotonic() > deadline:
                done.set()
                return
            streak = streak + 1 if response.status_code == 200 else 0
            if streak >= 10 and await asyncio.to_thread(recovered):
                done.set()
                return
            await asyncio.sleep(0.02)

    workers = [asyncio.create_task(one_worker()) for _ in range(concurrency)]
    await asyncio.sleep(0.3)  # steady load before the kill
    await asyncio.to_thread(kill)
    await asyncio.gather(*workers)
    assert not problems, (problems[:5], statuses)
    assert time.monotonic() <= deadline, f"no recovery within {FAILOVER_WITHIN}s: {statuses}"
    print(f"answers during the failover: {dict(statuses)}")
    return statuses


async def test_sentinel_gateway_follows_the_new_master_without_a_500(
    idp: object, sentinel: SentinelTopology
) -> None:
    endpoints = sentinel_endpoints(sentinel)
    with start_upstreams(idp) as upstreams:  # type: ignore[arg-type]
        session = topology_session(endpoints, f"gwtest-{uuid4().hex[:8]}:")
        with run_gateway(idp, upstreams, session=session) as gateway:  # type: ignore[arg-type]
            async with gateway.client() as client:
                await gateway.login(client)
                assert (await client.get("/api/x", headers=CSRF)).status_code == 200
                await until(sentinel.is_replicated, "the session to reach the replica")
                old = sentinel.master.port
                statuses = await load_through(
                    gateway,
                    client,
                    sentinel.master.kill,
                    lambda: sentinel.master_port() != old,
                )
                # The session written before the kill is on the new master: still logged in.
                me = await client.get("/auth/me")
                assert me.status_code == 200, me.text
                assert sentinel.master_port() == sentinel.replica.port
                assert statuses[200] > 0


async def test_cluster_gateway_follows_the_new_master_without_a_500(
    idp: object, cluster: ClusterTopology
) -> None:
    endpoints = cluster_endpoints(cluster)
    prefix = f"gwtest-{uuid4().hex[:8]}:"
    with start_upstreams(idp) as upstreams:  # type: ignore[arg-type]
        session = topology_session(endpoints, prefix)
        with run_gateway(idp, upstreams, session=session) as gateway:  # type: ignore[arg-type]
            async with gateway.client() as client:
                await gateway.login(client)
                assert (await client.get("/api/x", headers=CSRF)).status_code == 200
                await until(cluster.is_replicated, "the session to reach the replicas")
                victim = cluster.node_holding(f"{prefix}sess:*")
                await load_through(
                    gateway,
                    client,
                    victim.kill,
                    lambda: cluster.has_failed_over(f"{prefix}sess:*", victim),
                )
                me = await client.get("/auth/me")
                assert me.status_code == 200, me.text


# The store on each topology


async def test_cluster_store_keeps_every_operation_in_its_slot(cluster: ClusterTopology) -> None:
    prefix = f"gwtest-{uuid4().hex[:8]}:"
    async with (
        topology_store(cluster_endpoints(cluster), prefix) as first,
        topology_store(cluster_endpoints(cluster), prefix) as second,
    ):
        sessions = [new_session(sid=f"sid-{i}") for i in range(6)]  # spread over the slots
        for session in sessions:
            await first.save(session)
            await first.put_token(session.id, "api", CachedToken("at", time.time() + 60, "api"))
        assert await second.load(sessions[0].id) == sessions[0]
        assert (await second.get_token(sessions[0].id, "api")) is not None
        assert sorted(await second.find(sub="alice")) == sorted(s.id for s in sessions)
        assert await second.find(sid="sid-3") == [sessions[3].id]
        await second.touch(sessions[1])
        async with second.refresh_lock(sessions[2].id):
            rotated = replace(sessions[2], refresh_token="rt-2", rt_version=1)
            await second.save(rotated)
        assert await first.load(sessions[2].id) == rotated
        assert await first.delete(sessions[0].id) == sessions[0]
        assert await second.load(sessions[0].id) is None
        assert sessions[0].id not in await second.find(sub="alice")
        # Pending logins share one slot with the set that bounds them.
        await first.put_login("state-1", {"v": "1"}, ttl=60)
        assert await second.pop_login("state-1") == {"v": "1"}
        assert await second.pop_login("state-1") is None
        assert await first.remember_jti("jti-1", 60) is True
        assert await second.remember_jti("jti-1", 60) is False
        # The gateway's client-credentials token and its lock: single keys, any slot.
        token = CachedToken("at-client", time.time() + 60, "https://api")
        async with first.refresh_lock("client:0123abcd"):
            await first.put_client_token("https://api read", token)
        assert await second.get_client_token("https://api read") == token


async def test_sentinel_store_answers_unavailable_then_follows_the_new_master(
    sentinel: SentinelTopology,
) -> None:
    prefix = f"gwtest-{uuid4().hex[:8]}:"
    async with topology_store(sentinel_endpoints(sentinel), prefix) as store:
        session = new_session()
        await store.save(session)
        await store.put_token(session.id, "api", CachedToken("at", time.time() + 60, "api"))
        await until(sentinel.is_replicated, "the session to reach the replica")
        sentinel.master.kill()
        await eventually(lambda: store.save(replace(session, claims={"v": 2})))
        assert sentinel.master_port() == sentinel.replica.port
        loaded = await store.load(session.id)
        assert loaded is not None and loaded.claims == {"v": 2}
        assert (await store.get_token(session.id, "api")) is not None
        # The invalidation connection follows too: the cache serves hits again.
        for _ in range(300):
            if store._cache.is_live:
                break
            await asyncio.sleep(0.1)
        assert store._cache.is_live


@pytest.mark.parametrize("tls", [False, True], ids=["acl", "acl+tls"])
@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
async def test_acl_user_and_tls_work_in_each_mode(mode: str, tls: bool) -> None:
    """The URL's ACL user (and only keys under the prefix), over TLS with a private CA named in
    the URL, for data, scripts, the indexes, the sentinels and the invalidation connections; a
    wrong password is a 503, not a crash."""
    name, password = ACL_USER
    with contextlib.ExitStack() as stack:
        if mode == "sentinel":
            sentinel = stack.enter_context(sentinel_topology(acl=True, tls=tls))
            plain, ca = sentinel_endpoints(sentinel), sentinel.master.tls
        else:
            cluster = stack.enter_context(cluster_topology(acl=True, tls=tls))
            plain, ca = cluster_endpoints(cluster), cluster.servers[0].tls
        address = plain.url.removeprefix("redis://")
        scheme, query = "redis", ""
        if ca is not None:
            scheme, query = "rediss", f"?ssl_ca_certs={ca / 'ca.crt'}"
        endpoints = replace(plain, url=f"{scheme}://{name}:{password}@{address}{query}")
        prefix = f"gwtest-{uuid4().hex[:8]}:"
        async with topology_store(endpoints, prefix) as store:
            session = new_session()
            await store.save(session)
            await store.put_token(session.id, "api", CachedToken("at", time.time() + 60, "api"))
            assert await store.find(sid="idp-sid") == [session.id]
            await store.put_login("state", {"v": "1"}, ttl=60)
            assert await store.pop_login("state") == {"v": "1"}
            for _ in range(300):  # the invalidation connections authenticate too
                if store._cache.is_live:
                    break
                await store.load(session.id)
                await asyncio.sleep(0.05)
            assert store._cache.is_live
            assert await store.load(session.id) == session
            assert await store.delete(session.id) == session
        wrong = replace(endpoints, url=endpoints.url.replace(password, "not-the-password"))
        async with topology_store(wrong, prefix) as refused:
            with pytest.raises(SessionStoreUnavailable):
                await refused.load(session.id)


# One exchange at a time across a failover (README: "the guarantee across a failover")


async def test_lock_lost_with_the_master_fencing_refuses_the_old_holder(
    sentinel: SentinelTopology,
) -> None:
    """A holds the refresh lock; the master dies and its replica never got the lock (Redis
    replicates asynchronously: deleting the key on the new master stands for the write that
    did not arrive). B then takes the lock and rotates: A's save is refused, B's stays."""
    prefix = f"gwtest-{uuid4().hex[:8]}:"
    endpoints = sentinel_endpoints(sentinel)
    async with (
        topology_store(endpoints, prefix) as a,
        topology_store(endpoints, prefix) as b,
    ):
        session = new_session()
        await a.save(session)
        async with a.refresh_lock(session.id):
            await until(sentinel.is_replicated, "the lock to reach the replica")
            sentinel.master.kill()
            await asyncio.to_thread(sentinel.wait_failed_over)
            sentinel.replica.cli("DEL", f"{prefix}lock:{session.id}")  # the lost write

            async def b_rotates() -> None:
                async with b.refresh_lock(session.id):
                    current = await b.load(session.id)
                    assert current is not None and current.refresh_token == "rt-1"
                    await b.save(replace(current, refresh_token="rt-b", rt_version=1))

            await eventually(b_rotates)
            # A's exchange (same rt-1: the IdP sees it twice) comes back last: refused.
            refused = await _fenced_refusal(a, replace(session, refresh_token="rt-a", rt_version=1))
            assert "lock lost" in refused.message
        stored = await b.load(session.id)
        assert stored is not None and stored.refresh_token == "rt-b"


async def _fenced_refusal(store: RedisSessionStore, session: Session) -> SessionStoreUnavailable:
    """The error of ``store.save(session)`` once Redis answers (not a connection error)."""
    deadline = time.monotonic() + FAILOVER_WITHIN
    while True:
        try:
            await store.save(session)
        except SessionStoreUnavailable as exc:
            if "unavailable during" not in exc.message or time.monotonic() > deadline:
                return exc
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the old holder's save was stored")
