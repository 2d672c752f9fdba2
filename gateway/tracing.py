"""OpenTelemetry traces over OTLP/HTTP: the gateway's tracer and the spans of its IO.

On when ``tracing.enabled`` is true, or (unset) when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set. The SDK reads the standard variables itself:
endpoint and headers (``OTEL_EXPORTER_OTLP_*``), sampler (``OTEL_TRACES_SAMPLER``/``_ARG``),
service name and resource attributes (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``),
batching (``OTEL_BSP_*``). The provider is the gateway's own, not the process-global one, so an
app that mounts the gateway keeps its tracing as it is.

With tracing off nothing here is built and the hot path does no tracing work: each traced part
is a wrapper put in place of the plain one (``traced_dispatch.TracedDispatcher`` for the
dispatcher, :class:`TracedUpstreamClient`, :class:`TracedSessionStore`, the IdP client's
transport), so the plain objects carry no "is tracing on?" test. The token broker's exchange
span is the one hook in shared code, on its slow path only.

Spans never carry a token, a cookie, a query string or a raw path: server spans name the route
(``http.route``: the configured route's name, or the gateway's own fixed path), client spans
the peer's address and the route.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .errors import GatewayError
from .metrics import exchange_outcome
from .proxy import UpstreamClient, UpstreamResponse
from .sessions.base import CachedToken, Session, SessionStore
from .settings import Settings
from .version import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

SERVICE_NAME = "mrrt-gateway"
# W3C Trace Context only: baggage is an application's business, never forwarded by us.
PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
TRACE_HEADERS_BYTES = frozenset(h.encode() for h in TRACE_HEADERS)


class Tracing:
    """The gateway's tracer, and the wrappers that trace its IO."""

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self._provider = provider
        # Tasks waiting for a session's refresh lock (TracedSessionStore), read by the
        # exchange span as the number of requests coalesced behind one exchange.
        self._lock_waiters: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        """The OTLP/HTTP pipeline, or None when tracing is off."""
        if not settings.tracing.is_enabled:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider.get_tracer("gateway", __version__), provider)

    async def shutdown(self) -> None:
        """Export what is buffered and stop (off the event loop: it is blocking HTTP)."""
        if self._provider is not None:
            await asyncio.to_thread(self._provider.shutdown)

    # -- wrappers ------------------------------------------------------------------------------

    def upstream(self, inner: UpstreamClient) -> TracedUpstreamClient:
        return TracedUpstreamClient(inner, self.tracer)

    def store(self, inner: SessionStore) -> TracedSessionStore:
        return TracedSessionStore(inner, self)

    def idp_transport(self) -> httpx.AsyncBaseTransport:
        return TracedTransport(httpx.AsyncHTTPTransport(), self.tracer)

    @contextlib.contextmanager
    def token_exchange(self, audience: str, session_id: str, grant_type: str) -> Iterator[Span]:
        """``gateway.token_exchange``: one exchange at the IdP, its outcome (as the metrics
        label it) and how many requests of this instance were waiting for it at the end."""
        with self.tracer.start_as_current_span(
            "gateway.token_exchange",
            kind=SpanKind.INTERNAL,
            attributes={"gateway.audience": audience, "gateway.grant_type": grant_type},
            record_exception=False,  # messages name routes, but keep spans to fixed facts
            set_status_on_exception=False,
        ) as span:
            outcome = "ok"
            try:
                yield span
            except GatewayError as exc:
                outcome = exchange_outcome(exc)
                span.set_status(Status(StatusCode.ERROR, exc.error))
                raise
            except BaseException as exc:
                outcome = type(exc).__name__
                span.set_status(Status(StatusCode.ERROR, outcome))
                raise
            finally:
                span.set_attribute("gateway.outcome", outcome)
                span.set_attribute(
                    "gateway.coalesced_waiters", self._lock_waiters.get(session_id, 0)
                )

    @contextlib.asynccontextmanager
    async def lock_wait(
        self, session_id: str, lock: contextlib.AbstractAsyncContextManager[None]
    ) -> AsyncIterator[None]:
        """Hold ``lock``; a ``gateway.refresh_lock.wait`` span covers the wait for it."""
        waiters = self._lock_waiters
        async with contextlib.AsyncExitStack() as stack:
            waiters[session_id] = waiters.get(session_id, 0) + 1
            try:
                with self.tracer.start_as_current_span(
                    "gateway.refresh_lock.wait", record_exception=False
                ):
                    await stack.enter_async_context(lock)
            finally:
                left = waiters[session_id] - 1
                if left:
                    waiters[session_id] = left
                else:
                    del waiters[session_id]
            yield


def _peer(url: str) -> dict[str, Any]:
    """``server.address``/``server.port`` of a URL (never its path or query)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    return {"server.address": parts.hostname or "", "server.port": port, "url.scheme": parts.scheme}


class _EndOnce:
    """Ends a client span when the upstream answer is closed (its body relayed), once."""

    __slots__ = ("_close", "_span")

    def __init__(self, span: Span, close: Callable[[], None]) -> None:
        self._span: Span | None = span
        self._close = close

    def __call__(self) -> None:
        try:
            self._close()
        finally:
            span, self._span = self._span, None
            if span is not None:
                span.end()


class TracedUpstreamClient:
    """An UpstreamClient whose calls are client spans; the span's context reaches the upstream
    in ``traceparent`` (a client's own ``traceparent``/``tracestate`` are replaced: the server
    span already carries the client's trace)."""

    def __init__(self, inner: UpstreamClient, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

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
        span = self._tracer.start_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "gateway.route": route, **_peer(url)},
        )
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        sent = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
        sent.extend(carrier.items())
        try:
            response = await self._inner.send(method, url, sent, body, timeout=timeout, route=route)
        except BaseException as exc:
            error = exc.error if isinstance(exc, GatewayError) else type(exc).__name__
            span.set_status(Status(StatusCode.ERROR, error))
            span.end()
            raise
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        response.close = _EndOnce(span, response.close)
        return response

    async def close(self) -> None:
        await self._inner.close()


class TracedTransport(httpx.AsyncBaseTransport):
    """The IdP client's transport: each call (discovery, JWKS, token, revocation) a client
    span, without the query or body (codes, tokens)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "server.address": url.host,
            "server.port": url.port or (443 if url.scheme == "https" else 80),
            # Host and path only: no userinfo, no query.
            "url.full": f"{url.scheme}://{url.host}{f':{url.port}' if url.port else ''}{url.path}",
            "gateway.peer": "idp",
        }
        with self._tracer.start_as_current_span(
            request.method, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
        ) as span:
            carrier: dict[str, str] = {}
            PROPAGATOR.inject(carrier)
            for name, value in carrier.items():
                request.headers[name] = value
            response = await self._inner.handle_async_request(request)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class TracedSessionStore:
    """A SessionStore whose calls are spans ``gateway.session_store.<operation>`` (but the
    memory store's ``load_now``); waiting for the refresh lock is a span of its own
    (``Tracing.lock_wait``)."""

    def __init__(self, inner: SessionStore, tracing: Tracing) -> None:
        self._inner = inner
        self._tracing = tracing
        self._tracer = tracing.tracer
        self.idle_timeout = inner.idle_timeout
        # A store that answers without IO (the memory store: a dict lookup) is read through
        # untraced on the hot path, as SessionManager reads it: a span would cost ~50 times
        # the lookup and say nothing. Its other calls are traced.
        self.load_now: Callable[[str], Session | None] | None = getattr(inner, "load_now", None)

    def __repr__(self) -> str:
        return f"TracedSessionStore({self._inner!r})"

    def _span(self, operation: str) -> contextlib.AbstractContextManager[Span]:
        return self._tracer.start_as_current_span(
            "gateway.session_store." + operation,
            kind=SpanKind.CLIENT,
            attributes={"gateway.store": type(self._inner).__name__},
            record_exception=False,
        )

    async def save(self, session: Session) -> None:
        with self._span("save"):
            await self._inner.save(session)

    async def load(self, session_id: str) -> Session | None:
        with self._span("load"):
            return await self._inner.load(session_id)

    async def touch(self, session: Session) -> None:
        with self._span("touch"):
            await self._inner.touch(session)

    async def delete(self, session_id: str) -> Session | None:
        with self._span("delete"):
            return await self._inner.delete(session_id)

    async def find(self, *, sub: str | None = None, sid: str | None = None) -> list[str]:
        with self._span("find"):
            return await self._inner.find(sub=sub, sid=sid)

    def refresh_lock(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._tracing.lock_wait(session_id, self._inner.refresh_lock(session_id))

    async def get_token(self, session_id: str, key: str) -> CachedToken | None:
        with self._span("get_token"):
            return await self._inner.get_token(session_id, key)

    async def put_token(self, session_id: str, key: str, token: CachedToken) -> None:
        with self._span("put_token"):
            await self._inner.put_token(session_id, key, token)

    async def get_client_token(self, key: str) -> CachedToken | None:
        with self._span("get_client_token"):
            return await self._inner.get_client_token(key)

    async def put_client_token(self, key: str, token: CachedToken) -> None:
        with self._span("put_client_token"):
            await self._inner.put_client_token(key, token)

    async def get_dpop_nonce(self, server: str) -> str | None:
        with self._span("get_dpop_nonce"):
            return await self._inner.get_dpop_nonce(server)

    async def put_dpop_nonce(self, server: str, nonce: str) -> None:
        with self._span("put_dpop_nonce"):
            await self._inner.put_dpop_nonce(server, nonce)

    async def put_login(self, state: str, data: dict[str, Any], ttl: float) -> None:
        with self._span("put_login"):
            await self._inner.put_login(state, data, ttl)

    async def pop_login(self, state: str) -> dict[str, Any] | None:
        with self._span("pop_login"):
            return await self._inner.pop_login(state)

    async def remember_jti(self, jti: str, ttl: float) -> bool:
        with self._span("remember_jti"):
            return await self._inner.remember_jti(jti, ttl)

    async def ping(self) -> None:
        with self._span("ping"):
            await self._inner.ping()

    async def close(self) -> None:
        await self._inner.close()


def extract_context(headers: list[tuple[bytes, bytes]]) -> otel_context.Context | None:
    """The parent context of an incoming ``traceparent`` (None without one)."""
    carrier = {
        k.decode("latin-1").lower(): v.decode("latin-1")
        for k, v in headers
        if k.lower() in TRACE_HEADERS_BYTES
    }
    if not carrier:
        return None
    return PROPAGATOR.extract(carrier)


__all__ = [
    "TracedSessionStore",
    "TracedTransport",
    "TracedUpstreamClient",
    "Tracing",
    "extract_context",
]
