"""Hostile input against a real gateway in front of the real OpenID Provider (issue 4).

One test (or table) per item of "What must work": CSRF, cookies, hostile input, no secrets in
logs, security headers. Logout and back-channel logout are in test_logout.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.errors import LoginFailed
from gateway.oidc import OIDCClient

from .conftest import IdpFactory
from .gateway_harness import CSRF, GatewayUnderTest, run_gateway, start_upstreams
from .login import browser_login, idp_authorize
from .servers import API, CLIENT_ID, CLIENT_SECRET, IdpProcess, reserve_socket

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

LOGIN_COOKIE = "gw_session_login"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
}


@pytest.fixture
def gw(idp: IdpProcess) -> Iterator[GatewayUnderTest]:
    with start_upstreams(idp) as upstreams, run_gateway(idp, upstreams) as running:
        yield running


async def raw_http(base_url: str, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Send bytes exactly as written (no client-side normalisation); read until close."""
    parts = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode(), []).append(value.strip().decode())
    return int(lines[0].split()[1]), headers, body


def get(path: str, host: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close", *extra, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def host_of(gw: GatewayUnderTest) -> str:
    return gw.base_url.split("://", 1)[1]


def assert_json_4xx(status: int, body: bytes | str, error: str) -> None:
    assert 400 <= status < 500, (status, body)
    assert json.loads(body)["error"] == error


# -- 1. CSRF -----------------------------------------------------------------------------------

CSRF_REFUSED = {
    "no_header": {},
    "wrong_value": {"X-CSRF": "0"},
    "cross_origin": {**CSRF, "Origin": "https://evil.example"},
    "opaque_origin": {**CSRF, "Origin": "null"},
    "cross_site_fetch": {**CSRF, "Sec-Fetch-Site": "cross-site"},
    "same_site_fetch": {**CSRF, "Sec-Fetch-Site": "same-site"},
}


async def test_csrf_unsafe_proxied_request_without_signals_is_403(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        for case, headers in CSRF_REFUSED.items():
            response = await client.post("/api/orders", headers=headers, json={"n": 1})
            assert response.status_code == 403, case
            assert response.json()["error"] == "csrf_failed", case
        same_origin = {**CSRF, "Origin": gw.base_url, "Sec-Fetch-Site": "same-origin"}
        accepted = await client.post("/api/orders", headers=same_origin, json={"n": 1})
    assert accepted.status_code == 200
    assert [r["method"] for r in gw.upstreams["api"].requests] == ["POST"]  # only the accepted


async def test_csrf_logout_cross_site_is_403_and_keeps_the_session(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        forged_form = await client.post("/auth/logout", headers={"Origin": "https://evil.example"})
        forged_link = await client.get("/auth/logout", headers={"Sec-Fetch-Site": "cross-site"})
        forged_header = await client.post(
            "/auth/logout", headers={**CSRF, "Origin": "https://evil.example"}
        )
        me = await client.get("/auth/me")
    for response in (forged_form, forged_link, forged_header):
        assert_json_4xx(response.status_code, response.content, "csrf_failed")
    assert me.status_code == 200


async def test_csrf_is_configurable_per_route(idp: IdpProcess) -> None:
    with start_upstreams(idp) as upstreams:
        routes = [
            {"prefix": "/api/", "upstream": upstreams["api"].url, "audience": API,
             "scopes": ["read:orders"]},
            {"prefix": "/beacon/", "upstream": upstreams["api"].url, "audience": API,
             "scopes": ["read:orders"], "csrf": False},
            {"prefix": "/hooks/", "upstream": upstreams["public"].url, "auth": "none"},
        ]  # fmt: skip
        with run_gateway(idp, upstreams, routes=routes) as gw:
            async with gw.client() as client:
                await gw.login(client)
                protected = await client.post("/api/x", json={})
                beacon = await client.post("/beacon/x", json={})
                webhook = await client.post(
                    "/hooks/x", headers={"Origin": "https://psp.example"}, json={}
                )
    assert protected.status_code == 403
    assert beacon.status_code == 200 and beacon.json()["aud"] == API
    assert webhook.status_code == 200


# -- 2. Cookies --------------------------------------------------------------------------------


def _cookie(response: httpx.Response, name: str) -> str:
    return next(c for c in response.headers.get_list("set-cookie") if c.startswith(name + "="))


async def test_session_cookie_attributes_entropy_and_rotation_on_login(
    gw: GatewayUnderTest,
) -> None:
    async with gw.client() as client:
        first = _cookie(await gw.login(client), "gw_session")
        first_value = client.cookies["gw_session"]
        second = _cookie(await gw.login(client), "gw_session")
        second_value = client.cookies["gw_session"]
        client.cookies.clear()
        old = await client.get("/auth/me", headers={"Cookie": f"gw_session={first_value}"})
        new = await client.get("/auth/me", headers={"Cookie": f"gw_session={second_value}"})
    for cookie in (first, second):
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"path", "httponly", "samesite", "max-age"} <= attributes
        assert "domain" not in attributes and "Path=/;" in cookie and "SameSite=Lax" in cookie
    token = first_value.split(".")[0]
    assert re.fullmatch(r"[A-Za-z0-9_\-]{43,}", token)  # >= 256 bits from secrets
    assert first_value != second_value  # a new id on every login: no session fixation
    assert old.status_code == 401 and new.status_code == 200


async def test_https_cookies_are_host_prefixed_and_secure(idp: IdpProcess) -> None:
    sock = reserve_socket()
    public_url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    with (
        start_upstreams(idp) as upstreams,
        run_gateway(idp, upstreams, sock=sock, public_url=public_url) as gw,
    ):
        async with gw.client() as client:
            login = await client.get("/auth/login")
            _, cookie = await gw.gateway.sessions.create(
                sub="alice", sid=None, refresh_token="rt", id_token=None, claims={"sub": "alice"}
            )
            value = cookie.split(";")[0].split("=", 1)[1]
            tossed = await client.get("/auth/me", headers={"Cookie": f"gw_session={value}"})
            proper = await client.get("/auth/me", headers={"Cookie": f"__Host-gw_session={value}"})
    login_cookie = _cookie(login, "__Host-gw_session_login")
    for c in (login_cookie, cookie):
        assert "; Secure" in c and "; HttpOnly" in c and "; Path=/" in c and "Domain" not in c
    assert cookie.startswith("__Host-gw_session=")
    assert parse_qs(urlsplit(login.headers["location"]).query)["redirect_uri"] == [
        public_url + "/auth/callback"
    ]
    # A cookie without the prefix (settable by a sibling subdomain) is not the session cookie.
    assert tossed.status_code == 401 and proper.status_code == 200


async def test_garbage_cookies_are_refused_before_any_store_lookup(gw: GatewayUnderTest) -> None:
    store = gw.gateway.store
    manager = gw.gateway.sessions
    loads: list[str] = []
    original = store.load
    original_now = manager._load_now  # the memory store is read without a coroutine

    async def counting_load(session_id: str) -> Any:
        loads.append(session_id)
        return await original(session_id)

    def counting_load_now(session_id: str) -> Any:
        loads.append(session_id)
        return original_now(session_id) if original_now else None

    store.load = counting_load
    if original_now is not None:
        manager._load_now = counting_load_now
    try:
        async with gw.client() as client:
            await gw.login(client)
            value = client.cookies["gw_session"]
            token, signature = value.split(".")
            client.cookies.clear()
            other_last = "B" if token.endswith("A") else "A"  # a real change, never a no-op
            forged = [
                "garbage", token, f"{token}.", f"{token}.{signature[::-1]}",
                f"{token[:-1]}{other_last}.{signature}", "x" * 300, f"{'A' * 43}.{signature}",
            ]  # fmt: skip
            for cookie in forged:
                response = await client.get("/auth/me", headers={"Cookie": f"gw_session={cookie}"})
                assert response.status_code == 401, cookie
            assert loads == []
            ok = await client.get("/auth/me", headers={"Cookie": f"gw_session={value}"})
    finally:
        del store.load
        manager._load_now = original_now
    assert ok.status_code == 200 and len(loads) == 1


# -- 4. Hostile input --------------------------------------------------------------------------

OPEN_REDIRECTS = [
    "//evil.example", "https://evil.example", "/\\evil.example", "\\\\evil.example",
    "%2F%2Fevil.example", "/%2F/evil.example", "/%5Cevil.example", "%252F%252Fevil.example",
    "http:/evil.example", "javascript:alert(1)", " //evil.example", "\t//evil.example",
    "/\t/evil.example", "/ok\r\nSet-Cookie: injected=1", "/ok%0d%0aSet-Cookie:%20injected=1",
]  # fmt: skip


async def test_open_redirect_forms_end_at_home_after_login(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        for target in OPEN_REDIRECTS:
            url = f"{gw.base_url}/auth/login?return_to={quote(target, safe='')}"
            response = await browser_login(client, url, idp_issuer=gw.idp.issuer)
            assert response.status_code == 302, target
            assert response.headers["location"] == "/", target
            assert [c.split("=")[0] for c in response.headers.get_list("set-cookie")] == [
                "gw_session",
                LOGIN_COOKIE,
            ], target


TRAVERSALS = [
    "/public/..%2f..%2fapi/x", "/public/%2e%2e/%2e%2e/etc/passwd", "/public/../../etc/passwd",
    "/api/%2fadmin", "/public/%5c..%5capi", "/public/..\\..\\api", "/public/..;/api/x",
    "/public/%2e%2e%3b/api/x", "/public/%c0%af..%c0%afapi", "/public/%ff", "/public/x%00y",
    "/public/%0d%0aX-Injected:%201",
]  # fmt: skip


async def test_traversal_and_encoded_slashes_are_400_and_never_forwarded(
    gw: GatewayUnderTest,
) -> None:
    for path in TRAVERSALS:
        status, _, body = await raw_http(gw.base_url, get(path, host_of(gw)))
        assert_json_4xx(status, body, "invalid_path")
    # Dot segments inside the route resolve and stay inside it.
    status, _, body = await raw_http(gw.base_url, get("/public/a/%2e%2e/b", host_of(gw)))
    assert status == 200 and json.loads(body)["path"] == "/b"
    assert [r["path"] for r in gw.upstreams["public"].requests] == ["/b"]


async def test_oversized_headers_are_431(idp: IdpProcess) -> None:
    with (
        start_upstreams(idp) as upstreams,
        run_gateway(idp, upstreams, limits={"max_header_bytes": 8192}) as gw,
    ):
        big = [f"X-Filler-{i}: {'a' * 3000}" for i in range(3)]
        status, _, body = await raw_http(gw.base_url, get("/public/x", host_of(gw), *big))
        small_status, _, _ = await raw_http(gw.base_url, get("/public/x", host_of(gw), big[0]))
        assert_json_4xx(status, body, "headers_too_large")
        assert status == 431 and small_status == 200
        assert len(upstreams["public"].requests) == 1


async def test_bodies_over_the_limit_are_413_sized_or_chunked(idp: IdpProcess) -> None:
    limit = 4096
    with (
        start_upstreams(idp) as upstreams,
        run_gateway(idp, upstreams, limits={"max_body_bytes": limit}) as gw,
    ):

        async def chunked(size: int) -> Any:
            for _ in range(size // 1024):
                yield b"x" * 1024

        async with gw.client() as client:
            sized = await client.post("/public/upload", content=b"x" * (limit + 1))
            streamed = await client.post("/public/upload", content=chunked(64 * 1024))
            fits = await client.post("/public/upload", content=chunked(limit))
            await gw.login(client)
            api = await client.post("/api/upload", headers=CSRF, content=b"x" * (limit + 1))
        for response in (sized, streamed, api):
            assert_json_4xx(response.status_code, response.content, "payload_too_large")
            assert response.status_code == 413
        assert fits.status_code == 200 and fits.json()["body_len"] == limit
        assert all(r["body_len"] <= limit for r in upstreams["public"].requests)
        assert upstreams["api"].requests == []


async def test_crlf_never_reaches_location_or_set_cookie(gw: GatewayUnderTest) -> None:
    host = host_of(gw)
    probes = [
        get("/auth/login?return_to=/x%0d%0aSet-Cookie:%20injected=1", host),
        get("/api/page?q=%0d%0aSet-Cookie:%20injected=1", host, "Accept: text/html"),
        get("/api/page%0d%0aSet-Cookie:%20injected=1", host, "Accept: text/html"),
        get("/auth/logout", host, "Sec-Fetch-Site: same-origin", "X-Return: /%0d%0aLocation: x"),
    ]
    for probe in probes:
        status, headers, _ = await raw_http(gw.base_url, probe)
        assert status < 500
        assert not any("injected" in c for c in headers.get("set-cookie", [])), headers
        for location in headers.get("location", []):
            assert "\r" not in location and "\n" not in location and "injected=1" not in location
    # A raw line break inside a header value is refused by the HTTP layer itself.
    folded = get("/public/x", host, "X-Test: a", " Set-Cookie: injected=1")
    bare_cr = get("/public/x", host, "X-Test: a\rSet-Cookie: injected=1")
    for probe in (folded, bare_cr):
        status, headers, _ = await raw_http(gw.base_url, probe)
        assert status == 400 and "set-cookie" not in headers


async def test_spoofed_host_never_changes_urls_the_gateway_builds(gw: GatewayUnderTest) -> None:
    spoof = ["X-Forwarded-Host: evil.example", "X-Forwarded-Proto: https", "Forwarded: host=evil"]
    _, login, _ = await raw_http(gw.base_url, get("/auth/login", "evil.example", *spoof))
    _, navigation, _ = await raw_http(
        gw.base_url, get("/api/page", "evil.example", "Accept: text/html", *spoof)
    )
    status, _, body = await raw_http(gw.base_url, get("/api/x", "evil.example", *spoof))
    authorize = parse_qs(urlsplit(login["location"][0]).query)
    assert authorize["redirect_uri"] == [gw.base_url + "/auth/callback"]
    assert navigation["location"][0].startswith(gw.base_url + "/auth/login?")
    assert status == 401 and json.loads(body)["login_url"] == gw.base_url + "/auth/login"
    async with gw.client() as client:
        await gw.login(client)
        logout = await client.post(
            "/auth/logout",
            headers={**CSRF, "Host": "evil.example", "X-Forwarded-Host": "evil.example"},
        )
    post_logout = parse_qs(urlsplit(logout.json()["logout_url"]).query)["post_logout_redirect_uri"]
    assert post_logout == [gw.base_url + "/"]


async def _authorize(client: httpx.AsyncClient) -> tuple[str, str]:
    """Start a login at the gateway, run it at the IdP; return (state, callback URL)."""
    start = await client.get("/auth/login")
    callback = await idp_authorize(client, start.headers["location"])
    return client.cookies[LOGIN_COOKIE], callback


def _with(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | params
    encoded = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{encoded}"


async def test_replayed_or_mixed_up_state_and_code_are_400(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        _, first = await _authorize(client)
        state_2, second = await _authorize(client)  # the browser now holds state_2
        code_1 = parse_qs(urlsplit(first).query)["code"][0]
        mixed = await client.get(_with(second, code=code_1))  # state_2 with login 1's code
        stale = await client.get(first)  # login 1's state: not this browser's login anymore
        _, third = await _authorize(client)
        forged_code = await client.get(_with(third, code="forged-code"))
        state_4, fourth = await _authorize(client)
        done = await client.get(fourth)
        client.cookies.set(LOGIN_COOKIE, state_4)
        replayed = await client.get(fourth)  # same state, same code, once more
        idp_error = await client.get("/auth/callback?error=access_denied&state=x")
        missing = await client.get("/auth/callback")
    assert done.status_code == 302
    for response in (mixed, stale, forged_code, replayed, idp_error, missing):
        assert_json_4xx(response.status_code, response.content, "login_failed")
        assert response.status_code == 400
        assert code_1 not in response.text and state_2 not in response.text


async def test_forged_id_tokens_are_refused(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        await gw.login(client)
        cookie = f"gw_session={client.cookies['gw_session']}"
    session = await gw.gateway.store.load(gw.gateway.sessions.session_id_from_cookie(cookie))
    real = session.id_token
    claims = jwt.decode(real, options={"verify_signature": False})
    header, payload, signature = real.split(".")
    kid = jwt.get_unverified_header(real)["kid"]
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = {
        "alg_none": jwt.encode(claims, None, algorithm="none"),  # type: ignore[arg-type]
        "hs256_client_secret": _hs256(claims, CLIENT_SECRET, {}),
        "hs256_with_idp_kid": _hs256(claims, CLIENT_SECRET, {"kid": kid}),
        "tampered_payload": f"{header}.{payload[:-4]}AAAA.{signature}",
        "resigned_other_key": jwt.encode(
            claims, other_key, algorithm="RS256", headers={"kid": kid}
        ),
    }
    # The gateway's own OIDC client, against the real IdP's discovery document and JWKS.
    async with httpx.AsyncClient(timeout=10) as http:
        oidc = OIDCClient(gw.settings, http)
        for case, token in forged.items():
            with pytest.raises(LoginFailed) as raised:
                await oidc.validate_id_token(token, nonce=None)
            assert raised.value.status_code == 400, case
            assert token not in raised.value.message
        assert (await oidc.validate_id_token(real, nonce=None))["aud"] == CLIENT_ID


def _hs256(claims: dict[str, Any], secret: str, headers: dict[str, str]) -> str:
    with warnings.catch_warnings():  # the test IdP's client secret is short: that is the point
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm="HS256", headers=headers)


FORWARDING_HEADERS = {"x-forwarded-port", "x-forwarded-prefix", "x-real-ip", "forwarded"}


async def test_client_authorization_and_forwarded_headers_never_reach_upstream(
    gw: GatewayUnderTest,
) -> None:
    spoofed = {
        "Authorization": "Bearer client-supplied",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "gopher",
        "X-Forwarded-Port": "1",
        "X-Forwarded-Prefix": "/evil",
        "X-Real-IP": "6.6.6.6",
        "Forwarded": "for=6.6.6.6;host=evil.example",
    }
    async with gw.client() as client:
        public = await client.get("/public/x", headers=spoofed)
        await gw.login(client)
        api = await client.get("/api/x", headers={**CSRF, **spoofed})
    assert public.status_code == api.status_code == 200
    seen = gw.upstreams["public"].requests[0]["headers"], gw.upstreams["api"].requests[0]["headers"]
    for headers in seen:
        assert "client-supplied" not in headers.get("authorization", "")
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-forwarded-host"] == host_of(gw)
        assert headers["x-forwarded-proto"] == "http"
        assert not FORWARDING_HEADERS & set(headers)
    assert "authorization" not in seen[0]
    assert seen[1]["authorization"].startswith("Bearer ey")


# -- 5. No secrets in logs ---------------------------------------------------------------------


@contextlib.contextmanager
def capture_every_logger(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Every record of every logger at DEBUG, uvicorn's (which do not propagate) included.

    Except ``uvicorn.access``: uvicorn writes access lines only when that logger has a handler,
    and the gateway runs it with none (``gateway run``: ``access_log=False``), because a server
    access log prints the callback's query string (code, state). Attaching one here would test
    a configuration the gateway never runs with; SECURITY.md says to keep it off.
    """
    caplog.set_level(logging.DEBUG)
    names = {"uvicorn", "uvicorn.error", *logging.root.manager.loggerDict} - {"uvicorn.access"}
    assert not logging.getLogger("uvicorn.access").hasHandlers()
    saved = []
    for name in sorted(names):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.disabled))
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
        if not logger.propagate:
            logger.addHandler(caplog.handler)
    try:
        yield caplog.records
    finally:
        for logger, level, disabled in saved:
            logger.setLevel(level)
            logger.disabled = disabled
            if caplog.handler in logger.handlers:
                logger.removeHandler(caplog.handler)


def _log_text(records: list[logging.LogRecord]) -> str:
    """Everything the records hold, except those of the test's own thread (its HTTP client
    logs the URLs it fetches, codes included; the gateway and upstreams run in other threads)."""
    formatter = logging.Formatter()
    lines = []
    for record in records:
        if record.thread == threading.get_ident():
            continue
        lines.append(record.getMessage())
        lines.append(repr({k: v for k, v in record.__dict__.items() if k != "msg"}))
        if record.exc_info:
            lines.append(formatter.formatException(record.exc_info))
    return "\n".join(lines)


async def test_no_secret_in_any_log_line_of_a_full_session(
    idp_factory: IdpFactory, caplog: pytest.LogCaptureFixture
) -> None:
    idp = idp_factory(at_ttl=3, rotate=True)
    secrets: dict[str, str] = {"client secret": CLIENT_SECRET}
    with (
        start_upstreams(idp) as upstreams,
        run_gateway(idp, upstreams, tokens={"skew": 1}, log={"level": "debug"}) as gw,
        capture_every_logger(caplog) as records,
    ):
        store, sessions = gw.gateway.store, gw.gateway.sessions
        secrets["session secret key"] = gw.settings.session.secret_key[0].get_secret_value()
        bodies: list[str] = []
        async with gw.client() as client:
            start = await client.get("/auth/login?return_to=/app")
            state = client.cookies[LOGIN_COOKIE]
            pending = await store.pop_login(state)  # peek at the PKCE verifier, put it back
            assert pending is not None
            await store.put_login(state, pending, ttl=600)
            secrets |= {"state": state, "pkce verifier": pending["verifier"]}
            secrets["nonce"] = pending["nonce"]
            callback = await browser_login(client, start.headers["location"], idp_issuer=idp.issuer)
            assert callback.status_code == 302
            secrets["authorization code"] = parse_qs(callback.request.url.query.decode())["code"][0]
            cookie = client.cookies["gw_session"]
            secrets |= {"session cookie": cookie, "session cookie token": cookie.split(".")[0]}
            session_id = sessions.session_id_from_cookie(f"gw_session={cookie}")
            session = await store.load(session_id)
            secrets |= {"refresh token": session.refresh_token, "id token": session.id_token}
            for path in ("/api/a", "/billing/b"):  # the echo upstreams answer with the token
                assert (await client.get(path, headers=CSRF)).status_code == 200
            await asyncio.sleep(2.3)  # past exp - skew: both audiences refresh, the RT rotates
            for path in ("/api/c", "/billing/d"):
                assert (await client.get(path, headers=CSRF)).status_code == 200
            session = await store.load(session_id)
            secrets["rotated refresh token"] = session.refresh_token
            bodies.append((await client.get("/auth/me")).text)
            logout = await client.post("/auth/logout", headers=CSRF)
            # RP-Initiated Logout: the ID token rides to the IdP as id_token_hint, and only there.
            logout_url = logout.json().pop("logout_url")
            assert parse_qs(urlsplit(logout_url).query)["id_token_hint"] == [session.id_token]
            bodies.append(logout.text.replace(logout_url, ""))
            bodies.append((await client.get(str(callback.request.url))).text)  # replayed code
            bodies.append((await client.get("/api/e", headers=CSRF)).text)
    for upstream in upstreams.values():
        for n, seen in enumerate(upstream.requests):
            if "authorization" in seen["headers"]:
                secrets[f"access token {upstream.name} {n}"] = seen["headers"]["authorization"][7:]
    assert secrets["refresh token"] != secrets["rotated refresh token"]
    assert idp.stats()["grants"]["refresh_token"] >= 4
    assert sum(key.startswith("access token") for key in secrets) == 4
    text = _log_text(records)
    assert "login complete" in text  # the capture did see the gateway's own lines
    leaked = [name for name, value in secrets.items() if value and value in text]
    assert leaked == [], leaked
    shown = [name for name, value in secrets.items() if any(value in body for body in bodies)]
    assert shown == [], shown


# -- 6. Security headers -----------------------------------------------------------------------


async def test_security_headers_on_gateway_answers_only(gw: GatewayUnderTest) -> None:
    async with gw.client() as client:
        owned = {
            "me_401": await client.get("/auth/me"),
            "login_302": await client.get("/auth/login"),
            "callback_400": await client.get("/auth/callback?state=x&code=y"),
            "healthz": await client.get("/healthz"),
            "readyz": await client.get("/readyz"),
        }
        rendered = {
            "proxy_401": await client.get("/api/x"),
            "proxy_404": await client.get("/nowhere"),
            "proxy_400": await client.get("/public/%2e%2e/%2e%2e/x"),
            "proxy_502": await client.get("/down/x"),
            "login_redirect": await client.get("/api/page", headers={"Accept": "text/html"}),
        }
        relayed = await client.get("/public/x")
        relayed_error = await client.get("/public/status/404")
    for case, response in {**owned, **rendered}.items():
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (case, name, response.headers)
        assert response.headers["cache-control"] == "no-store", case
    assert relayed.status_code == 200 and relayed_error.status_code == 404
    for response in (relayed, relayed_error):
        assert not set(SECURITY_HEADERS) & set(response.headers), response.headers
        assert "cache-control" not in response.headers
