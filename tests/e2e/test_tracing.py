"""OpenTelemetry traces, received by a real OTLP/HTTP receiver: the span tree of a login, a
token exchange and a proxied call; the upstream gets the client span's ``traceparent``; an
incoming ``traceparent`` is the server span's parent; no span carries a secret or a query."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .otlp_receiver import OTLPReceiver, ReceivedSpan, otlp_receiver, tree
from .servers import API, IdpProcess

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_PARENT = "00f067aa0ba902b7"


@pytest.fixture
def traced(
    idp: IdpProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GatewayUnderTest, OTLPReceiver]]:
    with otlp_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-under-test")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        with start_upstreams(idp) as upstreams, run_gateway(idp, upstreams) as gw:
            yield gw, receiver


def _server(spans: list[ReceivedSpan], route: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.kind == "server" and s.attributes.get("http.route") == route]


async def test_spans_of_a_login_an_exchange_and_a_proxied_call(
    traced: tuple[GatewayUnderTest, OTLPReceiver],
) -> None:
    gw, receiver = traced
    assert gw.gateway.tracing is not None
    async with gw.client() as client:
        await gw.login(client)
        response = await client.get(
            "/api/orders?code=secret-query",
            headers={**CSRF, "traceparent": f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"},
        )
    assert response.status_code == 200
    seen_headers = response.json()["headers"]
    spans = receiver.wait_for(
        lambda got: bool(_server(got, "api")) and any(s.kind == "client" for s in got)
    )
    by_id = tree(spans)

    # The proxied call: the client's trace continues; exchange, lock wait, store and upstream
    # spans are the server span's children.
    [api] = _server(spans, "api")
    assert (api.trace_id, api.parent_id) == (INCOMING_TRACE, INCOMING_PARENT)
    assert api.name == "GET api" and api.attributes["http.response.status_code"] == 200
    assert api.resource["service.name"] == "gateway-under-test"
    assert api.resource["deployment.environment"] == "e2e"
    names = {child.name for child in api.children}
    assert {"gateway.refresh_lock.wait", "gateway.token_exchange", "GET"} <= names
    [exchange] = [c for c in api.children if c.name == "gateway.token_exchange"]
    assert exchange.attributes["gateway.audience"] == API
    assert exchange.attributes["gateway.grant_type"] == "refresh_token"
    assert exchange.attributes["gateway.outcome"] == "ok"
    assert exchange.attributes["gateway.coalesced_waiters"] == 0
    assert any(c.attributes.get("gateway.peer") == "idp" for c in exchange.children)
    [upstream_call] = [c for c in api.children if c.kind == "client" and c.name == "GET"]
    assert upstream_call.attributes["gateway.route"] == "api"
    # The upstream got the client span's context, not the browser's.
    assert upstream_call.is_named_by(seen_headers["traceparent"])
    assert any(c.name.startswith("gateway.session_store.") for c in by_id.values())

    # The login: the callback's server span has the IdP's token call and the session's save.
    [callback] = _server(spans, "/auth/callback")
    callback_children = {c.name for c in callback.children}
    assert "POST" in callback_children and "gateway.session_store.save" in callback_children
    assert _server(spans, "/auth/login")

    # Nothing secret or request-specific beyond the route in any span.
    cookie = client.cookies.get("gw_session", domain="127.0.0.1") or ""
    for span in spans:
        text = repr(span.attributes) + span.name
        assert "secret-query" not in text and "/api/orders" not in text
        assert not cookie or cookie not in text
        assert "Bearer" not in text and "code=" not in text


async def test_no_incoming_traceparent_starts_a_new_trace(
    traced: tuple[GatewayUnderTest, OTLPReceiver],
) -> None:
    gw, receiver = traced
    async with gw.client() as client:
        response = await client.get("/public/x")
    assert response.status_code == 200
    spans = receiver.wait_for(lambda got: bool(_server(got, "public")))
    [public] = _server(spans, "public")
    assert public.parent_id == "" and public.trace_id != INCOMING_TRACE
    [call] = [s for s in spans if s.parent_id == public.span_id and s.kind == "client"]
    assert call.is_named_by(response.json()["headers"]["traceparent"])
