"""The one way in (gateway/dispatch.py), through the real app: request ids in and out, metrics
and the access line, security headers on the gateway's own answers only, a JSON 500 for an
unexpected error, the gateway's own paths, and the same steps when mounted under a sub-path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import httpx
import pytest
import respx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import Message

from gateway import create_app
from gateway.errors import HeadersTooLarge, PayloadTooLarge
from gateway.observability import JSONFormatter, current_request_id
from gateway.proxy import UpstreamResponse

from .conftest import make_settings
from .fakes import FormattingHandler, RecordingUpstream

pytestmark = pytest.mark.anyio

SECURITY = ("x-content-type-options", "referrer-policy", "x-frame-options")


class RelayingUpstream(RecordingUpstream):
    """Answers with its own X-Request-ID, a Connection header and a JSON body."""

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        response = await super().send(*args, **kwargs)
        response.headers = (
            (b"Content-Type", b"application/json"),
            (b"X-Request-ID", b"upstream-id"),
            (b"Connection", b"keep-alive"),
            (b"Content-Length", b"2"),
        )
        return response


class FailingUpstream(RecordingUpstream):
    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        raise RuntimeError("secret-detail")


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="https://app.example.com",
    )


def _upstream_header(upstream: RecordingUpstream, name: str) -> list[str]:
    [(_url, headers)] = upstream.calls
    return [v for k, v in headers if k == name]


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="gateway.access")
    return caplog


def _metric(app: Starlette, name: str, **labels: str) -> float | None:
    value = app.state.services.metrics.registry.get_sample_value(name, labels)
    return value if value is None else float(value)


async def test_request_id_generated_then_sent_upstream_and_back() -> None:
    upstream = RelayingUpstream()
    app = create_app(make_settings(), upstream=upstream)
    async with _client(app) as client:
        response = await client.get("/status/x")
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and request_id != "upstream-id"
    assert response.headers.get_list("x-request-id") == [request_id]  # the upstream's replaced
    assert _upstream_header(upstream, "x-request-id") == [request_id]
    assert "connection" not in response.headers  # hop-by-hop: the upstream's is not relayed
    assert response.headers["content-type"] == "application/json"  # the rest is


@pytest.mark.parametrize(("sent", "kept"), [("rid-1.a_b", True), ("bad id!", False)])
async def test_incoming_request_id_kept_when_valid(sent: str, kept: bool) -> None:
    upstream = RecordingUpstream()
    app = create_app(make_settings(), upstream=upstream)
    async with _client(app) as client:
        response = await client.get("/status/x", headers={"X-Request-ID": sent})
    request_id = response.headers["x-request-id"]
    assert (request_id == sent) is kept
    assert _upstream_header(upstream, "x-request-id") == [request_id]


class LoggingUpstream(RecordingUpstream):
    """Logs a line while it is called, as the real client does when an upstream fails."""

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        logging.getLogger("gateway.proxy").warning("upstream says hello")
        return await super().send(*args, **kwargs)


@pytest.mark.parametrize(("sent", "kept"), [("rid-7", True), ("bad id!", False), (None, False)])
async def test_the_request_id_taken_in_the_header_pass_tags_lines_and_is_reset(
    sent: str | None, kept: bool
) -> None:
    handler = FormattingHandler()
    proxy_logger = logging.getLogger("gateway.proxy")
    proxy_logger.addHandler(handler)
    upstream = LoggingUpstream()
    app = create_app(make_settings(), upstream=upstream)
    try:
        async with _client(app) as client:
            response = await client.get("/status/x", headers={"X-Request-ID": sent} if sent else {})
    finally:
        proxy_logger.removeHandler(handler)
    request_id = response.headers["x-request-id"]
    assert request_id == sent if kept else re.fullmatch(r"[0-9a-f]{32}", request_id)
    [line] = handler.lines
    assert line["request_id"] == request_id  # bound while the upstream was called
    assert _upstream_header(upstream, "x-request-id") == [request_id]
    assert current_request_id.get() is None  # and unbound once the request is done


@pytest.mark.parametrize(("sent", "kept"), [("rid-404", True), ("bad id!", False)])
async def test_a_request_refused_before_the_header_pass_still_gets_its_request_id(
    access_log: pytest.LogCaptureFixture, sent: str, kept: bool
) -> None:
    app = create_app(make_settings(), upstream=RecordingUpstream())
    async with _client(app) as client:
        response = await client.get("/nowhere", headers={"X-Request-ID": sent})
    assert response.status_code == 404
    request_id = response.headers["x-request-id"]
    assert request_id == sent if kept else re.fullmatch(r"[0-9a-f]{32}", request_id)
    [record] = [r for r in access_log.records if r.name == "gateway.access"]
    assert json.loads(JSONFormatter().format(record))["request_id"] == request_id
    assert current_request_id.get() is None


async def test_relayed_answers_keep_their_headers_own_answers_get_security_headers(
    idp: respx.MockRouter,
) -> None:
    app = create_app(make_settings(), upstream=RelayingUpstream())
    async with _client(app) as client:
        relayed = await client.get("/status/x")
        unauthenticated = await client.get("/api/x", headers={"X-CSRF": "1"})
        unmatched = await client.get("/nowhere")
        navigation = await client.get("/api/x", headers={"Accept": "text/html"})
    assert relayed.status_code == 200
    assert not any(name in relayed.headers for name in SECURITY)
    for own in (unauthenticated, unmatched, navigation):
        assert all(name in own.headers for name in SECURITY), own.status_code
        assert own.headers["content-security-policy"].startswith("default-src 'none'")
        assert len(own.headers["x-request-id"]) == 32
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["login_url"] == "https://app.example.com/auth/login"
    assert unmatched.status_code == 404 and unmatched.json()["error"] == "not_found"
    assert (
        navigation.status_code == 302 and "return_to=%2Fapi%2Fx" in navigation.headers["location"]
    )
    assert "strict-transport-security" in unauthenticated.headers  # public_url is https


async def test_fast_path_counts_and_logs_every_answer(access_log: pytest.LogCaptureFixture) -> None:
    app = create_app(make_settings(), upstream=RecordingUpstream())
    async with _client(app) as client:
        await client.get("/status/a")
        await client.get("/status/b")
        await client.get("/nowhere")
    assert _metric(app, "gateway_requests_total", route="status", status="200") == 2
    assert _metric(app, "gateway_requests_total", route="unmatched", status="404") == 1
    assert _metric(app, "gateway_upstream_duration_seconds_count", route="status") == 2
    assert _metric(app, "gateway_request_duration_seconds_count", route="status") == 2
    formatter = JSONFormatter()
    lines = [
        json.loads(formatter.format(r)) for r in access_log.records if r.name == "gateway.access"
    ]
    assert [(line["route"], line["status"]) for line in lines] == [
        ("status", 200),
        ("status", 200),
        ("unmatched", 404),
    ]
    assert all(len(line["request_id"]) == 32 for line in lines)


async def test_unexpected_error_is_a_json_500_logged_by_type_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = create_app(make_settings(), upstream=FailingUpstream())
    async with _client(app) as client:
        response = await client.get("/status/reset/path-secret-42")
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error", "message": "unexpected error"}
    assert all(name in response.headers for name in SECURITY)
    assert _metric(app, "gateway_requests_total", route="status", status="500") == 1
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gateway"))
    assert "RuntimeError on route status" in ours  # (httpx, the test's client, logs its URL)
    assert "secret-detail" not in caplog.text and "path-secret-42" not in ours


async def test_gateway_paths_and_mounted_apps_take_the_same_way_in() -> None:
    app = create_app(make_settings(), upstream=RecordingUpstream())
    async with _client(app) as client:
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        # Every answer on the gateway's own paths gets the security headers and no-store.
        assert health.headers["cache-control"] == "no-store"
        assert all(name in health.headers for name in SECURITY)
        # Under /auth/ but no endpoint: the gateway's 404, never proxied, the same headers.
        other = await client.get("/auth/anything")
        assert other.status_code == 404 and other.headers["cache-control"] == "no-store"
        assert all(name in other.headers for name in SECURITY)

    async def mine(request: Request) -> PlainTextResponse:
        return PlainTextResponse("mine")

    # As the README shows: the embedding app's own routes first, the gateway mounted at "/".
    outer = Starlette(routes=[Route("/mine", mine), Mount("/", app)])
    upstream = app.state.services.upstream
    async with _client(outer) as client:
        own = await client.get("/mine")
        mounted = await client.get("/status/x")
    assert own.text == "mine" and "x-request-id" not in own.headers
    assert mounted.status_code == 200 and len(mounted.headers["x-request-id"]) == 32
    assert upstream.calls[-1][0] == "http://127.0.0.1:9/x"

    # Under a sub-path: the same dispatcher sees the path below the mount point.
    below = Starlette(routes=[Mount("/gw", app)])
    async with _client(below) as client:
        proxied = await client.get("/gw/status/y?q=1")
        health = await client.get("/gw/healthz")
        missing = await client.get("/gw/nothing/here")
    assert proxied.status_code == 200 and upstream.calls[-1][0] == "http://127.0.0.1:9/y?q=1"
    assert health.status_code == 200 and all(name in health.headers for name in SECURITY)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert all(name in missing.headers for name in SECURITY)


async def test_a_static_site_sits_in_front_of_the_proxy_in_the_same_way_in(
    tmp_path: Any,
) -> None:
    (tmp_path / "index.html").write_text("<h1>page</h1>")
    upstream = RecordingUpstream()
    app = create_app(make_settings(static={"directory": str(tmp_path)}), upstream=upstream)
    async with _client(app) as client:
        page = await client.get("/", headers={"X-Request-ID": "page-1"})
        proxied = await client.get("/status/x")
        missing = await client.get("/missing.js")
        health = await client.get("/healthz")
    assert page.status_code == 200 and page.text == "<h1>page</h1>"
    assert page.headers["x-request-id"] == "page-1" and "x-frame-options" not in page.headers
    assert proxied.status_code == 200 and upstream.calls[-1][0] == "http://127.0.0.1:9/x"
    # The static site's 404 comes from the one error renderer: JSON, security headers, an id.
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert all(name in missing.headers for name in SECURITY)
    assert len(missing.headers["x-request-id"]) == 32
    assert health.status_code == 200 and health.headers["cache-control"] == "no-store"


class OneReadUpstream(RecordingUpstream):
    """Its body arrives in one read, and the client can tell (as aiohttp's ``at_eof``)."""

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        response = await super().send(*args, **kwargs)
        response.at_eof = lambda: True
        return response


async def _raw_request(app: Any, method: str, path: str) -> list[dict[str, Any]]:
    """The ASGI messages the app sends for one request (what a server would write)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"app.example.com")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 443),
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(("method", "body"), [("GET", b"ok"), ("HEAD", b"")])
async def test_a_body_read_in_one_go_is_one_final_message_and_head_sends_none(
    method: str, body: bytes
) -> None:
    app = create_app(make_settings(), upstream=OneReadUpstream())
    start, *bodies = await _raw_request(app, method, "/status/x")
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert bodies == [{"type": "http.response.body", "body": body, "more_body": False}]


async def test_a_longer_body_is_relayed_chunk_by_chunk_then_closed() -> None:
    app = create_app(make_settings(), upstream=RecordingUpstream())  # cannot tell its end
    _, *bodies = await _raw_request(app, "GET", "/status/x")
    assert [(m["body"], m.get("more_body")) for m in bodies] == [(b"ok", True), (b"", False)]


async def test_the_first_of_duplicate_request_ids_is_the_one_kept() -> None:
    upstream = RecordingUpstream()
    app = create_app(make_settings(), upstream=upstream)
    async with _client(app) as client:
        response = await client.get(
            "/status/x", headers=[("X-Request-ID", "first-id"), ("X-Request-ID", "second-id")]
        )
    assert response.headers["x-request-id"] == "first-id"
    assert _upstream_header(upstream, "x-request-id") == ["first-id"]


LIMITED = make_settings(
    limits={"max_header_bytes": 2048},
    routes=[
        {
            "prefix": "/status/",
            "upstream": "http://127.0.0.1:9/",
            "auth": "none",
            "max_body_bytes": 10,
        }
    ],
)


@pytest.mark.parametrize(
    ("method", "found", "outcome"),
    [
        ("GET", {}, None),
        ("POST", {}, "body"),
        ("GET", {b"transfer-encoding": "chunked"}, "body"),
        ("POST", {b"content-length": "0"}, None),
        ("POST", {b"content-length": " "}, None),
        ("POST", {b"content-length": " 10 "}, "body"),
        ("POST", {b"content-length": "11"}, PayloadTooLarge),
        ("POST", {b"content-length": "9" * 5000}, PayloadTooLarge),  # no int() of 5,000 digits
        ("POST", {b"content-length": "\xb2"}, "body"),  # latin-1 "²": a digit to str.isdigit
        ("POST", {b"content-length": "x"}, "body"),  # the server's parser refuses these first
    ],
)
def test_request_body_limits_and_whether_there_is_a_body(
    method: str, found: dict[bytes, str], outcome: object
) -> None:
    app = create_app(LIMITED, upstream=RecordingUpstream())
    endpoint = app._proxy  # type: ignore[attr-defined]
    route = app.state.services.routes.match("/status/x")

    async def receive() -> dict[str, Any]:
        raise AssertionError("not read here")

    if isinstance(outcome, type):
        with pytest.raises(outcome):
            endpoint._request_body(100, found, method, route, receive)
        return
    body = endpoint._request_body(100, found, method, route, receive)
    assert (body is not None) == (outcome == "body")
    if body is not None:
        assert body.limit == 10
    with pytest.raises(HeadersTooLarge):
        endpoint._request_body(4096, found, method, route, receive)


class EmptyUpstream(RecordingUpstream):
    """Answers 204 with a body that ends before its first chunk."""

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        response = await super().send(*args, **kwargs)

        async def nothing() -> Any:
            return
            yield b""  # an async generator that yields nothing

        response.status, response.headers, response.body = 204, (), nothing()
        return response


async def test_an_answer_without_a_body_ends_with_one_empty_message() -> None:
    app = create_app(make_settings(), upstream=EmptyUpstream())
    sent = await _raw_request(app, "GET", "/status/x")
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 204
    assert sent[1]["body"] == b"" and not sent[1].get("more_body", False)


async def test_each_route_forwards_cookies_by_its_own_setting_whatever_came_before() -> None:
    settings = make_settings(
        routes=[
            {"prefix": "/status/", "upstream": "http://127.0.0.1:9/", "auth": "none"},
            {
                "prefix": "/open/",
                "upstream": "http://127.0.0.1:9/",
                "auth": "none",
                "forward_cookies": True,
            },
        ]
    )
    upstream = RecordingUpstream()
    app = create_app(settings, upstream=upstream)
    own = app.state.services.sessions.cookie_name
    cookie = {"Cookie": f"{own}=secret; theme=dark"}
    async with _client(app) as client:
        for path in ("/open/x", "/status/x", "/open/x", "/status/x"):
            assert (await client.get(path, headers=cookie)).status_code == 200
    sent_cookies = [[v for k, v in headers if k == "cookie"] for _url, headers in upstream.calls]
    assert sent_cookies == [["theme=dark"], [], ["theme=dark"], []]


class StalledUpstream(RecordingUpstream):
    """Says when a request reached it, then never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = asyncio.Event()

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        self.reached.set()
        await asyncio.Event().wait()  # the request is cancelled meanwhile
        raise AssertionError("unreachable")


async def test_a_request_cancelled_before_any_answer_is_counted_and_logged_as_499(
    access_log: pytest.LogCaptureFixture,
) -> None:
    upstream = StalledUpstream()
    app = create_app(make_settings(), upstream=upstream)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        raise AssertionError("nothing may be sent")

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/status/x",
        "headers": [],
        "query_string": b"",
    }
    request = asyncio.ensure_future(app(scope, receive, send))
    await asyncio.wait_for(upstream.reached.wait(), timeout=5)  # cancelled mid-request
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    [line] = [r for r in access_log.records if r.name == "gateway.access"]
    assert line.status == 499  # type: ignore[attr-defined]
    assert re.fullmatch(r"[0-9a-f]{32}", line.request_id)  # type: ignore[attr-defined]
    assert _metric(app, "gateway_requests_total", route="status", status="499") == 1


async def test_client_identity_headers_reach_an_upstream_only_where_its_route_names_them() -> None:
    """Review finding 7: upstreams behind a BFF tend to trust these; a client's copy never
    goes on, unless its route forwards that name."""
    settings = make_settings(
        routes=[
            {"prefix": "/status/", "upstream": "http://127.0.0.1:9/", "auth": "none"},
            {
                "prefix": "/legacy/",
                "upstream": "http://127.0.0.1:9/",
                "auth": "none",
                "forward_identity_headers": ["X-HTTP-Method-Override"],
            },
        ]
    )
    upstream = RecordingUpstream()
    app = create_app(settings, upstream=upstream)
    sent = {
        "X-Auth-Request-User": "admin",
        "X-Auth-Request-Email": "admin@example.com",
        "X-Forwarded-User": "admin",
        "Remote-User": "admin",
        "X-Original-URL": "/admin",
        "X-Rewrite-URL": "/admin",
        "True-Client-IP": "10.0.0.1",
        "X-Client-IP": "10.0.0.1",
        "X-Forwarded-Server": "internal",
        "X-Forwarded-Scheme": "https",
        "X-HTTP-Method-Override": "DELETE",
        "Expect": "100-continue",
    }
    async with _client(app) as client:
        for path in ("/status/x", "/legacy/x"):
            assert (await client.post(path, headers=sent, content=b"{}")).status_code == 200
    names = [
        {name.lower() for name, _ in headers} & {n.lower() for n in sent}
        for _url, headers in upstream.calls
    ]
    assert names == [set(), {"x-http-method-override"}]
