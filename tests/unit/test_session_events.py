"""One contract suite for every SessionEvents backend (gateway/sessions/events.py).

The contract: a published session end reaches every other instance sharing the backend (and key
prefix) once, never the publisher itself (it closed its own connections directly); a handler
that fails does not end the subscription; publishing never raises (logout must not fail on
it). The in-process backend has no other instances: it delivers nothing, which the suite
states through ``reaches_others``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from gateway.sessions.events import (
    LocalSessionEvents,
    RedisSessionEvents,
    SessionEvents,
    create_session_events,
)

from .conftest import make_settings
from .raw_upstream import refusing_port

pytestmark = pytest.mark.anyio

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BOUND = 5.0  # no test waits longer than this for a delivery


@dataclass(frozen=True)
class Backend:
    make: Callable[[str, str], SessionEvents]  # (redis url, key prefix) -> one instance
    reaches_others: bool


def _redis(url: str, prefix: str) -> SessionEvents:
    return RedisSessionEvents(url=url, key_prefix=prefix, timeout=0.5)


BACKENDS: dict[str, Backend] = {
    "memory": Backend(lambda _url, _prefix: LocalSessionEvents(), reaches_others=False),
    "redis": Backend(_redis, reaches_others=True),
}


class Heard:
    """A handler recording the session ids it is told about, in order."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.ids: list[str] = []
        self._fail_on = fail_on
        self._changed = asyncio.Event()

    def __call__(self, session_id: str) -> None:
        if session_id == self._fail_on:
            raise RuntimeError("handler failed")
        self.ids.append(session_id)
        self._changed.set()

    async def wait_for(self, session_id: str) -> None:
        async with asyncio.timeout(BOUND):
            while session_id not in self.ids:
                self._changed.clear()
                await self._changed.wait()


class Instances:
    """Gateway instances of one test, under one fresh key prefix unless told otherwise."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.prefix = f"gwtest-events-{uuid.uuid4().hex[:8]}:"
        self.made: list[SessionEvents] = []

    async def start(
        self, handler: Heard, *, prefix: str | None = None, url: str = REDIS_URL
    ) -> SessionEvents:
        events = self.backend.make(url, prefix or self.prefix)
        self.made.append(events)
        await events.start(handler)
        return events

    async def deliveries_done(self, heard: Heard, marker: str) -> None:
        """Wait for ``marker`` where deliveries happen; where none do, there is nothing to
        wait for."""
        if self.backend.reaches_others:
            await heard.wait_for(marker)


@pytest.fixture(params=sorted(BACKENDS))
async def instances(request: pytest.FixtureRequest) -> AsyncIterator[Instances]:
    made = Instances(BACKENDS[request.param])
    try:
        yield made
    finally:
        for events in made.made:
            await events.close()


def _if_delivered(instances: Instances, ids: list[str]) -> list[str]:
    return ids if instances.backend.reaches_others else []


async def test_session_events_reach_every_other_instance_once_never_the_sender(
    instances: Instances,
) -> None:
    heard_a, heard_b, heard_c = Heard(), Heard(), Heard()
    a = await instances.start(heard_a)
    b = await instances.start(heard_b)
    c = await instances.start(heard_c)
    # Each publish is acknowledged by the backend before the next: one order for everyone.
    await a.publish("sess-1")
    await b.publish("sess-2")
    await c.publish("sess-3")
    await a.publish("sess-4")
    await instances.deliveries_done(heard_a, "sess-3")
    await instances.deliveries_done(heard_b, "sess-4")
    await instances.deliveries_done(heard_c, "sess-4")
    # Had a sender heard itself, its own id would come before the later ones it waited for.
    assert heard_a.ids == _if_delivered(instances, ["sess-2", "sess-3"])
    assert heard_b.ids == _if_delivered(instances, ["sess-1", "sess-3", "sess-4"])
    assert heard_c.ids == _if_delivered(instances, ["sess-1", "sess-2", "sess-4"])


async def test_session_events_start_again_keeps_one_listener_with_the_latest_handler(
    instances: Instances,
) -> None:
    first, latest, heard_a = Heard(), Heard(), Heard()
    a = await instances.start(heard_a)
    b = await instances.start(first)
    await b.start(latest)
    await a.publish("sess-1")
    await a.publish("sess-2")
    await instances.deliveries_done(latest, "sess-2")
    assert latest.ids == _if_delivered(instances, ["sess-1", "sess-2"])  # once each
    assert first.ids == []


async def test_session_events_failing_handler_does_not_end_the_subscription(
    instances: Instances, caplog: pytest.LogCaptureFixture
) -> None:
    failing = Heard(fail_on="sess-boom")
    a = await instances.start(Heard())
    await instances.start(failing)
    await a.publish("sess-boom")
    await a.publish("sess-after")
    await instances.deliveries_done(failing, "sess-after")
    assert failing.ids == _if_delivered(instances, ["sess-after"])
    assert "sess-boom" not in caplog.text  # the log names the failure, not the session


async def test_session_events_are_scoped_to_their_key_prefix(instances: Instances) -> None:
    ours, theirs = Heard(), Heard()
    other_prefix = f"gwtest-events-{uuid.uuid4().hex[:8]}:"
    a = await instances.start(Heard())
    await instances.start(ours)
    await instances.start(theirs, prefix=other_prefix)
    neighbour = await instances.start(Heard(), prefix=other_prefix)
    await a.publish("sess-ours")
    await neighbour.publish("sess-theirs")
    await instances.deliveries_done(ours, "sess-ours")
    await instances.deliveries_done(theirs, "sess-theirs")
    assert ours.ids == _if_delivered(instances, ["sess-ours"])
    assert theirs.ids == _if_delivered(instances, ["sess-theirs"])


async def test_session_events_publish_never_raises_without_the_backend(
    instances: Instances,
) -> None:
    with refusing_port() as port:
        async with asyncio.timeout(BOUND):
            events = await instances.start(Heard(), url=f"redis://127.0.0.1:{port}/0")
            await events.publish("sess-1")  # logged, not raised: the logout goes on


async def test_session_events_close_is_idempotent_and_publish_after_it_does_not_raise(
    instances: Instances,
) -> None:
    events = await instances.start(Heard())
    await events.close()
    await events.close()
    await events.publish("sess-1")


async def test_redis_session_events_ignore_malformed_messages() -> None:
    heard = Heard()
    events = RedisSessionEvents(url=REDIS_URL, key_prefix=f"gwtest-events-{uuid.uuid4().hex}:")
    raw = Redis.from_url(REDIS_URL)
    try:
        await events.start(heard)
        for junk in (b"no-separator", b"instance-without-session ", b""):
            await raw.publish(events.channel, junk)
        await raw.publish(events.channel, b"other-instance sess-1")
        await heard.wait_for("sess-1")
    finally:
        await raw.aclose()
        await events.close()
    assert heard.ids == ["sess-1"]


def test_create_session_events_follows_the_session_store() -> None:
    key = "k" * 48
    memory = make_settings()
    redis = make_settings(session={"store": "redis", "secret_key": [key]})
    assert type(create_session_events(memory)) is LocalSessionEvents
    assert type(create_session_events(redis)) is RedisSessionEvents


async def test_session_events_log_no_session_id_when_publishing_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with refusing_port() as port:
        events = _redis(f"redis://127.0.0.1:{port}/0", "gwtest-events-down:")
        try:
            await events.publish("sess-secret-id")
        finally:
            await events.close()
    assert "could not publish" in caplog.text and "sess-secret-id" not in caplog.text
