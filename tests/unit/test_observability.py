"""Request ids, the access log and the JSON log format (gateway/observability.py, access_log.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx
from starlette.types import Message, Receive, Scope, Send

from gateway import create_app
from gateway.access_log import AccessLog
from gateway.dispatch import Dispatcher, OwnRoute
from gateway.metrics import GatewayMetrics
from gateway.observability import (
    JSONFormatter,
    configure_logging,
    current_request_id,
    new_request_id,
    request_context,
    user_for_log,
    valid_request_id,
)
from gateway.settings import LogSettings

from .conftest import DISCOVERY, jwks, make_settings
from .fakes import FormattingHandler, RecordingUpstream

pytestmark = pytest.mark.anyio

GENERATED = re.compile(r"[0-9a-f]{32}")
JWKS_URL = str(DISCOVERY["jwks_uri"])
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
VALID_IDS = ["a", "req-1", "A.b_c-9", "x" * 128, "0af7651916cd43dd8448eb211c80319c"]
INVALID_IDS = ["", "x" * 129, "has space", "semi;colon", "a/b", "a:b", "caf\u00e9", "{json}"]


def _metric(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Inner:
    """An ASGI app standing in for one of the gateway's own endpoints: records what it saw."""

    def __init__(self, *, route: str = "api", sub: str | None = "alice", status: int = 200) -> None:
        self.route, self.sub, self.status = route, sub, status
        self.headers: list[tuple[bytes, bytes]] = []
        self.extra_response_headers: list[tuple[bytes, bytes]] = []
        self.raise_error = False
        self.answer = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.headers = list(scope["headers"])
        self.seen_id = current_request_id.get()
        context = request_context(scope)
        context.route, context.sub, context.upstream_seconds = self.route, self.sub, 0.002
        logging.getLogger("gateway.inner").warning("inside the request")
        if self.raise_error:
            raise RuntimeError("boom")
        if not self.answer:
            return
        headers = [(b"content-type", b"text/plain"), *self.extra_response_headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="gateway.access")
    return caplog


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    return httpx.AsyncClient(transport=transport, base_url="http://gw.test")


class _NoProxy:
    async def handle(self, *args: Any) -> None:
        raise AssertionError("these tests only call the endpoint at /auth/x")


async def _no_websockets(*args: Any) -> None:
    raise AssertionError("no WebSocket here")


def _middleware(inner: Inner, **log: Any) -> tuple[Dispatcher, GatewayMetrics]:
    """The dispatcher with ``inner`` as its only endpoint, at /auth/x."""
    metrics = GatewayMetrics(routes=["api"])
    access = AccessLog(metrics=metrics, settings=LogSettings.model_validate(log))
    dispatcher = Dispatcher(
        own={"/auth/x": OwnRoute(None, inner)},
        own_subtrees={},
        static=None,
        proxy=_NoProxy(),  # type: ignore[arg-type]
        websockets=_no_websockets,
        access=access,
        https=False,
        error_headers=(),
    )
    return dispatcher, metrics


def _access_lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    formatter = JSONFormatter()
    return [json.loads(formatter.format(r)) for r in records if r.name == "gateway.access"]


@pytest.mark.parametrize("value", VALID_IDS)
def test_valid_request_id_accepts_short_safe_ids(value: str) -> None:
    assert valid_request_id(value) == value


@pytest.mark.parametrize("value", INVALID_IDS)
def test_valid_request_id_refuses_long_or_unsafe_ids(value: str) -> None:
    assert valid_request_id(value.encode("utf-8").decode("latin-1")) is None  # as a header
    assert valid_request_id(None) is None


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("hashed", hmac.new(b"", b"auth0|alice", hashlib.sha256).hexdigest()[:16]),
        ("plain", "auth0|alice"),
        ("omit", None),
    ],
)
def test_user_for_log_modes(mode: Any, expected: str | None) -> None:
    assert user_for_log("auth0|alice", mode) == expected
    assert user_for_log(None, mode) is None


def test_user_for_log_hash_depends_on_the_key() -> None:
    one = user_for_log("alice@example.com", "hashed", b"key-one")
    two = user_for_log("alice@example.com", "hashed", b"key-two")
    assert one is not None and two is not None and one != two
    assert hashlib.sha256(b"alice@example.com").hexdigest()[:16] not in (one, two)


async def test_request_id_generated_when_missing_then_returned_and_seen_inside() -> None:
    inner = Inner()
    app, _ = _middleware(inner)
    async with _client(app) as client:
        response = await client.get("/auth/x")
    request_id = response.headers["x-request-id"]
    assert GENERATED.fullmatch(request_id)
    assert inner.seen_id == request_id


@pytest.mark.parametrize("value", VALID_IDS)
async def test_request_id_valid_incoming_is_kept(value: str) -> None:
    inner = Inner()
    app, _ = _middleware(inner)
    async with _client(app) as client:
        response = await client.get("/auth/x", headers={"X-Request-ID": value})
    assert response.headers["x-request-id"] == value
    assert inner.seen_id == value


@pytest.mark.parametrize("value", INVALID_IDS)
async def test_request_id_invalid_incoming_is_replaced_everywhere(value: str) -> None:
    inner = Inner()
    app, _ = _middleware(inner)
    async with _client(app) as client:
        response = await client.get("/auth/x", headers=[(b"X-Request-ID", value.encode("utf-8"))])
    request_id = response.headers["x-request-id"]
    assert GENERATED.fullmatch(request_id)
    assert inner.seen_id == request_id


async def test_response_request_id_replaces_the_apps_own() -> None:
    inner = Inner()
    inner.extra_response_headers = [(b"X-Request-ID", b"upstream-id")]
    app, _ = _middleware(inner)
    async with _client(app) as client:
        response = await client.get("/auth/x", headers={"X-Request-ID": "mine"})
    assert response.headers.get_list("x-request-id") == ["mine"]


async def test_access_log_line_is_json_with_request_fields_and_no_query(
    access_log: pytest.LogCaptureFixture,
) -> None:
    app, metrics = _middleware(Inner())
    async with _client(app) as client:
        response = await client.get(
            "/auth/x?code=secret-code&state=secret-state",
            headers={"X-Request-ID": "rid-1", "Cookie": "gw_session=secret-cookie"},
        )
    assert response.status_code == 200
    [line] = _access_lines(access_log.records)
    assert line["logger"] == "gateway.access" and line["level"] == "info"
    assert line["request_id"] == "rid-1" and line["method"] == "GET"
    assert line["route"] == "api" and line["status"] == 200
    assert line["upstream_ms"] == 2.0 and line["duration_ms"] >= 0
    assert line["user"] == user_for_log("alice", "hashed")  # default key in this middleware
    text = json.dumps(line)
    assert "secret" not in text and "/auth/x" not in text
    assert _metric(metrics, "gateway_requests_total", route="api", status="200") == 1
    assert _metric(metrics, "gateway_upstream_duration_seconds_count", route="api") == 1


@pytest.mark.parametrize(("mode", "present"), [("hashed", True), ("plain", True), ("omit", False)])
async def test_access_log_user_follows_log_user(
    access_log: pytest.LogCaptureFixture, mode: str, present: bool
) -> None:
    app, _ = _middleware(Inner(), user=mode)
    async with _client(app) as client:
        await client.get("/auth/x")
    [line] = _access_lines(access_log.records)
    assert ("user" in line) is present
    if mode == "plain":
        assert line["user"] == "alice"


async def test_access_log_does_no_work_when_the_logger_is_disabled(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.access")

    def must_not_run(*args: Any) -> None:
        raise AssertionError("formatted a disabled access log line")

    monkeypatch.setattr("gateway.access_log.user_for_log", must_not_run)
    app, metrics = _middleware(Inner())
    async with _client(app) as client:
        response = await client.get("/auth/x")
    assert response.status_code == 200
    assert not [r for r in caplog.records if r.name == "gateway.access"]
    assert _metric(metrics, "gateway_requests_total", route="api", status="200") == 1


async def test_access_log_off_in_settings_still_counts_metrics(
    access_log: pytest.LogCaptureFixture,
) -> None:
    app, metrics = _middleware(Inner(), access_log=False)
    async with _client(app) as client:
        await client.get("/auth/x")
    assert _access_lines(access_log.records) == []
    assert _metric(metrics, "gateway_requests_total", route="api", status="200") == 1


async def test_unhandled_error_is_logged_and_counted_as_500(
    access_log: pytest.LogCaptureFixture,
) -> None:
    inner = Inner()
    inner.raise_error = True
    app, metrics = _middleware(inner)
    async with _client(app) as client:
        response = await client.get("/auth/x")
    assert response.status_code == 500 and response.json()["error"] == "internal_error"
    [line] = _access_lines(access_log.records)
    assert line["status"] == 500
    assert _metric(metrics, "gateway_requests_total", route="api", status="500") == 1


async def test_no_answer_is_logged_as_client_closed_499(
    access_log: pytest.LogCaptureFixture,
) -> None:
    inner = Inner()
    inner.answer = False
    app, _ = _middleware(inner)
    scope = {"type": "http", "method": "GET", "path": "/auth/x", "headers": [], "query_string": b""}

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing may be sent")

    await app(scope, receive, send)
    [line] = _access_lines(access_log.records)
    assert line["status"] == 499


async def test_the_lifespan_is_not_a_request() -> None:
    inner = Inner()
    app, metrics = _middleware(inner)
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert inner.headers == []  # never called
    assert _metric(metrics, "gateway_requests_total", route="gateway", status="200") == 0


async def test_every_line_logged_during_a_request_carries_its_id() -> None:
    handler = FormattingHandler()
    inner_logger = logging.getLogger("gateway.inner")
    inner_logger.addHandler(handler)
    try:
        app, _ = _middleware(Inner())
        async with _client(app) as client:
            await client.get("/auth/x", headers={"X-Request-ID": "rid-2"})
    finally:
        inner_logger.removeHandler(handler)
    [line] = handler.lines
    assert line["request_id"] == "rid-2" and line["message"] == "inside the request"
    assert current_request_id.get() is None  # reset once the request is done


def test_json_formatter_prefers_explicit_request_id_and_names_exceptions() -> None:
    token = current_request_id.set("from-context")
    try:
        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "m %s", ("a",), None)
        record.request_id = "explicit"
        try:
            raise ValueError("secret-detail")
        except ValueError:
            record.exc_info = sys.exc_info()
        line = json.loads(JSONFormatter().format(record))
    finally:
        current_request_id.reset(token)
    assert line["request_id"] == "explicit" and line["message"] == "m a"
    assert line["exception"] == "ValueError" and "secret-detail" not in json.dumps(line)


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access_disabled = logging.getLogger("uvicorn.access").disabled
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = access_disabled


@pytest.mark.parametrize(
    ("fmt", "formatter"), [("json", JSONFormatter), ("text", logging.Formatter)]
)
def test_configure_logging_installs_one_handler(
    restore_root_logging: None, fmt: Any, formatter: type[logging.Formatter]
) -> None:
    configure_logging(LogSettings.model_validate({"format": fmt, "level": "warning"}))
    root = logging.getLogger()
    [handler] = root.handlers
    assert type(handler.formatter) is formatter
    assert root.level == logging.WARNING
    assert logging.getLogger("uvicorn.access").disabled


# -- the whole app: the id and traceparent reach the upstream ---------------------------------


async def test_gateway_forwards_request_id_and_traceparent_untouched(
    idp: respx.MockRouter,
) -> None:
    upstream = RecordingUpstream()
    app = create_app(make_settings(), upstream=upstream)
    async with _client(app) as client:
        given = await client.get(
            "/status/x", headers={"X-Request-ID": "rid-up", "traceparent": TRACEPARENT}
        )
        generated = await client.get("/status/y", headers={"X-Request-ID": "bad id"})
    assert given.headers["x-request-id"] == "rid-up"
    first = [(k.lower(), v) for k, v in upstream.calls[0][1]]
    assert ("x-request-id", "rid-up") in first and ("traceparent", TRACEPARENT) in first
    second = {k.lower(): v for k, v in upstream.calls[1][1]}
    assert second["x-request-id"] == generated.headers["x-request-id"] != "bad id"
    await app.state.services.shutdown()


# -- health: liveness and readiness, outside auth and CSRF ------------------------------------

CROSS_SITE = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}


async def test_healthz_and_readyz_need_no_session_nor_csrf(idp: respx.MockRouter) -> None:
    app = create_app(make_settings())
    async with _client(app) as client:
        health = await client.get("/healthz", headers=CROSS_SITE)
        ready = await client.get("/readyz", headers=CROSS_SITE)
    await app.state.services.shutdown()
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"idp": "ok", "store": "ok"}}


async def test_readyz_is_503_until_discovery_and_jwks_load_while_healthz_stays_200(
    idp: respx.MockRouter,
) -> None:
    jwks_route = idp.get(JWKS_URL)
    jwks_route.respond(503)
    app = create_app(make_settings())
    async with _client(app) as client:
        not_ready = await client.get("/readyz")
        alive = await client.get("/healthz")
        jwks_route.respond(json=jwks())
        ready = await client.get("/readyz")
    await app.state.services.shutdown()
    assert not_ready.status_code == 503
    assert not_ready.json() == {"ready": False, "checks": {"idp": "idp_unavailable", "store": "ok"}}
    assert alive.status_code == 200
    assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_readyz_is_503_when_the_session_store_is_unreachable(idp: respx.MockRouter) -> None:
    session = {
        "store": "redis",
        "redis_url": "redis://127.0.0.1:1/0",  # nothing listens on port 1
        "redis_timeout": "500ms",
        "secret_key": ["unit-secret-key-unit-secret-key-unit-secret"],
    }
    app = create_app(make_settings(session=session))
    async with _client(app) as client:
        ready = await client.get("/readyz")
    await app.state.services.shutdown()
    assert ready.status_code == 503
    assert ready.json() == {
        "ready": False,
        "checks": {"idp": "ok", "store": "session_store_unavailable"},
    }


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_request_ids_are_unique_hex_across_batches_and_a_forked_child_draws_its_own() -> None:
    ids = [new_request_id() for _ in range(1000)]  # several batches of 256
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns about forking a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        try:
            os.write(write, ",".join(new_request_id() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        child_ids = pipe.read().split(",")
    parent_ids = [new_request_id() for _ in range(10)]  # the rest of the parent's batch
    assert len(child_ids) == 10
    assert not set(child_ids) & set(parent_ids) and not set(child_ids) & set(ids)
