"""Configuration reload against a real ``gateway run`` process: SIGHUP re-reads the file; a
route is added, an audience changes, a WebSocket route goes (its sockets close with 1001), a
file that fails validation is refused, and one session keeps working throughout."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import IdpFactory
from .gateway_harness import CSRF, gateway_config, start_upstreams
from .login import browser_login
from .processes import GatewayProcess
from .servers import API, BILLING, IdpProcess, Upstream, free_port, start_ws_upstream

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ENV = {
    "GATEWAY_OIDC__CLIENT_SECRET": "bff-secret",
    "GATEWAY_SESSION__SECRET_KEY": "reload-secret-key-reload-secret-key-reload",
}
RELOAD_BOUND = 30.0  # seconds for the process to log the outcome of a SIGHUP


def _config(
    idp: IdpProcess, port: int, upstreams: dict[str, Upstream], extra: list[dict[str, Any]]
) -> dict[str, Any]:
    data = gateway_config(idp, port, upstreams, log={"level": "warning"})
    del data["oidc"]["client_secret"]
    del data["session"]
    data["routes"] = [
        r for r in data["routes"] if r["prefix"] in ("/api/", "/billing/", "/public/")
    ] + extra
    return data


async def _logged(gateway: GatewayProcess, text: str, count: int) -> None:
    """Wait (bounded) until ``text`` is in the log ``count`` times."""
    deadline = time.monotonic() + RELOAD_BOUND
    while gateway.logs().count(text) < count:
        assert gateway.is_running(), gateway.logs()
        assert time.monotonic() < deadline, gateway.logs()
        await asyncio.sleep(0.05)


@pytest.fixture
def process(idp_factory: IdpFactory) -> Iterator[tuple[GatewayProcess, Any, Any]]:
    idp = idp_factory(rotate=True, at_ttl=60)
    port = free_port()
    with (
        start_upstreams(idp) as upstreams,
        start_ws_upstream(issuer=idp.issuer, audience=API) as live,
    ):
        data = _config(
            idp,
            port,
            upstreams,
            [
                {"prefix": "/data/", "upstream": upstreams["api"].url, "audience": API},
                {"prefix": "/ws/", "upstream": live.url, "audience": API, "websocket": True},
            ],
        )
        gateway = GatewayProcess(data, port=port, env=ENV)
        try:
            yield gateway, idp, (data, upstreams)
        finally:
            gateway.stop()


async def test_sighup_reloads_routes_audiences_and_refuses_an_invalid_file(
    process: tuple[GatewayProcess, IdpProcess, Any],
) -> None:
    gateway, idp, (data, upstreams) = process
    base = gateway.base_url
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        login = await browser_login(client, f"{base}/auth/login?return_to=/", idp_issuer=idp.issuer)
        assert login.status_code == 302, login.text
        assert (await client.get("/api/x", headers=CSRF)).json()["aud"] == API
        assert (await client.get("/data/x", headers=CSRF)).json()["aud"] == API
        assert (await client.get("/added/x")).status_code == 404
        cookie = next(f"{c.name}={c.value}" for c in client.cookies.jar if c.name == "gw_session")
        ws_url = base.replace("http://", "ws://") + "/ws/ticks"
        async with connect(
            ws_url,
            additional_headers={"Cookie": cookie},
            origin=base,  # type: ignore[arg-type]
            open_timeout=10,
        ) as websocket:
            await websocket.recv()
            idp.reset_stats()

            # Reload 1: /added/ appears, /data/ moves to billing's audience, /ws/ goes.
            new = {**data, "routes": [r for r in data["routes"] if r["prefix"] != "/ws/"]}
            for route in new["routes"]:
                if route["prefix"] == "/data/":
                    route.update(upstream=upstreams["billing"].url, audience=BILLING)
            new["routes"].append(
                {"prefix": "/added/", "upstream": upstreams["public"].url, "auth": "none"}
            )
            gateway.config_path.write_text(yaml.safe_dump(new))
            gateway.send_signal(signal.SIGHUP)
            await _logged(gateway, "configuration reloaded", 1)
            async with asyncio.timeout(RELOAD_BOUND):
                with pytest.raises(ConnectionClosed):
                    while True:
                        await websocket.recv()
            assert websocket.close_code == 1001
        assert (await client.get("/added/x")).status_code == 200
        assert (await client.get("/data/x", headers=CSRF)).json()["aud"] == BILLING
        assert (await client.get("/api/x", headers=CSRF)).status_code == 200
        # The session stayed; the token cached for /api/'s unchanged (audience, scopes) too:
        # the only exchange was for the new audience.
        assert idp.stats()["refresh_by_resource"] == {BILLING: 1}, idp.stats()

        # Reload 2: a file that fails validation is refused; everything stays as it was.
        broken = {**new, "routes": [*new["routes"], {"prefix": "/bad/", "upstream": "x"}]}
        gateway.config_path.write_text(yaml.safe_dump(broken))
        gateway.send_signal(signal.SIGHUP)
        await _logged(gateway, "configuration reload refused", 1)
        assert (await client.get("/added/x")).status_code == 200
        assert (await client.get("/api/x", headers=CSRF)).status_code == 200
        assert (await client.get("/ws/ticks")).status_code == 404
    [refused] = [line for line in gateway.logs().splitlines() if "reload refused" in line]
    assert "routes.5.upstream" in refused
    assert gateway.is_running()
