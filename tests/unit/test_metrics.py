"""Prometheus metrics (gateway/metrics.py) and the IdP calls they time: discovery is cached,
the JWKS is refetched once on an unknown ``kid`` and at most every 30 s."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from gateway import create_app
from gateway.errors import (
    AudienceNotPermitted,
    GatewayError,
    IdentityProviderError,
    IdentityProviderUnavailable,
    InsufficientScope,
    LoginFailed,
    LoginRequired,
    RefreshTokenRejected,
)
from gateway.metrics import GatewayMetrics, exchange_outcome
from gateway.oidc import OIDCClient
from gateway.sessions import MemorySessionStore
from gateway.settings import Settings

from .conftest import API, BILLING, CLIENT_ID, DISCOVERY, ISSUER, jwks, make_settings, sign

pytestmark = pytest.mark.anyio

JWKS_URL = str(DISCOVERY["jwks_uri"])
TOKEN_URL = str(DISCOVERY["token_endpoint"])
REVOKE_URL = str(DISCOVERY["revocation_endpoint"])


def _value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.test")


# -- instruments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (RefreshTokenRejected("x", login_url="/auth/login"), "invalid_grant"),
        (AudienceNotPermitted("x"), "refused"),
        (InsufficientScope("x"), "refused"),
        (IdentityProviderUnavailable("x"), "idp_unavailable"),
        (IdentityProviderError("x"), "idp_error"),
        (LoginRequired("x", login_url="/auth/login"), "login_required"),
        (GatewayError("x"), "internal_error"),
    ],
)
def test_exchange_outcome_is_a_small_fixed_label(error: GatewayError, outcome: str) -> None:
    assert exchange_outcome(error) == outcome


def test_registries_are_per_app_so_several_gateways_share_a_process() -> None:
    first = GatewayMetrics(routes=["api"], audiences=[API])
    second = GatewayMetrics(routes=["api"], audiences=[API])
    first.observe_request("api", 200, 0.01, 0.005)
    first.exchange_ok(API)
    assert _value(first, "gateway_requests_total", route="api", status="200") == 1
    assert _value(second, "gateway_requests_total", route="api", status="200") is None
    assert _value(second, "gateway_token_exchanges_total", audience=API, outcome="ok") == 0
    # Two whole apps in one process: no "Duplicated timeseries" from a shared registry.
    assert create_app(make_settings()).state.services.metrics is not None
    assert create_app(make_settings()).state.services.metrics is not None


def test_configured_routes_and_audiences_exist_at_zero_before_any_request() -> None:
    metrics = GatewayMetrics.from_settings(make_settings())
    for route in ("api", "billing", "status", "gateway", "unmatched"):
        assert _value(metrics, "gateway_request_duration_seconds_count", route=route) == 0
    for route in ("api", "billing", "status"):
        assert _value(metrics, "gateway_upstream_duration_seconds_count", route=route) == 0
    for audience in (API, BILLING):
        for outcome in ("ok", "refused", "invalid_grant", "idp_unavailable"):
            labels = {"audience": audience, "outcome": outcome}
            assert _value(metrics, "gateway_token_exchanges_total", **labels) == 0
    for endpoint in ("token", "discovery", "jwks", "revoke"):
        assert _value(metrics, "gateway_idp_duration_seconds_count", endpoint=endpoint) == 0
    for result in ("hit_local", "hit_shared", "hit_refused", "miss"):
        assert _value(metrics, "gateway_token_cache_total", result=result) == 0
    assert _value(metrics, "gateway_token_coalesced_total") == 0
    assert _value(metrics, "gateway_info", version="0.1.0") == 1


def test_observe_request_counts_by_route_and_status_and_times_upstream() -> None:
    metrics = GatewayMetrics(routes=["api"])
    for status in (200, 200, 404):
        metrics.observe_request("api", status, 0.02, 0.01)
    metrics.observe_request("gateway", 302, 0.001, None)
    assert _value(metrics, "gateway_requests_total", route="api", status="200") == 2
    assert _value(metrics, "gateway_requests_total", route="api", status="404") == 1
    assert _value(metrics, "gateway_requests_total", route="gateway", status="302") == 1
    assert _value(metrics, "gateway_upstream_duration_seconds_count", route="api") == 3
    assert _value(metrics, "gateway_upstream_duration_seconds_sum", route="api") == pytest.approx(
        0.03
    )
    assert _value(metrics, "gateway_upstream_duration_seconds_count", route="gateway") is None
    assert _value(metrics, "gateway_request_duration_seconds_count", route="api") == 3
    # The buckets: "less than or equal", as prometheus-client's.
    bucket = {"route": "api", "le": "0.025"}
    assert _value(metrics, "gateway_request_duration_seconds_bucket", **bucket) == 3
    assert _value(metrics, "gateway_upstream_duration_seconds_bucket", **bucket) == 3
    assert _value(metrics, "gateway_request_duration_seconds_bucket", route="api", le="0.01") == 0
    # A name no route was configured with (the callers bound it) gets its series on first use,
    # the upstream one only once it has an upstream time; the counts seen before stay.
    metrics.observe_request("later", 200, 0.5, None)
    assert _value(metrics, "gateway_upstream_duration_seconds_count", route="later") is None
    metrics.observe_request("later", 200, 0.5, 0.25)
    assert _value(metrics, "gateway_requests_total", route="later", status="200") == 2
    assert _value(metrics, "gateway_request_duration_seconds_count", route="later") == 2
    assert _value(metrics, "gateway_upstream_duration_seconds_count", route="later") == 1
    assert _value(metrics, "gateway_upstream_duration_seconds_sum", route="later") == 0.25


def test_active_sessions_gauge_follows_the_memory_store() -> None:
    metrics = GatewayMetrics()
    store = MemorySessionStore(idle_timeout=60)
    metrics.track_sessions(store)
    assert _value(metrics, "gateway_active_sessions") == 0
    store._sessions["s1"] = (object(), time.time() + 60)  # type: ignore[assignment]
    assert _value(metrics, "gateway_active_sessions") == 1


def test_active_sessions_gauge_absent_for_a_store_that_cannot_count() -> None:
    metrics = GatewayMetrics()
    metrics.track_sessions(object())
    assert _value(metrics, "gateway_active_sessions") is None


# -- /metrics on the app, or on its own port ----------------------------------------------------


async def test_metrics_endpoint_serves_prometheus_text_with_bounded_route_labels(
    idp: respx.MockRouter,
) -> None:
    app = create_app(make_settings())
    async with _client(app) as client:
        await client.get("/healthz")
        await client.get("/no/such/route/" + "x" * 50)
        await client.get("/elsewhere/unknown/path")
        response = await client.get("/metrics")
    await app.state.services.shutdown()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("gateway_requests_total", (("route", "gateway"), ("status", "200")))] == 1
    assert samples[("gateway_requests_total", (("route", "unmatched"), ("status", "404")))] == 2
    assert "/no/such" not in response.text and "elsewhere" not in response.text


@pytest.mark.parametrize("metrics", [{"enabled": False}, {"port": 0}])
async def test_metrics_path_is_404_on_the_app_when_disabled_or_on_its_own_port(
    metrics: dict[str, Any],
) -> None:
    app = create_app(make_settings(metrics=metrics))
    async with _client(app) as client:
        response = await client.get("/metrics")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def _fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


async def test_metrics_port_serves_its_own_listener_until_shutdown(idp: respx.MockRouter) -> None:
    app = create_app(make_settings(metrics={"port": 0, "host": "127.0.0.1"}))
    gateway = app.state.services
    await gateway.startup()
    try:
        assert gateway.metrics_port
        url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
        status, text = await asyncio.to_thread(_fetch, url)
        assert status == 200 and 'gateway_idp_duration_seconds_count{endpoint="jwks"} 1.0' in text
    finally:
        await gateway.shutdown()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_fetch, url)


# -- IdP calls: timed by endpoint; discovery cached; JWKS refetched on an unknown kid -----------


@pytest.fixture
async def timed_oidc(
    settings: Settings, idp: respx.MockRouter
) -> AsyncIterator[tuple[OIDCClient, GatewayMetrics]]:
    metrics = GatewayMetrics()
    async with httpx.AsyncClient() as http:
        yield OIDCClient(settings, http, observe=metrics.observe_idp), metrics


def _idp_calls(metrics: GatewayMetrics, endpoint: str) -> float | None:
    return _value(metrics, "gateway_idp_duration_seconds_count", endpoint=endpoint)


async def test_discovery_is_fetched_once_and_cached(
    timed_oidc: tuple[OIDCClient, GatewayMetrics], idp: respx.MockRouter
) -> None:
    oidc, metrics = timed_oidc
    documents = [await oidc.metadata() for _ in range(5)]
    assert all(d == documents[0] for d in documents)
    assert idp.routes[0].call_count == 1  # the discovery route of the conftest's router
    assert _idp_calls(metrics, "discovery") == 1


def _rotated_key(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return key, public


def _id_token(*, kid: str, key: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "auth0|alice", "aud": CLIENT_ID, "iat": now, "exp": now + 300}
    return sign(claims, kid=kid, key=key)


class _Clock:
    """Stands in for the ``time`` module inside gateway.oidc (monotonic only moves on demand)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.perf_counter = time.perf_counter

    def monotonic(self) -> float:
        return self.now


async def test_unknown_kid_refetches_jwks_once_then_rate_limits(
    timed_oidc: tuple[OIDCClient, GatewayMetrics],
    idp: respx.MockRouter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    oidc, metrics = timed_oidc
    clock = _Clock()
    monkeypatch.setattr("gateway.oidc.time", clock)
    await oidc.refresh_jwks()
    jwks_route = idp.get(JWKS_URL)  # the conftest's route: one call so far
    assert jwks_route.call_count == 1 and _idp_calls(metrics, "jwks") == 1
    # Later on, the IdP rotates its signing key: the new kid is not in the cached JWKS.
    clock.now += 1800
    new_key, new_public = _rotated_key("key-2")
    jwks_route.respond(json={"keys": [*jwks()["keys"], new_public]})
    claims = await oidc.validate_id_token(_id_token(kid="key-2", key=new_key), nonce=None)
    assert claims["sub"] == "auth0|alice"
    assert jwks_route.call_count == 2 and _idp_calls(metrics, "jwks") == 2
    # Known kids never refetch.
    await oidc.validate_id_token(_id_token(kid="key-2", key=new_key), nonce=None)
    assert jwks_route.call_count == 2
    # A kid the IdP does not have, 10 s after a refetch: refused without asking again.
    clock.now += 10
    stray_key, _ = _rotated_key("key-3")
    for _ in range(3):
        with pytest.raises(LoginFailed):
            await oidc.validate_id_token(_id_token(kid="key-3", key=stray_key), nonce=None)
    assert jwks_route.call_count == 2
    # Past the 30 s floor an unknown kid may refetch again: once.
    clock.now += 21
    for _ in range(3):
        with pytest.raises(LoginFailed):
            await oidc.validate_id_token(_id_token(kid="key-3", key=stray_key), nonce=None)
    assert jwks_route.call_count == 3 and _idp_calls(metrics, "jwks") == 3
    assert _idp_calls(metrics, "discovery") == 1


async def test_token_and_revoke_calls_are_timed_even_when_they_fail(
    timed_oidc: tuple[OIDCClient, GatewayMetrics], idp: respx.MockRouter
) -> None:
    oidc, metrics = timed_oidc
    idp.post(TOKEN_URL).mock(side_effect=httpx.ConnectError("down"))
    idp.post(REVOKE_URL).respond(200)
    with pytest.raises(IdentityProviderUnavailable):
        await oidc.refresh("rt", audience=API, scopes=[])
    assert await oidc.revoke("rt") is True
    assert _idp_calls(metrics, "token") == 1 and _idp_calls(metrics, "revoke") == 1
