"""Property-based tests (hypothesis) of the browser-facing defences: no generated input makes
``return_to`` point at another origin, escapes a route's upstream path, breaks cookie parsing,
or makes the ASGI app answer 500 or emit an injected header."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pytest
import respx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.types import Message

from gateway import create_app
from gateway.crypto import SessionCipher
from gateway.errors import InvalidPath
from gateway.routing import Route, RouteTable, normalize_path
from gateway.security import read_cookie, validate_return_to
from gateway.sessions import MemorySessionStore
from gateway.sessions.manager import SessionManager
from gateway.settings import RouteSettings

from .conftest import DISCOVERY, ISSUER, jwks, make_settings
from .fakes import RecordingUpstream
from .test_backchannel import SECRET_KEY

pytestmark = pytest.mark.anyio

ORIGIN = "https://app.example.com"
EXAMPLES = settings(max_examples=400, deadline=None)

# -- return_to ---------------------------------------------------------------------------------

REDIRECT_PIECES = [
    "/", "//", "\\", "/\\", "%2f", "%2F", "%5c", "%5C", "%25", "%252f", "%0d", "%0a", "%09",
    "%00", "\t", "\r", "\n", " ", "\x00", "\x7f", "https:", "http:", "javascript:", "data:",
    "evil.example", "@", ":", ".", "..", "?", "#", "&", "=", "a", "app", "\u3002", "\uff0f",
    "\u2044", "\u00e9",
]  # fmt: skip
return_to_values = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(REDIRECT_PIECES), max_size=8).map("".join),
    st.lists(st.sampled_from(REDIRECT_PIECES), max_size=8).map(lambda p: "/" + "".join(p)),
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def browser_origin(target: str, base: str = ORIGIN + "/app/page") -> str:
    """Where a browser sends ``Location: target`` (WHATWG URL parsing, conservatively): it
    strips C0 controls and spaces at both ends, drops tabs and newlines anywhere, and reads a
    backslash as a slash on http(s) URLs. Any ``scheme:`` counts as another origin."""
    cleaned = target.strip("".join(chr(c) for c in range(0x21)))
    cleaned = re.sub(r"[\t\n\r]", "", cleaned).replace("\\", "/")
    if _SCHEME.match(cleaned):
        return "scheme:" + cleaned.split(":", 1)[0].lower()
    if cleaned.startswith("//"):
        return "network-path:" + cleaned
    parts = urlsplit(urljoin(base, cleaned))
    return f"{parts.scheme}://{parts.netloc}"


@EXAMPLES
@given(return_to_values)
def test_validate_return_to_never_yields_another_origin(value: str) -> None:
    result = validate_return_to(value)
    assert result in ("/", value)
    # Neither as sent nor once decoded (by a server or a SPA router) does it leave the origin.
    for candidate in (result, unquote(result)):
        assert browser_origin(candidate) == ORIGIN, candidate
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in result)  # no header injection
    assert validate_return_to(result) == result


@settings(max_examples=150, deadline=None)
@given(st.from_regex(r"\A/([a-z0-9_\-]+/?){0,5}(\?[a-z0-9=&]{0,20})?\Z"))
def test_validate_return_to_keeps_plain_local_paths(value: str) -> None:
    assert validate_return_to(value) == value


# -- path normalisation and route matching -----------------------------------------------------

ROUTES = RouteTable(
    [
        RouteSettings(prefix="/api/", upstream="http://orders.internal/base/", audience="a"),
        RouteSettings(prefix="/api/v2/", upstream="http://v2.internal/", audience="b"),
        RouteSettings(prefix="/status/", upstream="http://status.internal/s", auth="none"),
        RouteSettings(
            prefix="/keep/", upstream="http://keep.internal/root/", auth="none", strip_prefix=False
        ),
    ]
)
PATH_PIECES = [
    "api", "v2", "status", "keep", "base", "root", "x", "..", ".", "%2e%2e", "%2E%2e", ".%2e",
    "%2e", "%2f", "%2F", "%5c", "%5C", "\\", "%00", "%0a", "%ff", "%c0%af", "%e0%80%af", "%",
    "%25", "%252e%252e", ";", "..;", ".;x", "%3b", "%2e%2e%3b", "#", "\xe9", "~", "",
]  # fmt: skip
raw_paths = st.lists(st.sampled_from(PATH_PIECES), max_size=10).map(lambda p: "/" + "/".join(p))


def upstream_view(path: str) -> str:
    """How a lenient upstream resolves a path: percent-decoded once, backslash as slash,
    ``;params`` dropped from each segment (Tomcat), then dot segments removed."""
    out: list[str] = []
    for segment in unquote(path, errors="replace").replace("\\", "/").split("/")[1:]:
        name = segment.split(";", 1)[0]
        if name == "..":
            if out:
                out.pop()
        elif name != ".":
            out.append(segment)
    return "/" + "/".join(out)


def route_base(route: Route) -> str:
    if route.settings.strip_prefix:
        return route.upstream_path
    return route.upstream_path.rstrip("/") + route.prefix


def assert_within_route(route: Route, url: str) -> None:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == route.upstream_origin
    resolved = upstream_view(parts.path)
    base = route_base(route)
    assert resolved.startswith(base) or resolved + "/" == base, (url, resolved, base)


@EXAMPLES
@given(raw_paths)
def test_normalized_path_never_leaves_its_route_upstream_prefix(raw_path: str) -> None:
    try:
        path = normalize_path(raw_path)
    except InvalidPath:
        return
    assert path.startswith("/")
    route = ROUTES.match(path)
    if route is not None:
        assert_within_route(route, route.upstream_url(path, "q=1"))


@EXAMPLES
@given(st.text(max_size=60))
def test_normalize_path_raises_only_invalid_path(raw_path: str) -> None:
    try:
        path = normalize_path(raw_path)
    except InvalidPath:
        return
    route = ROUTES.match(path)
    if route is not None:
        route.upstream_url(path, "")


# -- cookie parsing ----------------------------------------------------------------------------

CIPHER = SessionCipher([SECRET_KEY])
MANAGER = SessionManager(
    make_settings(session={"secret_key": [SECRET_KEY]}), MemorySessionStore(idle_timeout=60), CIPHER
)
cookie_headers = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.tuples(
            st.sampled_from(["gw_session", "__Host-gw_session", "other", "", " gw_session"]),
            st.sampled_from(["=", "", "=="]),
            st.text(max_size=80),
        ).map("".join),
        max_size=5,
    ).map("; ".join),
)


@EXAMPLES
@given(cookie_headers)
def test_cookie_parsing_never_raises(header: str) -> None:
    value = read_cookie(header, MANAGER.cookie_name)
    assert value is None or isinstance(value, str)
    session_id = MANAGER.session_id_from_cookie(header)
    assert session_id is None or re.fullmatch(r"[0-9a-f]{64}", session_id)


@EXAMPLES
@given(cookie_headers)
def test_cookie_parsing_finds_a_valid_cookie_after_junk(junk: str) -> None:
    token = "A" * 43
    value = f"{token}.{CIPHER.sign(token.encode())}"
    junk = junk.replace("gw_session", "other")  # another copy of our cookie would come first
    header = (junk + "; " if junk else "") + f"{MANAGER.cookie_name}={value}"
    assert MANAGER.session_id_from_cookie(header) is not None


# -- the whole ASGI app ------------------------------------------------------------------------


@dataclass
@dataclass
class App:
    app: Starlette
    upstream: RecordingUpstream


@pytest.fixture
async def gateway_app() -> AsyncIterator[App]:
    upstream = RecordingUpstream()
    app = create_app(make_settings(session={"secret_key": [SECRET_KEY]}), upstream=upstream)
    with respx.mock(assert_all_called=False) as router:
        router.get(ISSUER + ".well-known/openid-configuration").respond(json=DISCOVERY)
        router.get(ISSUER + ".well-known/jwks.json").respond(json=jwks())
        router.post(DISCOVERY["token_endpoint"]).respond(400, json={"error": "invalid_grant"})
        async with app.router.lifespan_context(app):
            yield App(app, upstream)


GATEWAY_PATHS = [
    "/auth/login", "/auth/callback", "/auth/logout", "/auth/me", "/auth/backchannel-logout",
    "/healthz", "/readyz", "/metrics", "/auth/", "/api/", "/billing/", "/status/", "/", "",
]  # fmt: skip
QUERY_PIECES = [
    "return_to=", "state=", "code=", "error=", "access_denied", "logout_token=", "&", "=",
    "//evil.example", "%2f%2fevil", "%0d%0aSet-Cookie:%20x=1", "\r\n", "/\\evil", "x", "%",
    "https://evil.example",
]  # fmt: skip
HEADER_NAMES = [
    b"cookie", b"host", b"origin", b"sec-fetch-site", b"x-csrf", b"authorization", b"accept",
    b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-for", b"forwarded",
    b"content-type", b"content-length", b"transfer-encoding", b"connection", b"x-request-id",
]  # fmt: skip
HEADER_VALUES = [
    b"1", b"text/html", b"https://evil.example", b"null", b"same-origin", b"cross-site",
    b"gw_session=garbage", b"gw_session=" + b"A" * 43 + b".sig", b"Bearer client-token",
    b"evil.example", b"application/x-www-form-urlencoded", b"\r\nSet-Cookie: x=1", b"-1",
    b"99999999999999999999", b"chunked", b"close, cookie", b"\xff\xfe", b"",
]  # fmt: skip
requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "FOO"]),
        "path": st.tuples(st.sampled_from(GATEWAY_PATHS), raw_paths).map(
            lambda p: (p[0] + p[1].lstrip("/")) if p[0].endswith("/") or not p[0] else p[0]
        ),
        "query": st.lists(st.sampled_from(QUERY_PIECES), max_size=6).map("".join),
        "headers": st.lists(
            st.tuples(
                st.sampled_from(HEADER_NAMES),
                st.one_of(st.sampled_from(HEADER_VALUES), st.binary(max_size=40)),
            ),
            max_size=6,
        ),
        "body": st.binary(max_size=200),
    }
)


async def call(app: Starlette, request: dict[str, Any]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Send one raw request straight into the ASGI app, as a server would pass it on."""
    raw_path = (request["path"] or "/").encode("latin-1")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "https",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "root_path": "",
        "query_string": request["query"].encode("latin-1"),
        "headers": request["headers"],
        "client": ("203.0.113.9", 50000),
        "server": ("app.example.com", 443),
    }
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": request["body"], "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], list(start.get("headers", []))


def assert_safe_location(location: str) -> None:
    if location.startswith(ISSUER):
        return  # the IdP's authorize or logout endpoint, built from discovery
    if location.startswith(ORIGIN + "/"):
        return
    assert browser_origin(location) == ORIGIN, location


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests)
async def test_app_never_answers_500_nor_emits_injected_headers(
    gateway_app: App, request: dict[str, Any]
) -> None:
    gateway_app.upstream.calls.clear()
    status, headers = await call(gateway_app.app, request)
    event(f"status {status}")
    assert 200 <= status < 500, (status, request)
    if status >= 400:  # every refusal is the gateway's JSON, with its security headers
        assert (b"content-type", b"application/json") in headers, (status, headers)
        assert (b"x-content-type-options", b"nosniff") in headers
    for name, value in headers:
        assert not re.search(rb"[\r\n\x00]", name + value), (name, value)
        if name == b"location":
            assert_safe_location(value.decode("latin-1"))
        if name == b"set-cookie":
            assert value.split(b"=", 1)[0] in (b"__Host-gw_session", b"__Host-gw_session_login")
    for url, sent_headers in gateway_app.upstream.calls:
        # Only /status/ (auth none) is reachable without a session: no bearer, no client one.
        assert url.startswith("http://127.0.0.1:9/")
        names = [n for n, _ in sent_headers]
        assert "authorization" not in names
        assert dict(sent_headers)["x-forwarded-host"] == "app.example.com"
        assert "forwarded" not in names and names.count("x-forwarded-for") == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(PATH_PIECES), max_size=8).map(lambda p: "/status/" + "/".join(p)))
async def test_app_relays_only_paths_inside_the_route(raw_path: str) -> None:
    upstream = RecordingUpstream()
    settings_ = make_settings(
        session={"secret_key": [SECRET_KEY]},
        routes=[{"prefix": "/status/", "upstream": "http://127.0.0.1:9/s/", "auth": "none"}],
    )
    app = create_app(settings_, upstream=upstream)
    with respx.mock(assert_all_called=False) as router:
        router.get(ISSUER + ".well-known/openid-configuration").respond(json=DISCOVERY)
        router.get(ISSUER + ".well-known/jwks.json").respond(json=jwks())
        status, _ = await call(
            app, {"method": "GET", "path": raw_path, "query": "", "headers": [], "body": b""}
        )
    assert status in (200, 400, 404)
    route = next(iter(app.state.services.routes))
    for url, _ in upstream.calls:
        assert_within_route(route, url)
    assert (status == 200) == bool(upstream.calls)
