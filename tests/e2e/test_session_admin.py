"""Sessions an operator can see and end, across two gateway processes sharing one Redis: the
admin API on each instance's own port, ``gateway sessions`` on the command line, and a user's
logout everywhere. Ending a session revokes its refresh token at the IdP and closes its
WebSockets and event streams on every instance."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from .conftest import IdpFactory
from .gateway_harness import CSRF, gateway_config, start_upstreams
from .login import browser_login
from .processes import ROOT, GatewayProcess, gateway_processes, redis_key_prefix
from .servers import API, IdpProcess, WebSocketUpstream, free_port, start_ws_upstream

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ADMIN_TOKEN = "e2e-admin-token-e2e-admin-token-e2e-admin"
SECRET_KEY = "session-admin-secret-key-session-admin-key"
ENV = {
    "GATEWAY_OIDC__CLIENT_SECRET": "bff-secret",
    "GATEWAY_SESSION__SECRET_KEY": SECRET_KEY,
    "GATEWAY_ADMIN__TOKEN": ADMIN_TOKEN,
}
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REDIS_URL = "redis://127.0.0.1:6379/14"
END_BOUND = 10.0  # seconds for a session end to reach the other instance's connections


class Pair:
    def __init__(
        self, idp: IdpProcess, gateways: list[GatewayProcess], admin_ports: list[int]
    ) -> None:
        self.idp = idp
        self.a, self.b = gateways
        self.admin_a, self.admin_b = (f"http://127.0.0.1:{p}" for p in admin_ports)
        self.config_path = self.a.config_path

    async def login(self, client: httpx.AsyncClient, via: GatewayProcess, user: str) -> str:
        response = await browser_login(
            client,
            f"{via.base_url}/auth/login?return_to=/",
            username=user,
            idp_issuer=self.idp.issuer,
        )
        assert response.status_code == 302, response.text
        me = await client.get(f"{via.base_url}/auth/me")
        sub: str = me.json()["sub"]
        return sub


@pytest.fixture
def pair(idp_factory: IdpFactory) -> Iterator[tuple[Pair, WebSocketUpstream]]:
    idp = idp_factory(rotate=False, at_ttl=60)
    with (
        redis_key_prefix("admin", REDIS_URL) as prefix,
        start_upstreams(idp) as upstreams,
        start_ws_upstream(issuer=idp.issuer, audience=API) as live,
    ):
        # Chosen once the upstreams hold their ports: no upstream can take one of these.
        ports = [free_port(), free_port()]
        admin_ports = [free_port(), free_port()]
        live_routes: list[dict[str, Any]] = [
            {"prefix": "/ws/", "upstream": live.url, "audience": API, "websocket": True},
            {"prefix": "/events/", "upstream": live.url, "audience": API, "csrf": False},
        ]

        def config(admin_port: int) -> dict[str, Any]:
            data = gateway_config(
                idp,
                ports[0],
                upstreams,
                session={
                    "store": "redis",
                    "redis_url": REDIS_URL,
                    "redis_key_prefix": prefix,
                    "secret_key": [],
                },
                admin={"port": admin_port},
            )
            data["routes"] = [*data["routes"], *live_routes]
            del data["oidc"]["client_secret"]  # from the environment, as in production
            return data

        configs = [config(p) for p in admin_ports]
        with gateway_processes(configs, ports, ENV) as gateways:
            yield Pair(idp, gateways, admin_ports), live


def _cli(pair: Pair, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "sessions", *args, "--config", str(pair.config_path)],
        cwd=ROOT,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert ADMIN_TOKEN not in result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


async def test_admin_lists_and_revokes_a_users_sessions_on_every_instance(
    pair: tuple[Pair, WebSocketUpstream],
) -> None:
    cluster, _ = pair
    async with (
        httpx.AsyncClient(timeout=30) as laptop,
        httpx.AsyncClient(timeout=30) as phone,
        httpx.AsyncClient(timeout=30) as bob,
        httpx.AsyncClient(timeout=30) as admin,
    ):
        alice = await cluster.login(laptop, cluster.a, "alice")
        await cluster.login(phone, cluster.b, "alice")
        bob_sub = await cluster.login(bob, cluster.a, "bob")
        for url in (cluster.admin_a, cluster.admin_b):
            missing = await admin.get(f"{url}/admin/sessions", params={"sub": alice})
            wrong = await admin.delete(
                f"{url}/admin/sessions",
                params={"sub": alice},
                headers={"Authorization": "Bearer " + "y" * len(ADMIN_TOKEN)},
            )
            assert missing.status_code == wrong.status_code == 401
        listed = await admin.get(
            f"{cluster.admin_b}/admin/sessions", params={"sub": alice}, headers=BEARER
        )
        assert listed.status_code == 200
        sessions = listed.json()["sessions"]
        assert len(sessions) == 2 and {s["user_agent"] for s in sessions} == {"httpx"}
        assert (await phone.get(f"{cluster.b.base_url}/api/x", headers=CSRF)).status_code == 200

        # The laptop holds a WebSocket on B and an event stream on A; the operator ends the
        # user's sessions through A's admin API.
        cookie = next(f"{c.name}={c.value}" for c in laptop.cookies.jar if c.name == "gw_session")
        ws_url = cluster.b.base_url.replace("http://", "ws://") + "/ws/ticks"
        cluster.idp.reset_stats()
        async with (
            connect(
                ws_url,
                additional_headers={"Cookie": cookie},
                origin=cluster.a.base_url,  # type: ignore[arg-type]
                open_timeout=10,
            ) as websocket,
            laptop.stream("GET", f"{cluster.a.base_url}/events/sse") as stream,
        ):
            assert stream.status_code == 200
            await websocket.recv()
            chunks = stream.aiter_bytes()
            await anext(chunks)
            revoked = await admin.delete(
                f"{cluster.admin_a}/admin/sessions", params={"sub": alice}, headers=BEARER
            )
            async with asyncio.timeout(END_BOUND):
                with pytest.raises(Exception):  # noqa: B017 (ConnectionClosed, any subclass)
                    while True:
                        await websocket.recv()
                async for _ in chunks:
                    pass  # the stream ends
            close_code = websocket.close_code
        assert revoked.json() == {"ended": 2}
        assert close_code == 4401
        assert cluster.idp.stats()["revocations"] == 2
        for client, gw in ((laptop, cluster.a), (phone, cluster.b), (phone, cluster.a)):
            assert (await client.get(f"{gw.base_url}/api/x", headers=CSRF)).status_code == 401
        assert (await bob.get(f"{cluster.b.base_url}/api/x", headers=CSRF)).status_code == 200

        # The command line, through the shared store.
        assert len(_cli(cluster, "list", "--sub", bob_sub)["sessions"]) == 1
        assert _cli(cluster, "list", "--sub", alice) == {"sessions": []}
        assert _cli(cluster, "revoke", "--sub", bob_sub) == {"ended": 1}
        assert (await bob.get(f"{cluster.b.base_url}/api/x", headers=CSRF)).status_code == 401
        metrics = (await admin.get(f"{cluster.a.base_url}/metrics")).text
    assert 'gateway_sessions_ended_by_action_total{action="revoke"} 2.0' in metrics
    for gateway in (cluster.a, cluster.b):
        logs = gateway.logs()
        assert ADMIN_TOKEN not in logs and cookie.split("=", 1)[1] not in logs


async def test_logout_everywhere_ends_the_users_sessions_on_both_instances(
    pair: tuple[Pair, WebSocketUpstream],
) -> None:
    cluster, _ = pair
    async with (
        httpx.AsyncClient(timeout=30) as laptop,
        httpx.AsyncClient(timeout=30) as phone,
        httpx.AsyncClient(timeout=30) as bob,
    ):
        await cluster.login(laptop, cluster.a, "alice")
        await cluster.login(phone, cluster.b, "alice")
        await cluster.login(bob, cluster.b, "bob")
        cluster.idp.reset_stats()
        response = await laptop.post(
            f"{cluster.a.base_url}/auth/logout",
            json={"everywhere": True},
            headers={**CSRF, "Origin": cluster.a.base_url},
        )
        assert response.status_code == 200, response.text
        assert response.json()["ended_elsewhere"] == 1
        phone_after = await phone.get(f"{cluster.b.base_url}/api/x", headers=CSRF)
        bob_after = await bob.get(f"{cluster.b.base_url}/api/x", headers=CSRF)
    assert phone_after.status_code == 401 and bob_after.status_code == 200
    assert cluster.idp.stats()["revocations"] == 2
