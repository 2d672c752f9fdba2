"""Configuration reload: the live part changes from the next request on, a request in flight
finishes on the configuration it started with, a file that fails validation is refused with one
line naming the field, and restart-only settings are reported and kept."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from gateway import create_app
from gateway.errors import ConfigError
from gateway.proxy import UpstreamResponse
from gateway.reload import keep_restart_only, needing_restart
from gateway.settings import Settings

from .conftest import make_settings

pytestmark = pytest.mark.anyio

PUBLIC = {"prefix": "/status/", "upstream": "http://old.internal/", "auth": "none"}
MOVED = {**PUBLIC, "upstream": "http://new.internal/"}
ADDED = {"prefix": "/added/", "upstream": "http://added.internal/", "auth": "none"}


class HeldUpstream:
    """Answers 200 at once, or (``hold`` set) once the test lets it go; records each URL."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.hold: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        *,
        timeout: float,
        route: str,
    ) -> UpstreamResponse:
        self.urls.append(url)
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()

        async def chunks() -> AsyncIterator[bytes]:
            yield url.encode()

        return UpstreamResponse(200, (), chunks(), close=lambda: None)

    async def close(self) -> None:
        return None


class Source:
    """The settings a reload reads: a Settings, or the ConfigError a bad file gives."""

    def __init__(self, settings: Settings) -> None:
        self.next: Settings | ConfigError = settings

    def __call__(self) -> Settings:
        if isinstance(self.next, ConfigError):
            raise self.next
        return self.next


def _settings(*routes: dict[str, Any], **overrides: Any) -> Settings:
    return make_settings(routes=list(routes), **overrides)


async def _running(
    settings: Settings, source: Source, upstream: HeldUpstream
) -> tuple[Any, httpx.AsyncClient]:
    app = create_app(settings, upstream=upstream, settings_source=source)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=settings.public_url)
    return app, client


async def test_reload_adds_and_moves_routes_from_the_next_request(idp: respx.MockRouter) -> None:
    upstream = HeldUpstream()
    running = _settings(PUBLIC)
    source = Source(running)
    app, client = await _running(running, source, upstream)
    async with client:
        before = await client.get("/status/x")
        added_before = await client.get("/added/y")
        source.next = _settings(MOVED, ADDED)
        assert app.state.reloader.reload() is True
        after = await client.get("/status/x")
        added = await client.get("/added/y")
        metrics = (await client.get("/metrics")).text
    assert before.text == "http://old.internal/x" and added_before.status_code == 404
    assert after.text == "http://new.internal/x" and added.text == "http://added.internal/y"
    assert 'gateway_config_reloads_total{outcome="applied"} 1.0' in metrics
    assert 'gateway_request_duration_seconds_count{route="added"} 1.0' in metrics


async def test_a_request_in_flight_finishes_on_the_table_it_started_with(
    idp: respx.MockRouter,
) -> None:
    upstream = HeldUpstream()
    upstream.hold = asyncio.Event()
    running = _settings(PUBLIC)
    source = Source(running)
    app, client = await _running(running, source, upstream)
    async with client:
        in_flight = asyncio.ensure_future(client.get("/status/slow"))
        await asyncio.wait_for(upstream.arrived.wait(), 30)
        source.next = _settings(MOVED)
        assert app.state.reloader.reload() is True
        upstream.hold.set()
        old = await in_flight
        new = await client.get("/status/fast")
    assert old.text == "http://old.internal/slow" and new.text == "http://new.internal/fast"


async def test_a_file_that_fails_validation_is_refused_in_one_line_naming_the_field(
    idp: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = HeldUpstream()
    running = _settings(PUBLIC)
    source = Source(running)
    app, client = await _running(running, source, upstream)
    source.next = ConfigError(
        "routes.1.audience: Value error, route /x/: auth user needs an audience\nlimits.x: bad"
    )
    caplog.set_level(logging.INFO, "gateway.reload")
    async with client:
        assert app.state.reloader.reload() is False
        still = await client.get("/status/x")
        metrics = (await client.get("/metrics")).text
    [line] = [r for r in caplog.records if r.name == "gateway.reload"]
    assert line.levelno == logging.ERROR and "\n" not in line.getMessage()
    assert "routes.1.audience" in line.getMessage() and "limits.x" in line.getMessage()
    assert still.text == "http://old.internal/x"
    assert 'gateway_config_reloads_total{outcome="refused"} 1.0' in metrics


async def test_restart_only_settings_are_reported_and_kept(
    idp: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = HeldUpstream()
    running = _settings(PUBLIC)
    source = Source(running)
    app, client = await _running(running, source, upstream)
    source.next = _settings(
        MOVED,
        server={"port": 9999},
        session={"cookie_name": "other", "secret_key": ["k" * 40]},
        limits={"max_header_bytes": 2048},
        log={"level": "debug", "format": "text"},
    )
    caplog.set_level(logging.INFO, "gateway.reload")
    root_level = logging.getLogger().level
    try:
        async with client:
            assert app.state.reloader.reload() is True
            response = await client.get("/status/x", headers={"X-Big": "x" * 3000})
        live = app.state.reloader.settings
    finally:
        logging.getLogger().setLevel(root_level)
    warning = next(r.getMessage() for r in caplog.records if r.name == "gateway.reload")
    assert "server, session" in warning and "log.format" in warning
    assert "k" * 40 not in caplog.text
    assert live.server.port == running.server.port and live.session == running.session
    assert live.log.format == "json" and live.log.level == "debug"
    assert live.limits.max_header_bytes == 2048 and response.status_code == 431


def test_needing_restart_names_each_changed_restart_only_setting() -> None:
    running = _settings(PUBLIC)
    new = _settings(
        MOVED,
        oidc={"client_id": "another"},
        forward_auth={"secret": "s" * 40},
        csrf={"allowed_origins": ["https://other.example"]},
    )
    assert needing_restart(running, new) == ["oidc", "forward_auth.secret"]
    kept = keep_restart_only(running, new)
    assert kept.oidc == running.oidc and kept.forward_auth.secret is None
    assert kept.csrf.allowed_origins == ["https://other.example"]
    assert kept.routes[0].upstream == "http://new.internal/"
    assert needing_restart(running, kept) == []


async def test_reload_needs_a_source(idp: respx.MockRouter) -> None:
    app = create_app(_settings(PUBLIC))
    assert app.state.reloader is None
