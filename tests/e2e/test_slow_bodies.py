"""Slow request bodies on a public route do not starve other routes (review finding 2).

A real ``python -m gateway run`` process, the real upstreams and 1,000 real sockets that each
send a request head and one byte of body, then nothing.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .gateway_harness import CSRF, gateway_config, start_upstreams
from .login import browser_login
from .processes import GatewayProcess
from .servers import API, BILLING, IdpProcess, Upstream, free_port
from .slow_bodies import raise_fd_limit, slow_senders, timed_get, wait_for_connections

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SLOW = 1000  # the finding's number: every connection of the old shared pool (limit=1000)
VICTIM_ROUNDS = 5
SETTLE = 2.0  # seconds at most for the gateway to take in the slow requests' heads
VICTIM_TIMEOUT = 10.0  # seconds; before the fix a victim waited as long as the attack lasted
VICTIM_FAST = 2.0  # seconds: a victim answered within this was not held up (typical: ~10 ms)


@contextlib.contextmanager
def _gateway(
    idp: IdpProcess, **overrides: Any
) -> Iterator[tuple[GatewayProcess, dict[str, Upstream]]]:
    port = free_port()
    with start_upstreams(idp) as upstreams:
        gateway = GatewayProcess(
            gateway_config(idp, port, upstreams, **overrides), port=port, env={}
        )
        try:
            yield gateway, upstreams
        finally:
            gateway.stop()


async def _victims(client: httpx.AsyncClient, base_url: str) -> list[tuple[str, float, int | None]]:
    """A logged-in user's GETs on two other routes (other upstreams), one after the other. The
    first of each has no pooled upstream connection to reuse (none was opened before)."""
    seen: list[tuple[str, float, int | None]] = []
    for _ in range(VICTIM_ROUNDS):
        for path, audience in (("/api/x", API), ("/billing/y", BILLING)):
            seconds, status = await timed_get(
                client, base_url + path, headers=CSRF, timeout=VICTIM_TIMEOUT
            )
            seen.append((audience, seconds, status))
            if status is None:
                return seen  # held up: the rest would be too
    return seen


async def test_a_thousand_slow_bodies_on_a_public_route_do_not_delay_other_routes(
    idp: IdpProcess,
) -> None:
    raise_fd_limit(4 * SLOW + 1024)  # the senders, and the public upstream's side before the fix
    with _gateway(idp) as (gateway, upstreams):
        async with httpx.AsyncClient(timeout=30) as client:
            login = await browser_login(
                client, f"{gateway.base_url}/auth/login?return_to=/", idp_issuer=idp.issuer
            )
            assert login.status_code == 302, login.text
            # Small declared bodies (100 bytes) are read whole before an upstream is asked.
            async with slow_senders(gateway.base_url, "/public/upload", SLOW, declared=100):
                await wait_for_connections(upstreams["public"], SLOW, at_most=SETTLE)
                victims = await _victims(client, gateway.base_url)
                held_upstream = upstreams["public"].open_connections()
    slow = [(audience, round(s, 3), status) for audience, s, status in victims if s > VICTIM_FAST]
    assert slow == [], "victims held up by the slow bodies"
    assert {status for _, _, status in victims} == {200}
    assert held_upstream == 0  # no upstream connection waits for a slow sender


async def test_slow_streamed_bodies_are_cut_and_take_at_most_their_upstreams_share(
    idp: IdpProcess,
) -> None:
    """Bodies too large to read first stream, so they take upstream connections: at most the
    upstream's share (the rest wait up to acquire_timeout, then 503), and each is cut with 408
    once it has been quiet for body_idle_timeout."""
    count, share = 100, 50
    with _gateway(
        idp,
        limits={"body_idle_timeout": "2s"},
        upstream_pool={"max_connections_per_upstream": share, "acquire_timeout": "1s"},
    ) as (gateway, upstreams):
        async with httpx.AsyncClient(timeout=30) as client:
            login = await browser_login(
                client, f"{gateway.base_url}/auth/login?return_to=/", idp_issuer=idp.issuer
            )
            assert login.status_code == 302, login.text
            big = 1024 * 1024
            async with slow_senders(gateway.base_url, "/public/upload", count, declared=big) as s:
                victims = await _victims(client, gateway.base_url)
                statuses = collections.Counter(await s.statuses())
            after = upstreams["public"].open_connections()
    assert [v for v in victims if v[1] > VICTIM_FAST or v[2] != 200] == []
    assert statuses == {503: count - share, 408: share}
    assert upstreams["public"].requests == []  # no cut body was passed off as whole
    assert after <= share  # (idle keep-alive connections of the pool at most)
