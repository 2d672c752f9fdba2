"""Tracing on and off: off builds nothing traced (the plain dispatcher, store and clients); on
when asked or when the standard OTLP endpoint variable is set."""

from __future__ import annotations

import pytest
import respx

from gateway import create_app
from gateway.dispatch import Dispatcher
from gateway.proxy import AiohttpUpstreamClient
from gateway.sessions import MemorySessionStore
from gateway.traced_dispatch import TracedDispatcher
from gateway.tracing import TracedSessionStore, TracedUpstreamClient, extract_context

from .conftest import make_settings

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
