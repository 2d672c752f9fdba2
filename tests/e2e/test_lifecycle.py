"""Graceful shutdown: in-flight requests finish within the grace period, then the IdP client,
the upstream pool and the session store are closed."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway import create_app
from gateway.proxy import AiohttpUpstreamClient

from .gateway_harness import CSRF, GatewayUnderTest, gateway_settings, start_upstreams
from .processes import SHARED_REDIS_URL, redis_key_prefix
from .servers import API, CLIENT_ID, IdpProcess, reserve_socket, run_asgi
from .test_container_entrypoint import image_process

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

REDIS_URL = SHARED_REDIS_URL
UPSTREAM_SLEEP = 1.5


class SlowUpstream:
    """An upstream that says when a request arrived, then takes ``seconds`` to answer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.arrived = threading.Event()
        self.finished = threading.Event()

        async def slow(request: Request) -> JSONResponse:
            self.arrived.set()
            await asyncio.sleep(self.seconds)
            self.finished.set()
            return JSONResponse({"slept": self.seconds})

        self.app = Starlette(routes=[Route("/{path:path}", slow)])

    async def wait_arrived(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.arrived.is_set():
            assert time.monotonic() < deadline, "the request never reached the upstream"
            await asyncio.sleep(0.01)


@contextlib.contextmanager
def slow_upstream(seconds: float) -> Iterator[tuple[SlowUpstream, str]]:
    upstream = SlowUpstream(seconds)
    with run_asgi(upstream.app) as base_url:
        yield upstream, base_url + "/"


def process_config(idp: IdpProcess, slow_url: str, grace: str) -> dict[str, Any]:
    return {
        "oidc": {"issuer": idp.issuer, "client_id": CLIENT_ID, "dialect": "rfc8707"},
        "server": {"graceful_timeout": grace},
        "log": {"level": "info"},  # the port is read from uvicorn's "running on" line
        "routes": [{"prefix": "/slow/", "upstream": slow_url, "auth": "none", "timeout": "30s"}],
    }


async def _refused_soon(base_url: str, timeout: float = 1.0) -> bool:
    """True once a new connection is refused (the listener closed), within ``timeout``.

    A probe that connected in the instant before the listener closed is dropped unanswered
    (the kernel had already queued it, uvicorn then closes it): that is a read error, not yet
    a refusal, so the probe tries again.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(timeout=1) as probe:
                await probe.get(base_url + "/healthz")
        except httpx.ConnectError:
            return True
        except (httpx.ReadError, httpx.RemoteProtocolError):
            pass  # accepted just before the close, then dropped unanswered
        await asyncio.sleep(0.02)
    return False


async def test_sigterm_lets_an_in_flight_request_finish_then_exits(
    idp: IdpProcess, tmp_path: Path
) -> None:
    with (
        slow_upstream(UPSTREAM_SLEEP) as (upstream, url),
        image_process(tmp_path, process_config(idp, url, "10s")) as gateway,
    ):
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            in_flight = asyncio.ensure_future(
                client.get("/slow/report", headers={"X-Request-ID": "slow-1"})
            )
            await upstream.wait_arrived()
            signalled_at = time.monotonic()
            gateway.proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
            # New connections are refused at once, while the old request is still running.
            assert await _refused_soon(gateway.base_url)
            assert not in_flight.done()
            response = await in_flight
            answered_after = time.monotonic() - signalled_at
        exit_code = await asyncio.to_thread(gateway.proc.wait, 15)
        lines = gateway.log_lines()
    assert response.status_code == 200 and response.json() == {"slept": UPSTREAM_SLEEP}
    assert response.headers["x-request-id"] == "slow-1"
    assert 0.5 < answered_after < UPSTREAM_SLEEP + 1.0
    assert exit_code == -signal.SIGTERM  # uvicorn re-raises the signal after a clean shutdown
    [access] = [line for line in lines if line.get("request_id") == "slow-1"]
    assert access["status"] == 200 and access["upstream_ms"] >= UPSTREAM_SLEEP * 1000 * 0.9
    messages = [line["message"] for line in lines]
    assert "Application shutdown complete." in messages
    assert messages.index("Application shutdown complete.") > lines.index(access)


async def test_sigterm_past_the_grace_period_cancels_the_request_and_exits(
    idp: IdpProcess, tmp_path: Path
) -> None:
    with (
        slow_upstream(5.0) as (upstream, url),
        image_process(tmp_path, process_config(idp, url, "1s")) as gateway,
    ):
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            in_flight = asyncio.ensure_future(client.get("/slow/forever"))
            await upstream.wait_arrived()
            signalled_at = time.monotonic()
            gateway.proc.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(gateway.proc.wait, 15)
            exited_after = time.monotonic() - signalled_at
            with pytest.raises(httpx.HTTPError):
                (await in_flight).raise_for_status()
        messages = [line["message"] for line in gateway.log_lines()]
    assert 0.9 < exited_after < 4.0  # the 1 s grace period, not the upstream's 5 s
    assert exit_code == -signal.SIGTERM
    assert not upstream.finished.is_set()
    assert "Application shutdown complete." in messages


@pytest.fixture
def redis_names() -> Iterator[tuple[str, str]]:
    """A client name (to find the gateway's connections) and a key prefix, cleaned up after."""
    with redis_key_prefix("lifecycle") as prefix:
        yield f"gw-{prefix.rstrip(':')}", prefix


async def _gateway_connections(name: str) -> int:
    client = redis.from_url(REDIS_URL)
    try:
        return sum(1 for c in await client.client_list() if c.get("name") == name)
    finally:
        await client.aclose()


async def test_stop_finishes_in_flight_request_then_closes_every_client(
    idp: IdpProcess, redis_names: tuple[str, str]
) -> None:
    name, prefix = redis_names
    session = {
        "store": "redis",
        "redis_url": f"{REDIS_URL}?client_name={name}",
        "redis_key_prefix": prefix,
    }
    with slow_upstream(UPSTREAM_SLEEP) as (upstream, url), start_upstreams(idp) as upstreams:
        routes = [
            {"prefix": "/api/", "upstream": upstreams["api"].url, "audience": API},
            {"prefix": "/slow/", "upstream": url, "auth": "none", "timeout": "10s"},
        ]
        # run_gateway's steps, with an upstream pool this test holds on to.
        sock = reserve_socket()
        port = int(sock.getsockname()[1])
        settings = gateway_settings(idp, port, upstreams, session=session, routes=routes)
        pool = AiohttpUpstreamClient()
        app = create_app(settings, upstream=pool)
        stack = contextlib.ExitStack()
        base_url = stack.enter_context(run_asgi(app, sock=sock, proxy_headers=False))
        gw = GatewayUnderTest(base_url, settings, idp, upstreams, app)
        try:
            async with gw.client() as client:
                await gw.login(client)
                assert (await client.get("/api/x", headers=CSRF)).status_code == 200
                gateway = gw.gateway
                connector = pool._session  # aiohttp's pool, created by the first request
                assert connector is not None and not connector.closed
                assert await _gateway_connections(name) >= 1
                in_flight = asyncio.ensure_future(client.get("/slow/x"))
                await upstream.wait_arrived()
                # ServerThread.stop: uvicorn's should_exit, as on SIGTERM (grace period 2 s).
                stopping = asyncio.ensure_future(asyncio.to_thread(stack.close))
                response = await in_flight
                await stopping
        finally:
            stack.close()
    assert response.status_code == 200 and response.json() == {"slept": UPSTREAM_SLEEP}
    assert gateway.idp_http.is_closed
    assert connector.closed and pool._session is None
    deadline = time.monotonic() + 5
    while await _gateway_connections(name) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await _gateway_connections(name) == 0
