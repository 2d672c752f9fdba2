"""ConnectionRegistry, StreamGuard and the session-ended news: how a session's end reaches its
open connections in this process (the news for other instances: test_session_events.py)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx
from prometheus_client import CollectorRegistry

from gateway.connections import GOING_AWAY, SESSION_ENDED, ConnectionRegistry
from gateway.errors import RefreshTokenRejected
from gateway.oidc import OIDCClient
from gateway.routing import RouteTable
from gateway.services import Services
from gateway.sessions import MemorySessionStore, Session
from gateway.tokens import TokenBroker

from .conftest import DISCOVERY, make_settings

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeConnection:
    def __init__(self, kind: str = "websocket") -> None:
        self.kind = kind
        self.ended: list[tuple[int, str]] = []

    def end(self, code: int, reason: str) -> None:
        self.ended.append((code, reason))


def test_registry_close_session_ends_only_that_sessions_connections() -> None:
    registry = ConnectionRegistry()
    a1, a2, b1 = FakeConnection(), FakeConnection("stream"), FakeConnection()
    registry.register("a", a1)
    registry.register("a", a2)
    registry.register("b", b1)
    assert (registry.websockets, registry.streams) == (2, 1)
    assert registry.close_session("a") == 2
    assert a1.ended == [(SESSION_ENDED, "session ended")] and a2.ended == a1.ended
    assert b1.ended == []
    assert (registry.websockets, registry.streams) == (1, 0)
    assert registry.count("a") == 0 and registry.count("b") == 1
    assert registry.close_session("a") == 0  # idempotent
    registry.unregister("a", a1)  # a late unregister changes nothing
    assert registry.websockets == 1 and registry.closed_by_session_end == 2


def test_registry_unregister_drops_counts_and_empty_sessions() -> None:
    registry = ConnectionRegistry()
    connection = FakeConnection()
    registry.register("a", connection)
    registry.unregister("a", connection)
    registry.unregister("a", connection)
    assert registry.websockets == 0 and registry.count("a") == 0
    assert connection.ended == []


def test_registry_connection_registering_just_after_its_session_ended_is_ended() -> None:
    clock = Clock()
    registry = ConnectionRegistry(clock=clock)
    registry.close_session("a")  # logout raced a WebSocket handshake
    late = FakeConnection()
    registry.register("a", late)
    assert late.ended == [(SESSION_ENDED, "session ended")]
    clock.now += 301  # the memory of that end is bounded in time
    later = FakeConnection()
    registry.register("a", later)
    assert later.ended == []


def test_registry_close_all_uses_going_away() -> None:
    registry = ConnectionRegistry()
    connections = [FakeConnection(), FakeConnection("stream")]
    for index, connection in enumerate(connections):
        registry.register(str(index), connection)
    assert registry.close_all() == 2
    assert all(c.ended == [(GOING_AWAY, "gateway shutting down")] for c in connections)
    assert (registry.websockets, registry.streams) == (0, 0)


def test_registry_exports_gauges() -> None:
    registry = ConnectionRegistry()
    metrics = CollectorRegistry()
    registry.export(metrics)
    registry.register("a", FakeConnection())
    registry.register("a", FakeConnection("stream"))
    registry.register("b", FakeConnection("stream"))
    assert metrics.get_sample_value("gateway_open_websockets") == 1
    assert metrics.get_sample_value("gateway_open_streams") == 2


async def test_stream_guard_ends_an_idle_stream_and_swallows_only_its_own_cancel() -> None:
    registry = ConnectionRegistry()
    waiting = asyncio.Event()
    outcome: list[str] = []

    async def relay_stream(session_id: str | None) -> None:
        with registry.stream(session_id) as guard:
            waiting.set()
            await asyncio.sleep(3600)  # an event stream between two events
        outcome.append("ended" if guard.ended else "finished")

    task = asyncio.create_task(relay_stream("a"))
    await waiting.wait()
    assert registry.streams == 1
    assert registry.close_session("a") == 1
    await asyncio.wait_for(task, 1)
    assert outcome == ["ended"] and registry.streams == 0
    assert task.cancelling() == 0  # the cancellation was consumed, not leaked

    waiting.clear()
    other = asyncio.create_task(relay_stream("b"))
    await waiting.wait()
    other.cancel()  # somebody else's cancellation (server shutdown) propagates
    with pytest.raises(asyncio.CancelledError):
        await other
    assert registry.streams == 0 and outcome == ["ended"]


async def test_stream_registering_just_after_its_session_ended_is_ended_without_a_cancel() -> None:
    registry = ConnectionRegistry()
    registry.close_session("a")
    with registry.stream("a") as guard:
        assert guard.ended  # the relay loop stops before its first chunk
    await asyncio.sleep(0)  # a leaked cancellation would surface here
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    assert registry.streams == 0


async def test_stream_without_session_is_not_tracked() -> None:
    registry = ConnectionRegistry()
    with registry.stream(None) as guard:
        assert registry.streams == 0
    assert guard.ended is False


# -- sources of a session end -----------------------------------------------------------------


async def test_gateway_end_session_closes_connections_of_that_session() -> None:
    gateway = Services(make_settings())
    try:
        connection = FakeConnection()
        gateway.connections.register("sess-1", connection)
        await gateway.end_session("sess-1")
        assert connection.ended == [(SESSION_ENDED, "session ended")]
    finally:
        await gateway.idp_http.aclose()


async def test_broker_invalid_grant_reports_the_session_ended() -> None:
    settings = make_settings()
    store = MemorySessionStore(idle_timeout=3600)
    session = Session(
        id="sess-1", sub="alice", refresh_token="rt", created_at=0.0, absolute_expiry=9e9
    )
    await store.save(session)
    ended: list[str] = []

    async def on_ended(session_id: str) -> None:  # what Gateway.end_session does, in short
        ended.append(session_id)
        await store.delete(session_id)

    async with httpx.AsyncClient() as http:
        broker = TokenBroker(
            oidc=OIDCClient(settings, http),
            store=store,
            settings=settings.tokens,
            on_session_ended=on_ended,
        )
        route = RouteTable(settings.routes).match("/api/x")
        assert route is not None
        with respx.mock(assert_all_called=False) as idp:
            idp.get(f"{DISCOVERY['issuer']}.well-known/openid-configuration").respond(
                json=DISCOVERY
            )
            idp.post(str(DISCOVERY["token_endpoint"])).respond(400, json={"error": "invalid_grant"})
            with pytest.raises(RefreshTokenRejected):
                await broker.access_token(session, route)
    assert ended == ["sess-1"]
    assert await store.load("sess-1") is None
