"""Tracing on and off: off builds nothing traced (the plain dispatcher, store and clients); on
when asked or when the standard OTLP endpoint variable is set."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import create_app
from gateway.dispatch import Dispatcher
from gateway.oidc import OIDCClient
from gateway.proxy import AiohttpUpstreamClient
from gateway.routing import RouteTable
from gateway.sessions import MemorySessionStore, Session
from gateway.settings import Settings
from gateway.tokens import TokenBroker
from gateway.traced_dispatch import TracedDispatcher
from gateway.tracing import TracedSessionStore, TracedUpstreamClient, Tracing, extract_context

from .conftest import API, DISCOVERY, access_token, make_settings

ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@pytest.fixture(autouse=True)
def _no_otlp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENDPOINTS:
        monkeypatch.delenv(name, raising=False)


def test_tracing_off_builds_the_plain_objects(idp: respx.MockRouter) -> None:
    app = create_app(make_settings())
    services = app.state.services
    assert type(app) is Dispatcher and services.tracing is None
    assert type(services.store) is MemorySessionStore
    assert type(services.upstream) is AiohttpUpstreamClient


@pytest.mark.parametrize("variable", ENDPOINTS)
def test_tracing_on_with_the_standard_endpoint_variable(
    idp: respx.MockRouter, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "http://127.0.0.1:9")
    app = create_app(make_settings())
    services = app.state.services
    assert type(app) is TracedDispatcher and services.tracing is not None
    assert isinstance(services.store, TracedSessionStore)
    assert isinstance(services.upstream, TracedUpstreamClient)


def test_tracing_enabled_false_wins_over_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert not make_settings(tracing={"enabled": False}).tracing.is_enabled
    assert make_settings().tracing.is_enabled
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    assert make_settings(tracing={"enabled": True}).tracing.is_enabled


def test_extract_context_reads_only_a_traceparent() -> None:
    assert extract_context([(b"cookie", b"x")]) is None
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert extract_context([(b"Traceparent", parent)]) is not None


@pytest.mark.anyio
async def test_exchange_span_counts_the_requests_coalesced_behind_it(
    settings: Settings, idp: respx.MockRouter
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("test"))
    store = tracing.store(MemorySessionStore(idle_timeout=3600))
    gate = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        form = parse_qs(request.content.decode())
        token = access_token(form["audience"][0], scope="read:orders")
        return httpx.Response(200, json={"access_token": token, "expires_in": 600})

    idp.post(DISCOVERY["token_endpoint"]).mock(side_effect=slow)
    now = time.time()
    session = Session(
        id="s1", sub="alice", refresh_token="rt", created_at=now, absolute_expiry=now + 3600
    )
    await store.save(session)
    async with httpx.AsyncClient() as http:
        broker = TokenBroker(
            oidc=OIDCClient(settings, http), store=store, settings=settings.tokens, tracing=tracing
        )
        route = RouteTable(settings.routes).by_name("api")
        assert route is not None
        requests = [asyncio.ensure_future(broker.access_token(session, route)) for _ in range(4)]
        while not idp.calls:  # the first request's exchange is at the IdP
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the other three queue on the refresh lock
        gate.set()
        tokens = await asyncio.gather(*requests)
    assert len(set(tokens)) == 1 and broker.exchanges == 1
    spans = {s.name: s for s in exporter.get_finished_spans()}
    exchange = spans["gateway.token_exchange"].attributes or {}
    assert exchange["gateway.coalesced_waiters"] == 3
    assert exchange["gateway.outcome"] == "ok" and exchange["gateway.audience"] == API
    assert "gateway.refresh_lock.wait" in spans and "gateway.session_store.save" in spans
    for span in exporter.get_finished_spans():
        assert "rt" not in {str(v) for v in (span.attributes or {}).values()}
