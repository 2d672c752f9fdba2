"""Run a real gateway (uvicorn on loopback) in front of the test IdP and real upstreams."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway import create_app
from gateway.settings import Settings

from .login import browser_login
from .servers import (
    API,
    BILLING,
    CLIENT_ID,
    CLIENT_SECRET,
    OUTSIDE,
    IdpProcess,
    Upstream,
    reserve_socket,
    run_asgi,
    start_upstream,
)

CSRF = {"X-CSRF": "1"}


@dataclass
class GatewayUnderTest:
    base_url: str
    settings: Settings
    idp: IdpProcess
    upstreams: dict[str, Upstream]
    app: Any = field(repr=False)

    @property
    def gateway(self) -> Any:
        return self.app.state.services

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=30, **kwargs)

    async def login(
        self, client: httpx.AsyncClient, *, username: str = "alice", return_to: str = "/"
    ) -> httpx.Response:
        response = await browser_login(
            client,
            f"{self.base_url}/auth/login?return_to={return_to}",
            username=username,
            idp_issuer=self.idp.issuer,
        )
        assert response.status_code == 302, response.text
        return response


def gateway_settings(
    idp: IdpProcess, port: int, upstreams: dict[str, Upstream], **overrides: Any
) -> Settings:
    return Settings(**gateway_config(idp, port, upstreams, **overrides))


def gateway_config(
    idp: IdpProcess, port: int, upstreams: dict[str, Upstream], **overrides: Any
) -> dict[str, Any]:
    """The e2e gateway configuration as data (a YAML file's content); a dict override is
    merged into its section, anything else replaces the key."""
    data: dict[str, Any] = {
        "public_url": f"http://127.0.0.1:{port}",
        "oidc": {
            "issuer": idp.issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "dialect": "rfc8707",
            "prompt": "consent",
            "scopes": ["openid", "profile", "email", "offline_access"],
        },
        "session": {"secret_key": ["e2e-secret-key-e2e-secret-key-e2e-secret-key"]},
        "tokens": {"skew": 10},
        "log": {"level": "warning"},
        "routes": [
            {
                "prefix": "/api/",
                "upstream": upstreams["api"].url,
                "audience": API,
                "scopes": ["read:orders"],
            },
            {
                "prefix": "/billing/",
                "upstream": upstreams["billing"].url,
                "audience": BILLING,
                "scopes": ["read:invoices"],
            },
            {
                "prefix": "/outside/",
                "upstream": upstreams["outside"].url,
                "audience": OUTSIDE,
                "scopes": ["read:secrets"],
            },
            {"prefix": "/public/", "upstream": upstreams["public"].url, "auth": "none"},
            {
                "prefix": "/slow/",
                "upstream": upstreams["public"].url,
                "auth": "none",
                "timeout": "500ms",
            },
            {"prefix": "/down/", "upstream": "http://127.0.0.1:9/", "auth": "none"},
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@contextlib.contextmanager
def start_upstreams(idp: IdpProcess) -> Iterator[dict[str, Upstream]]:
    upstreams = {
        "api": start_upstream(name="api", issuer=idp.issuer, audience=API),
        "billing": start_upstream(name="billing", issuer=idp.issuer, audience=BILLING),
        "outside": start_upstream(name="outside", issuer=idp.issuer, audience=OUTSIDE),
        "public": start_upstream(name="public", require_auth=False),
    }
    try:
        yield upstreams
    finally:
        for upstream in upstreams.values():
            upstream.stop()


@contextlib.contextmanager
def run_gateway(
    idp: IdpProcess,
    upstreams: dict[str, Upstream],
    *,
    uvicorn_options: dict[str, Any] | None = None,  # e.g. {"ws": "websockets-sansio"}
    sock: socket.socket | None = None,  # reserve_socket() first to know the port in advance
    **overrides: Any,
) -> Iterator[GatewayUnderTest]:
    sock = sock if sock is not None else reserve_socket()
    port = int(sock.getsockname()[1])
    settings = gateway_settings(idp, port, upstreams, **overrides)
    app = create_app(settings)
    # Tests pause between rounds on one client (token expiry, rotation): with uvicorn's 5 s
    # keep-alive, a connection that answered early in a round can reach its idle timeout just
    # as the next round reuses it, and the client reads a closed socket (a race of the test's
    # timing, seen once under CI load, not of the gateway's).
    options = {"proxy_headers": False, "timeout_keep_alive": 30, **(uvicorn_options or {})}
    with run_asgi(app, sock=sock, **options) as base_url:
        yield GatewayUnderTest(
            base_url=base_url, settings=settings, idp=idp, upstreams=upstreams, app=app
        )
