"""Forward-auth against the ASGI app: the Traefik, Envoy and nginx header conventions, the caller
checks, and the same session / CSRF / token policy as the built-in proxy (IdP mocked by respx)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import respx
import yaml
from pydantic import ValidationError
from starlette.applications import Starlette

from gateway import create_app
from gateway.forward_auth import read_original_request
from gateway.settings import Settings

from .conftest import API, BILLING, DISCOVERY, access_token, make_settings

pytestmark = pytest.mark.anyio

TOKEN_URL = str(DISCOVERY["token_endpoint"])
SECRET = "forward-auth-secret-forward-auth-secret-0123"
ORIGIN = "https://app.example.com"
SCOPES = {API: "read:orders", BILLING: "read:invoices"}
DATA_PLANE = ("10.1.2.3", 40000)

# The headers each data plane sends for a browser's `GET /api/orders?x=1` (plus the cookie).
TRAEFIK = {
    "X-Forwarded-Method": "GET",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "app.example.com",
    "X-Forwarded-Uri": "/api/orders?x=1",
    "X-Forwarded-For": "203.0.113.9",
}
NGINX = {"X-Original-URI": "/api/orders?x=1", "X-Forwarded-Method": "GET"}
INGRESS_NGINX = {
    "X-Original-URL": "https://app.example.com/api/orders?x=1",
    "X-Original-Method": "GET",
}


def _token_answer(request: httpx.Request) -> httpx.Response:
    audience = parse_qs(request.content.decode())["audience"][0]
    scope = SCOPES[audience]
    return httpx.Response(
        200,
        json={
            "access_token": access_token(audience, scope=scope),
            "expires_in": 600,
            "scope": scope,
        },
    )


async def _slow_token_answer(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(0.05)  # long enough for every concurrent caller to pile up
    return _token_answer(request)


def _forward_settings(**forward_auth: Any) -> Settings:
    return make_settings(
        forward_auth={"enabled": True, "secret": SECRET, **forward_auth},
        csrf={"allowed_origins": [ORIGIN]},
    )


@dataclass
class Running:
    app: Starlette
    cookie: str
    token_route: respx.Route

    def client(self, address: tuple[str, int] = DATA_PLANE) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=address)
        return httpx.AsyncClient(transport=transport, base_url="http://gateway.internal:8000")

    @property
    def exchanges(self) -> int:
        return self.token_route.call_count

    async def forward(
        self,
        headers: dict[str, str],
        *,
        path: str = "/auth/forward",
        method: str = "GET",
        secret: str | None = SECRET,
        session: bool = True,
        csrf: bool = True,
    ) -> httpx.Response:
        sent = dict(headers)
        if secret is not None:
            sent["X-Forward-Auth-Secret"] = secret
        if session:
            sent["Cookie"] = self.cookie
        if csrf:
            sent["X-CSRF"] = "1"
        async with self.client() as client:
            return await client.request(method, path, headers=sent)


async def _start(settings: Settings, idp: respx.MockRouter) -> AsyncIterator[Running]:
    token_route = idp.post(TOKEN_URL).mock(side_effect=_slow_token_answer)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        gateway = app.state.services
        _session, set_cookie = await gateway.sessions.create(
            sub="auth0|alice",
            sid="sid-1",
            refresh_token="rt-0",
            id_token=None,
            claims={"sub": "auth0|alice", "email": "alice@example.com"},
        )
        yield Running(app=app, cookie=set_cookie.split(";")[0], token_route=token_route)


@pytest.fixture
async def gw(idp: respx.MockRouter) -> AsyncIterator[Running]:
    async for running in _start(_forward_settings(), idp):
        yield running


def _audience(response: httpx.Response) -> str:
    scheme, _, token = response.headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    claims = jwt.decode(token, options={"verify_signature": False})
    return str(claims["aud"])


# -- the header conventions -------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [TRAEFIK, NGINX, INGRESS_NGINX], ids=["traefik", "nginx", "ingress-nginx"]
)
async def test_forward_auth_data_plane_headers_answer_route_token(
    gw: Running, headers: dict[str, str]
) -> None:
    response = await gw.forward(headers)
    assert response.status_code == 200, response.text
    assert _audience(response) == API
    assert response.content == b""
    assert response.headers["cache-control"] == "no-store"
    assert "x-auth-request-user" not in response.headers  # user_headers is off by default


async def test_forward_auth_traefik_original_method_drives_csrf_origin_check(gw: Running) -> None:
    post = {**TRAEFIK, "X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/billing/invoices"}
    same_site = await gw.forward({**post, "Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"})
    cross_site = await gw.forward({**post, "Origin": "https://evil.example"})
    # The check request itself is a GET: only X-Forwarded-Method says it guards a POST.
    assert same_site.status_code == 200 and _audience(same_site) == BILLING
    assert cross_site.status_code == 403
    assert cross_site.json()["error"] == "csrf_failed"
    assert cross_site.headers["x-auth-error"] == "csrf_failed"
    assert "authorization" not in cross_site.headers


async def test_forward_auth_missing_csrf_header_is_403_like_the_proxy(gw: Running) -> None:
    response = await gw.forward(TRAEFIK, csrf=False)
    assert response.status_code == 403 and response.json()["error"] == "csrf_failed"
    assert gw.exchanges == 0


async def test_forward_auth_envoy_path_prefix_carries_original_path_and_method(
    gw: Running,
) -> None:
    # Envoy's ext_authz HTTP service: path_prefix + the original :path, the original method,
    # no X-Forwarded-Method/-Uri. A `route` in that query is the client's, not the data plane's.
    response = await gw.forward(
        {"Origin": ORIGIN}, path="/auth/forward/billing/invoices?route=api", method="POST"
    )
    assert response.status_code == 200, response.text
    assert _audience(response) == BILLING
    refused = await gw.forward(
        {"Origin": "https://evil.example"}, path="/auth/forward/api/orders", method="DELETE"
    )
    assert refused.status_code == 403 and refused.json()["error"] == "csrf_failed"


async def test_forward_auth_envoy_original_path_header_must_agree_with_path(gw: Running) -> None:
    agree = await gw.forward(
        {"X-Envoy-Original-Path": "/api/orders?x=1"}, path="/auth/forward/api/orders?x=1"
    )
    disagree = await gw.forward(
        {"X-Envoy-Original-Path": "/api/orders"}, path="/auth/forward/billing/invoices"
    )
    assert agree.status_code == 200 and _audience(agree) == API
    assert disagree.status_code == 403 and "disagree" in disagree.json()["message"]
    assert gw.exchanges == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Original-URI": "/billing/x", "X-Forwarded-Uri": "/api/x"},
        {**NGINX, "X-Forwarded-Uri": "/status/"},
        {"X-Original-URL": "https://app.example.com/api/x", "X-Original-URI": "/billing/x"},
        {**NGINX, "X-Original-Method": "POST"},
    ],
    ids=["uri-vs-uri", "client-slipped-public-route", "url-vs-uri", "method-vs-method"],
)
async def test_forward_auth_disagreeing_headers_are_refused(
    gw: Running, headers: dict[str, str]
) -> None:
    response = await gw.forward(headers)
    assert response.status_code == 403
    assert "disagree" in response.json()["message"]
    assert "authorization" not in response.headers and gw.exchanges == 0


@pytest.mark.parametrize(
    ("headers", "path"),
    [
        ({}, "/auth/forward"),  # nothing says what the request was
        ({"X-Original-URI": "/nowhere/x"}, "/auth/forward"),
        ({"X-Original-URI": "/status/..%2f..%2fapi/x"}, "/auth/forward"),
        ({"X-Original-URI": "api/x"}, "/auth/forward"),
        ({"X-Original-URL": "javascript:alert(1)"}, "/auth/forward"),
        ({"X-Original-URI": "/api/x", "X-Forwarded-Method": "G E T"}, "/auth/forward"),
        ({"X-Original-URI": "/api/x"}, "/auth/forward?route=nope"),
        ({"X-Original-URI": "/api/x"}, "/auth/forward?route=api&route=billing"),
    ],
    ids=[
        "no-uri",
        "no-route",
        "encoded-slash",
        "relative",
        "not-a-url",
        "bad-method",
        "unknown-route-name",
        "two-route-names",
    ],
)
async def test_forward_auth_unplaceable_request_is_403_not_an_error(
    gw: Running, headers: dict[str, str], path: str
) -> None:
    response = await gw.forward(headers, path=path)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "forbidden"
    assert gw.exchanges == 0


async def test_forward_auth_dot_segments_resolve_before_matching(gw: Running) -> None:
    # /status/ is public, but /status/%2e%2e/api/x is /api/x: it needs the session.
    response = await gw.forward({"X-Original-URI": "/status/%2e%2e/api/x"}, session=False)
    assert response.status_code == 401


async def test_forward_auth_merges_slashes_before_dot_segments_as_data_planes_do(
    gw: Running,
) -> None:
    # nginx (merge_slashes), Traefik, Go's path.Clean and Envoy send /api//../billing/leak to
    # the billing upstream: the token must be billing's, never the orders API's (review item 1).
    response = await gw.forward({"X-Original-URI": "/api//../billing/leak"})
    assert response.status_code == 200 and _audience(response) == BILLING


async def test_forward_auth_matches_the_decoded_path_as_data_planes_route(gw: Running) -> None:
    # nginx and Envoy route /%61pi/orders as /api/orders: so does forward-auth.
    response = await gw.forward({"X-Original-URI": "/%61pi/orders"})
    assert response.status_code == 200 and _audience(response) == API


async def test_forward_auth_route_name_from_data_plane_wins_over_path(gw: Running) -> None:
    response = await gw.forward(
        {"X-Original-URI": "/orders-v2/list"}, path="/auth/forward?route=api"
    )
    assert response.status_code == 200 and _audience(response) == API


async def test_forward_auth_without_session_is_401_with_login_hint(gw: Running) -> None:
    response = await gw.forward(TRAEFIK, session=False)
    assert response.status_code == 401
    body = response.json()
    assert body["error"] == "login_required"
    assert body["login_url"] == f"{ORIGIN}/auth/login?return_to=%2Fapi%2Forders%3Fx%3D1"
    assert response.headers["x-auth-login-url"] == body["login_url"]
    assert "authorization" not in response.headers


async def test_forward_auth_garbage_cookie_is_401(gw: Running) -> None:
    async with gw.client() as client:
        response = await client.get(
            "/auth/forward",
            headers={**NGINX, "X-Forward-Auth-Secret": SECRET, "Cookie": "__Host-gw_session=a.b"},
        )
    assert response.status_code == 401


async def test_forward_auth_public_route_is_200_without_token(gw: Running) -> None:
    response = await gw.forward({"X-Forwarded-Uri": "/status/health"}, session=False, csrf=False)
    assert response.status_code == 200
    assert "authorization" not in response.headers and gw.exchanges == 0


async def test_forward_auth_audience_outside_policy_is_403(
    gw: Running, idp: respx.MockRouter
) -> None:
    # Auth0 answers an audience outside the MRRT policy with a token for the default audience.
    idp.post(TOKEN_URL).respond(
        json={"access_token": access_token(API, scope="read:orders"), "expires_in": 600}
    )
    response = await gw.forward({"X-Forwarded-Uri": "/billing/invoices"})
    assert response.status_code == 403
    assert response.json()["error"] == "audience_not_permitted"
    assert response.headers["x-auth-error"] == "audience_not_permitted"


async def test_forward_auth_head_and_any_method_are_answered(gw: Running) -> None:
    head = await gw.forward(NGINX, method="HEAD")
    assert head.status_code == 200 and _audience(head) == API


# -- token economy ----------------------------------------------------------------------------


async def test_forward_auth_thirty_concurrent_subrequests_one_exchange_per_audience(
    gw: Running,
) -> None:
    uris = ["/api/orders" if i % 2 else "/billing/invoices" for i in range(30)]
    responses = await asyncio.gather(*(gw.forward({"X-Original-URI": uri}) for uri in uris))
    assert [r.status_code for r in responses] == [200] * 30
    assert {_audience(r) for r in responses} == {API, BILLING}
    assert len({r.headers["authorization"] for r in responses}) == 2
    audiences = sorted(
        parse_qs(call.request.content.decode())["audience"][0] for call in gw.token_route.calls
    )
    assert audiences == [API, BILLING]


# -- who may ask ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET[:-1], SECRET + "x"], ids=repr)
async def test_forward_auth_refuses_callers_without_the_secret(
    gw: Running, secret: str | None
) -> None:
    response = await gw.forward(TRAEFIK, secret=secret)
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    assert "authorization" not in response.headers and gw.exchanges == 0
    assert SECRET not in response.text


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.255.0.1", True),
        ("::ffff:10.1.2.3", True),
        ("fd00::1", True),
        ("192.0.2.10", False),
        ("127.0.0.1", False),
        ("not-an-ip", False),
    ],
)
async def test_forward_auth_allowed_sources_alone_guard_the_endpoint(
    idp: respx.MockRouter, address: str, allowed: bool
) -> None:
    settings = make_settings(
        forward_auth={"enabled": True, "allowed_sources": "10.0.0.0/8, fd00::/8"}
    )
    async for running in _start(settings, idp):
        async with running.client((address, 1234)) as client:
            response = await client.get(
                "/auth/forward", headers={**NGINX, "Cookie": running.cookie, "X-CSRF": "1"}
            )
        assert response.status_code == (200 if allowed else 403), response.text


async def test_forward_auth_secret_and_sources_must_both_pass(idp: respx.MockRouter) -> None:
    settings = _forward_settings(allowed_sources=["10.0.0.0/8"])
    async for running in _start(settings, idp):
        assert (await running.forward(NGINX)).status_code == 200
        assert (await running.forward(NGINX, secret="wrong")).status_code == 403
        async with running.client(("192.0.2.10", 1)) as client:
            outsider = await client.get(
                "/auth/forward",
                headers={**NGINX, "X-Forward-Auth-Secret": SECRET, "Cookie": running.cookie},
            )
        assert outsider.status_code == 403


async def test_forward_auth_user_headers_when_enabled(idp: respx.MockRouter) -> None:
    async for running in _start(_forward_settings(user_headers=True), idp):
        response = await running.forward(NGINX)
    assert response.status_code == 200
    assert response.headers["x-auth-request-user"] == "auth0|alice"
    assert response.headers["x-auth-request-email"] == "alice@example.com"


async def test_forward_auth_custom_path(idp: respx.MockRouter) -> None:
    async for running in _start(_forward_settings(path="/auth/check/"), idp):
        moved = await running.forward(NGINX, path="/auth/check")
        envoy = await running.forward({}, path="/auth/check/billing/x")
        old = await running.forward(NGINX)
    assert moved.status_code == 200 and _audience(moved) == API
    assert envoy.status_code == 200 and _audience(envoy) == BILLING
    assert old.status_code == 404  # /auth/forward is now just an unrouted path


async def test_forward_auth_is_off_by_default(idp: respx.MockRouter) -> None:
    async for running in _start(make_settings(), idp):
        response = await running.forward(NGINX)
    assert response.status_code == 404
    assert "authorization" not in response.headers


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("forward_auth", "message"),
    [
        ({"enabled": True}, "forward_auth.secret: required"),
        ({"enabled": True, "secret": "short"}, "at least 32 characters"),
        ({"enabled": True, "secret": SECRET, "allowed_sources": ["10.0.0.0/33"]}, "CIDR"),
        ({"enabled": True, "allowed_sources": ["somewhere"]}, "CIDR"),
        ({"enabled": True, "secret": SECRET, "path": "/forward"}, "under /auth/"),
        ({"enabled": True, "secret": SECRET, "path": "/auth/login"}, "under /auth/"),
        ({"enabled": True, "secret": SECRET, "path": "/auth/a/../b"}, ". or .. segments"),
    ],
)
def test_forward_auth_settings_refuse(forward_auth: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings(forward_auth=forward_auth)


def test_forward_auth_settings_accept_sources_without_secret() -> None:
    settings = make_settings(forward_auth={"enabled": True, "allowed_sources": "10.1.2.3/8,::1"})
    assert settings.forward_auth.allowed_sources == ["10.0.0.0/8", "::1/128"]
    assert settings.forward_auth.path == "/auth/forward"


def test_read_original_request_prefers_first_header_query_for_return_to() -> None:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/auth/forward",
        "raw_path": b"/auth/forward",
        "query_string": b"route=api",
        "headers": [
            (b"x-forwarded-uri", b"/api/a%20b?q=1"),
            (b"x-original-url", b"https://app.example.com/api/a b"),
            (b"x-forwarded-method", b"patch"),
        ],
    }
    original = read_original_request(scope, "/auth/forward")
    assert original.method == "PATCH"
    assert original.path == "/api/a b"
    assert original.target == "/api/a%20b?q=1"
    assert original.route_name == "api"


# -- the documented data-plane configs, played by the data plane's rules ------------------------
#
# Traefik's and Envoy's servers are not in our package registries, so these tests apply each
# documented config the way that data plane does (which headers reach the gateway, what it adds,
# which answer headers land on the upstream request) and check what the upstream would get.

INTEGRATIONS = Path(__file__).resolve().parents[2] / "config" / "integrations"
BROWSER = {
    "Cookie": "",  # filled in with the session cookie
    "X-CSRF": "1",
    "Authorization": "Bearer client-supplied",
    "X-Auth-Request-User": "mallory",
    "X-Forward-Auth-Secret": "forged",
}


def _load(name: str, **values: str) -> Any:
    text = (INTEGRATIONS / name).read_text()
    for key, value in values.items():
        text = text.replace(key, value)
    return yaml.safe_load(text)


def _browser(running: Running, **extra: str) -> httpx.Headers:
    return httpx.Headers({**BROWSER, "Cookie": running.cookie, **extra})


def _target(address: str) -> str:
    parts = urlsplit(address)
    return parts.path + (f"?{parts.query}" if parts.query else "")


async def _through_traefik(
    running: Running, method: str, uri: str, browser: httpx.Headers
) -> tuple[httpx.Response, httpx.Headers]:
    """traefik.yml's `mrrt` chain: headers middlewares and forwardAuth, in order."""
    config = _load("traefik.yml", **{'{{ env "MRRT_FORWARD_AUTH_SECRET" }}': SECRET})
    middlewares = config["http"]["middlewares"]
    request = httpx.Headers(browser)
    answer = httpx.Response(200)
    for name in middlewares["mrrt"]["chain"]["middlewares"]:
        middleware = middlewares[name]
        for key, value in middleware.get("headers", {}).get("customRequestHeaders", {}).items():
            if value == "":
                request.pop(key, None)
            else:
                request[key] = value
        if "forwardAuth" in middleware:
            forward = middleware["forwardAuth"]
            assert forward["trustForwardHeader"] is False
            sent = {h: request[h] for h in forward["authRequestHeaders"] if h in request}
            sent |= {
                "X-Forwarded-Method": method,
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "app.example.com",
                "X-Forwarded-Uri": uri,
                "X-Forwarded-For": "203.0.113.9",
            }
            async with running.client() as client:
                answer = await client.get(_target(forward["address"]), headers=sent)
            if not answer.is_success:
                return answer, request
            for key in forward["authResponseHeaders"]:
                if key in answer.headers:
                    request[key] = answer.headers[key]
    return answer, request


async def _through_envoy(
    running: Running, method: str, uri: str, browser: httpx.Headers
) -> tuple[httpx.Response, httpx.Headers]:
    """envoy.yaml's ext_authz HTTP service, then the matching route's header removals."""
    config = _load("envoy.yaml", **{"${FORWARD_AUTH_SECRET}": SECRET})
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_authz = manager["typed_config"]["http_filters"][0]["typed_config"]
    service = ext_authz["http_service"]
    allowed = {p["exact"] for p in ext_authz["allowed_headers"]["patterns"]}
    sent = {k: v for k, v in browser.items() if k in allowed | {"authorization"}}
    sent |= {h["key"]: h["value"] for h in service["authorization_request"]["headers_to_add"]}
    async with running.client() as client:
        answer = await client.request(method, service["path_prefix"] + uri, headers=sent)
    request = httpx.Headers(browser)
    if answer.status_code != 200:
        return answer, request
    response = service["authorization_response"]
    for pattern in response["allowed_upstream_headers"]["patterns"]:
        if pattern["exact"] in answer.headers:
            request[pattern["exact"]] = answer.headers[pattern["exact"]]
    routes = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    route = next(r for r in routes if uri.startswith(r["match"]["prefix"]))
    for key in route.get("request_headers_to_remove", []):
        request.pop(key, None)
    return answer, request


async def _through_ingress_nginx(
    running: Running, method: str, uri: str, browser: httpx.Headers
) -> tuple[httpx.Response, httpx.Headers]:
    """ingress-nginx.yaml's orders-api annotations, as the controller renders auth_request."""
    documents = list(
        yaml.safe_load_all(
            (INTEGRATIONS / "ingress-nginx.yaml")
            .read_text()
            .replace("${FORWARD_AUTH_SECRET}", SECRET)
        )
    )
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    ingress = next(d for d in documents if d["metadata"]["name"] == "orders-api")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "auth-proxy-set-headers"].endswith("/mrrt-forward-auth-headers")
    sent = httpx.Headers(browser)  # the subrequest keeps the client's headers, except those
    sent.update(config_map["data"])  # the controller sets (proxy_set_header replaces them)
    sent.update({"X-Original-URL": f"https://app.example.com{uri}", "X-Original-Method": method})
    async with running.client() as client:
        answer = await client.request(
            annotations[prefix + "auth-method"],
            _target(annotations[prefix + "auth-url"]),
            headers=sent,
        )
    request = httpx.Headers(browser)
    if not answer.is_success:
        return answer, request
    for key in (h.strip() for h in annotations[prefix + "auth-response-headers"].split(",")):
        # proxy_set_header from $upstream_http_<key>: an empty value removes the header.
        if key in answer.headers:
            request[key] = answer.headers[key]
        else:
            request.pop(key, None)
    return answer, request


DATA_PLANES = {
    "traefik": _through_traefik,
    "envoy": _through_envoy,
    "ingress-nginx": _through_ingress_nginx,
}


@pytest.mark.parametrize("data_plane", DATA_PLANES)
async def test_documented_config_upstream_gets_only_the_route_token(
    gw: Running, data_plane: str
) -> None:
    through = DATA_PLANES[data_plane]
    answer, upstream = await through(gw, "GET", "/api/orders?x=1", _browser(gw))
    assert answer.status_code == 200, answer.text
    scheme, _, token = upstream["authorization"].partition(" ")
    assert scheme == "Bearer" and token != "client-supplied"
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == API
    assert "cookie" not in upstream
    assert upstream.get("x-auth-request-user") != "mallory"
    if data_plane != "ingress-nginx":  # its auth-proxy-set-headers only touch the subrequest
        assert upstream.get("x-forward-auth-secret") != SECRET


@pytest.mark.parametrize("data_plane", DATA_PLANES)
async def test_documented_config_denials_reach_the_client(gw: Running, data_plane: str) -> None:
    through = DATA_PLANES[data_plane]
    anonymous = httpx.Headers({"X-CSRF": "1"})
    login, _ = await through(gw, "GET", "/api/orders", anonymous)
    cross_site, _ = await through(
        gw, "POST", "/api/orders", _browser(gw, Origin="https://evil.example")
    )
    assert login.status_code == 401 and login.json()["error"] == "login_required"
    assert login.json()["login_url"].startswith(f"{ORIGIN}/auth/login")
    assert cross_site.status_code == 403 and cross_site.json()["error"] == "csrf_failed"
    assert gw.exchanges == 0


async def test_documented_configs_send_the_secret_the_gateway_expects(gw: Running) -> None:
    # The same documented config, with a secret the gateway does not know: refused.
    config = _load("traefik.yml", **{'{{ env "MRRT_FORWARD_AUTH_SECRET" }}': "x" * 40})
    secret = config["http"]["middlewares"]["mrrt-prepare"]["headers"]["customRequestHeaders"]
    response = await gw.forward(NGINX, secret=secret["X-Forward-Auth-Secret"])
    assert response.status_code == 403 and gw.exchanges == 0


@pytest.mark.parametrize(
    ("data_plane", "status"), [("traefik", 200), ("envoy", 200), ("ingress-nginx", 403)]
)
async def test_documented_config_client_uri_headers_never_pick_another_route(
    gw: Running, data_plane: str, status: int
) -> None:
    # Traefik overwrites X-Forwarded-Uri, Envoy does not pass it; ingress-nginx passes it next to
    # its own X-Original-URL, and the gateway refuses the disagreement.
    browser = _browser(gw, **{"X-Forwarded-Uri": "/status/", "X-Original-URI": "/billing/x"})
    answer, upstream = await DATA_PLANES[data_plane](gw, "GET", "/api/orders", browser)
    assert answer.status_code == status, answer.text
    if status == 200:
        token = upstream["authorization"].removeprefix("Bearer ")
        assert jwt.decode(token, options={"verify_signature": False})["aud"] == API
