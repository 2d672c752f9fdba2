"""Prometheus metrics of one gateway: a registry per app, label children bound at startup.

Label values come from the configuration (route names, audiences) or from short fixed lists
(outcomes, IdP endpoints, status codes), never from request data, so cardinality is bounded.
A registry per app (not prometheus_client's global one) lets several gateways live in one
process, as they do in the tests and when mounted twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Sized
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from starlette.requests import Request
from starlette.responses import Response

from .errors import (
    AudienceNotPermitted,
    GatewayError,
    IdentityProviderUnavailable,
    InsufficientScope,
    NotFound,
    RefreshTokenRejected,
    render_error,
)
from .hot_metrics import CounterFamily, FastCounter, FastHistogram, HistogramFamily
from .settings import MetricsSettings, Settings
from .version import __version__

logger = logging.getLogger("gateway.metrics")

# Per route: its request histogram, its request counters by status, its upstream histogram.
_RouteSeries = tuple[FastHistogram, dict[int, FastCounter], FastHistogram | None]

GATEWAY_ROUTE = "gateway"  # the gateway's own endpoints (/auth/*, /healthz, /metrics...)
UNMATCHED_ROUTE = "unmatched"  # no route matched the path (404) or the path was refused
IDP_ENDPOINTS = ("token", "discovery", "jwks", "revoke", "userinfo")
EXCHANGE_OUTCOMES = ("ok", "refused", "invalid_grant", "idp_unavailable")

# Seconds. IdP and upstream calls on a LAN take milliseconds; the tail shows timeouts.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def exchange_outcome(exc: GatewayError) -> str:
    """The ``outcome`` label of a failed refresh-token exchange (a fixed, small set)."""
    if isinstance(exc, RefreshTokenRejected):
        return "invalid_grant"
    if isinstance(exc, AudienceNotPermitted | InsufficientScope):
        return "refused"
    if isinstance(exc, IdentityProviderUnavailable):
        return "idp_unavailable"
    return exc.error  # a class attribute of the error tree: bounded


class GatewayMetrics:
    """Every instrument of one gateway, on its own ``CollectorRegistry``."""

    def __init__(
        self, *, routes: Iterable[str] = (), audiences: Iterable[str] = (), version: str = ""
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Recorded on every request: lock-free instruments (hot_metrics.py).
        self._requests = CounterFamily(
            "gateway_requests", "Requests answered, by route and status.", ["route", "status"], r
        )
        self._request_seconds = HistogramFamily(
            "gateway_request_duration_seconds",
            "Total time to answer, by route.",
            ["route"],
            r,
            buckets=_BUCKETS,
        )
        self._upstream_seconds = HistogramFamily(
            "gateway_upstream_duration_seconds",
            "Time from sending to an upstream to its response headers, by route.",
            ["route"],
            r,
            buckets=_BUCKETS,
        )
        self._exchanges = Counter(
            "gateway_token_exchanges",
            "Refresh-token exchanges, by audience and outcome.",
            ["audience", "outcome"],
            registry=r,
        )
        cache = CounterFamily(
            "gateway_token_cache",
            "Access-token lookups: hit_local, hit_shared, hit_refused, miss.",
            ["result"],
            r,
        )
        self.cache_hit_local = cache.labels("hit_local")
        self.cache_hit_shared = cache.labels("hit_shared")
        self.cache_hit_refused = cache.labels("hit_refused")
        self.cache_miss = cache.labels("miss")
        self.token_coalesced = Counter(
            "gateway_token_coalesced",
            "Requests that waited for another request's exchange and used its token.",
            registry=r,
        )
        self._client_exchanges = Counter(
            "gateway_client_token_exchanges",
            "Client-credentials exchanges (auth: client, user_or_client), by audience and outcome.",
            ["audience", "outcome"],
            registry=r,
        )
        self._token_retries = Counter(
            "gateway_token_retries",
            "Requests sent again with a new token after the upstream answered 401 "
            'error="invalid_token", by route.',
            ["route"],
            registry=r,
        )
        idp = Histogram(
            "gateway_idp_duration_seconds",
            "Calls to the identity provider, by endpoint.",
            ["endpoint"],
            buckets=_BUCKETS,
            registry=r,
        )
        self._idp = {endpoint: idp.labels(endpoint) for endpoint in IDP_ENDPOINTS}
        Gauge("gateway_info", "Always 1; the version label.", ["version"], registry=r).labels(
            version
        ).set(1)
        # Children bound once per configured route and audience: the hot path only looks
        # them up in a dict (and series exist at 0 before the first request).
        routes = list(routes)
        names = [*routes, GATEWAY_ROUTE, UNMATCHED_ROUTE]
        self._by_route: dict[str, _RouteSeries] = {
            n: (
                self._request_seconds.labels(n),
                {},
                self._upstream_seconds.labels(n) if n in routes else None,
            )
            for n in names
        }
        self._exchange_children = {
            (a, o): self._exchanges.labels(a, o) for a in audiences for o in EXCHANGE_OUTCOMES
        }
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayMetrics:
        audiences = dict.fromkeys(r.audience for r in settings.routes if r.audience)
        return cls(
            routes=[r.name for r in settings.routes], audiences=audiences, version=__version__
        )

    # -- hooks (called on the hot path: dict lookups and one increment each) ---------------

    def observe_request(
        self, route: str, status: int, seconds: float, upstream_seconds: float | None
    ) -> None:
        """One answered request: count it, time it, and time its upstream call if any."""
        series = self._by_route.get(route)
        if series is None:  # not a configured name: bounded by the callers, bind it once
            series = self._by_route[route] = (self._request_seconds.labels(route), {}, None)
        histogram, by_status, upstream = series
        counter = by_status.get(status)
        if counter is None:  # at most one per HTTP status code per route
            counter = by_status[status] = self._requests.labels(route, str(status))
        counter.inc()
        histogram.observe(seconds)
        if upstream_seconds is not None:
            if upstream is None:  # its first upstream time: no empty series before
                upstream = self._upstream_seconds.labels(route)
                self._by_route[route] = (histogram, by_status, upstream)
            upstream.observe(upstream_seconds)

    def exchange_ok(self, audience: str) -> None:
        self._exchange(audience, "ok")

    def exchange_failed(self, audience: str, exc: GatewayError) -> None:
        self._exchange(audience, exchange_outcome(exc))

    def client_exchange(self, audience: str, outcome: str) -> None:
        """One client-credentials exchange: ``ok`` or :func:`exchange_outcome`'s."""
        self._client_exchanges.labels(audience, outcome).inc()

    def token_retried(self, route: str) -> None:
        self._token_retries.labels(route).inc()

    def _exchange(self, audience: str, outcome: str) -> None:
        child = self._exchange_children.get((audience, outcome))
        if child is None:
            child = self._exchange_children[(audience, outcome)] = self._exchanges.labels(
                audience, outcome
            )
        child.inc()

    def observe_idp(self, endpoint: str, seconds: float) -> None:
        """One call to the IdP (``token``, ``discovery``, ``jwks`` or ``revoke``)."""
        self._idp[endpoint].observe(seconds)

    def track_sessions(self, store: object) -> None:
        """Export ``gateway_active_sessions`` for stores that can count (the memory store);
        a shared store's count belongs to the store's own monitoring."""
        if isinstance(store, Sized):
            gauge = Gauge(
                "gateway_active_sessions", "Sessions held by this process.", registry=self.registry
            )
            gauge.set_function(lambda: len(store))

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text format of this registry."""
        return generate_latest(self.registry)

    def endpoint(self, settings: MetricsSettings) -> Callable[[Request], Awaitable[Response]]:
        """The main app's ``GET /metrics``: 404 when disabled or served on ``metrics.port``
        (the path stays the gateway's own, never proxied to a catch-all route)."""
        enabled = settings.enabled and settings.port is None

        async def metrics(request: Request) -> Response:
            if not enabled:
                return render_error(NotFound("metrics are not served here"))
            return Response(
                self.render(), media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"}
            )

        return metrics

    def start_listener(self, settings: MetricsSettings) -> int | None:
        """Serve /metrics on ``metrics.port`` from a thread of its own; return the bound port.

        prometheus_client's small WSGI server, so that scrapes never queue behind proxied
        traffic and the port can stay private while the main one is public.
        """
        if not settings.enabled or settings.port is None or self._server is not None:
            return None
        self._server, self._thread = start_http_server(
            settings.port, addr=settings.host, registry=self.registry
        )
        port = int(self._server.server_port)
        logger.info("metrics served on %s:%d", settings.host, port)
        return port

    def stop_listener(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
