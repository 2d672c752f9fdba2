"""Two gateway processes sharing sessions, tokens and the refresh lock through one Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import IdpFactory
from .gateway_harness import CSRF, gateway_config, start_upstreams
from .login import browser_login
from .processes import GatewayProcess, gateway_processes, redis_key_prefix, redis_process
from .servers import API, BILLING, IdpProcess, Upstream, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SECRET_KEY = "scale-out-secret-key-scale-out-secret-key"
ENV = {"GATEWAY_OIDC__CLIENT_SECRET": "bff-secret", "GATEWAY_SESSION__SECRET_KEY": SECRET_KEY}


def _config(
    idp: IdpProcess,
    upstreams: dict[str, Upstream],
    *,
    public_port: int,
    redis_url: str,
    prefix: str,
    redis_timeout: str = "2s",
) -> dict[str, Any]:
    session = {"store": "redis", "redis_url": redis_url, "redis_key_prefix": prefix}
    session["redis_timeout"] = redis_timeout
    return gateway_config(idp, public_port, upstreams, session=session, tokens={"skew": 60})


class Cluster:
    def __init__(self, idp: IdpProcess, gateways: list[GatewayProcess]) -> None:
        self.idp = idp
        self.a, self.b = gateways

    async def login(self, client: httpx.AsyncClient) -> None:
        response = await browser_login(
            client, f"{self.a.base_url}/auth/login?return_to=/", idp_issuer=self.idp.issuer
        )
        assert response.status_code == 302, response.text


@pytest.fixture
def redis_url() -> Iterator[tuple[str, str]]:
    """The machine's Redis (db 14) with a key prefix of this test only."""
    url = "redis://127.0.0.1:6379/14"
    with redis_key_prefix("scale", url) as prefix:
        yield url, prefix


@pytest.fixture
def cluster(idp_factory: IdpFactory, redis_url: tuple[str, str]) -> Iterator[Cluster]:
    idp = idp_factory(rotate=True, at_ttl=60)
    url, prefix = redis_url
    with start_upstreams(idp) as upstreams:
        # Chosen once the upstreams hold their ports: no upstream can take one of these.
        ports = [free_port(), free_port()]
        configs = [_config(idp, upstreams, public_port=ports[0], redis_url=url, prefix=prefix)] * 2
        with gateway_processes(configs, ports, ENV) as gateways:
            yield Cluster(idp, gateways)


async def test_two_instances_share_session_tokens_and_refresh_lock(cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        await cluster.login(client)
        cluster.idp.reset_stats()
        urls = [
            (cluster.a if i % 2 else cluster.b).base_url + ("/api/x" if i % 4 < 2 else "/billing/y")
            for i in range(100)
        ]
        responses = await asyncio.gather(*(client.get(u, headers=CSRF) for u in urls))
        assert [r.status_code for r in responses] == [200] * 100, {
            r.status_code: r.text for r in responses
        }
        assert cluster.idp.stats()["refresh_by_resource"] == {API: 1, BILLING: 1}
        for i in range(20):  # alternating A/B: shared tokens, no further exchange
            base = cluster.a if i % 2 else cluster.b
            response = await client.get(f"{base.base_url}/api/z", headers=CSRF)
            assert response.status_code == 200
            assert response.json()["aud"] == API
        stats = cluster.idp.stats()
        assert stats["refresh_by_resource"] == {API: 1, BILLING: 1}
        assert stats["refresh_errors"] == {}


async def test_logout_on_b_ends_the_session_on_a(cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        await cluster.login(client)
        assert (await client.get(f"{cluster.a.base_url}/api/x", headers=CSRF)).status_code == 200
        copy = {"Cookie": f"gw_session={client.cookies['gw_session']}"}
        logout = await client.post(f"{cluster.b.base_url}/auth/logout", headers=CSRF)
        assert logout.status_code == 200 and logout.json()["logged_out"] is True
        assert "gw_session" not in client.cookies
    # The browser dropped its cookie; a copy of it must not work on A either.
    async with httpx.AsyncClient(timeout=30) as other:
        assert (await other.get(f"{cluster.a.base_url}/auth/me", headers=copy)).status_code == 401
        assert (
            await other.get(f"{cluster.a.base_url}/api/x", headers={**CSRF, **copy})
        ).status_code == 401


async def test_redis_paused_then_restarted(idp_factory: IdpFactory) -> None:
    idp = idp_factory(at_ttl=60)
    with redis_process() as server, start_upstreams(idp) as upstreams:
        port = free_port()
        config = _config(
            idp,
            upstreams,
            public_port=port,
            redis_url=server.url,
            prefix="gw:",
            redis_timeout="500ms",
        )
        with gateway_processes([config], [port], ENV) as (gateway,):
            cluster_login = Cluster(idp, [gateway, gateway])
            async with httpx.AsyncClient(timeout=30) as client:
                await cluster_login.login(client)
                assert (
                    await client.get(f"{gateway.base_url}/api/x", headers=CSRF)
                ).status_code == 200

                server.pause()
                try:
                    # A cached session may still answer for up to session.redis_cache_lease
                    # (no write can happen while Redis is paused); then 503.
                    for _ in range(100):
                        started = time.monotonic()
                        paused = await client.get(f"{gateway.base_url}/api/x", headers=CSRF)
                        elapsed = time.monotonic() - started
                        if paused.status_code != 200:
                            break
                        await asyncio.sleep(0.05)
                    ready = await client.get(f"{gateway.base_url}/readyz")
                finally:
                    server.resume()
                assert paused.status_code == 503, paused.text
                assert paused.json()["error"] == "session_store_unavailable"
                assert "retry-after" in paused.headers
                assert elapsed < 5
                assert ready.status_code == 503

                recovered = await _eventually_ok(client, f"{gateway.base_url}/api/x")
                assert recovered.status_code == 200  # the session survived the pause

                server.restart()  # no persistence: every session is gone
                lost = await client.get(f"{gateway.base_url}/api/x", headers=CSRF)
                assert lost.status_code == 401, lost.text
                assert lost.json()["error"] == "login_required"
                assert "Traceback" not in gateway.logs()


async def _eventually_ok(client: httpx.AsyncClient, url: str) -> httpx.Response:
    response = await client.get(url, headers=CSRF)
    for _ in range(50):
        if response.status_code == 200:
            break
        await asyncio.sleep(0.1)
        response = await client.get(url, headers=CSRF)
    return response
