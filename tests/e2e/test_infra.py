"""Smoke tests of the e2e infrastructure itself (no gateway involved)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .conftest import IdpFactory, UpstreamFactory
from .login import browser_login, browser_logout, idp_authorize, parse_forms
from .servers import (
    API,
    BASIC_CLIENT_ID,
    BASIC_CLIENT_SECRET,
    BILLING,
    CLIENT_ID,
    CLIENT_SECRET,
    OUTSIDE,
    IdpProcess,
    IdpStartRetried,
    big_pattern,
    free_port,
    reserve_socket,
    run_asgi,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SCOPE = "openid offline_access read:orders read:invoices read:secrets"


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class Rp:
    """A minimal relying party talking to the IdP directly (what the gateway does)."""

    def __init__(self, client: httpx.AsyncClient, idp: IdpProcess, *, basic: bool = False) -> None:
        self.client = client
        self.idp = idp
        self.basic = basic
        self.client_id = BASIC_CLIENT_ID if basic else CLIENT_ID
        self.secret = BASIC_CLIENT_SECRET if basic else CLIENT_SECRET
        self.redirect_uri = f"http://127.0.0.1:{free_port()}/auth/callback"

    async def token(self, **params: str) -> httpx.Response:
        url = f"{self.idp.issuer}/token"
        if self.basic:
            auth = httpx.BasicAuth(self.client_id, self.secret)
            return await self.client.post(url, data=params, auth=auth)
        data = {**params, "client_id": self.client_id, "client_secret": self.secret}
        return await self.client.post(url, data=data)

    async def login(
        self, *, resources: tuple[str, ...] = (API, BILLING, OUTSIDE), username: str = "alice"
    ) -> dict[str, Any]:
        """Authorization code + PKCE flow; returns the code exchange's JSON."""
        verifier, challenge = _pkce()
        state = secrets.token_urlsafe(16)
        query: list[tuple[str, str]] = [
            ("client_id", self.client_id),
            ("response_type", "code"),
            ("redirect_uri", self.redirect_uri),
            ("scope", SCOPE),
            ("prompt", "consent"),
            ("state", state),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ] + [("resource", r) for r in resources]
        location = await idp_authorize(
            self.client, f"{self.idp.issuer}/auth?{urlencode(query)}", username=username
        )
        assert location.startswith(self.redirect_uri + "?"), location
        params = parse_qs(urlsplit(location).query)
        assert params["state"] == [state]
        assert params["iss"] == [self.idp.issuer]
        response = await self.token(
            grant_type="authorization_code",
            code=params["code"][0],
            redirect_uri=self.redirect_uri,
            code_verifier=verifier,
            resource=resources[0],
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def refresh(self, refresh_token: str, resource: str | None = None) -> httpx.Response:
        params = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if resource is not None:
            params["resource"] = resource
        return await self.token(**params)


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


async def test_discovery_advertises_features(idp: IdpProcess) -> None:
    async with httpx.AsyncClient() as client:
        health = await client.get(f"{idp.issuer}/__health")
        discovery = (await client.get(idp.discovery_url)).json()
    assert health.status_code == 200
    assert discovery["issuer"] == idp.issuer
    assert discovery["resource_indicators_supported"] is True
    assert set(discovery["resource_servers"]) == {API, BILLING, OUTSIDE}
    assert discovery["revocation_endpoint"] == f"{idp.issuer}/token/revocation"
    assert discovery["end_session_endpoint"] == f"{idp.issuer}/session/end"
    assert discovery["backchannel_logout_supported"] is True
    assert "client_secret_post" in discovery["token_endpoint_auth_methods_supported"]


async def test_mrrt_flow_upstreams_and_stats(
    idp: IdpProcess, upstream_factory: UpstreamFactory
) -> None:
    idp.reset_stats()
    api = upstream_factory(name="api", issuer=idp.issuer, audience=API)
    billing = upstream_factory(name="billing", issuer=idp.issuer, audience=BILLING)
    async with httpx.AsyncClient(timeout=10) as client:
        rp = Rp(client, idp)
        tokens = await rp.login()
        assert tokens["refresh_token"]
        assert tokens["id_token"]
        id_claims = _claims(tokens["id_token"])
        assert id_claims["sub"] == "alice" and id_claims["sid"]
        assert _claims(tokens["access_token"])["aud"] == API

        # Refresh for the api: a JWT for the api only, which only the api accepts.
        response = await rp.refresh(tokens["refresh_token"], API)
        assert response.status_code == 200, response.text
        refreshed = response.json()
        assert refreshed["refresh_token"] == tokens["refresh_token"]  # no rotation
        assert refreshed["expires_in"] == 60
        claims = _claims(refreshed["access_token"])
        assert claims["aud"] == API and claims["iss"] == idp.issuer and claims["sub"] == "alice"
        assert claims["scope"] == "read:orders"
        bearer = {"authorization": f"Bearer {refreshed['access_token']}"}
        ok = await client.get(f"{api.url}orders/7?x=1", headers=bearer)
        assert ok.status_code == 200, ok.text
        record = ok.json()
        assert record["upstream"] == "api" and record["aud"] == API and record["sub"] == "alice"
        assert record["path"] == "/orders/7" and record["query"] == "x=1"
        assert record["headers"]["authorization"].startswith("Bearer ")
        denied = await client.get(f"{billing.url}invoices", headers=bearer)
        assert denied.status_code == 401
        assert denied.json()["error"] == "invalid_token"
        assert (await client.get(f"{api.url}orders")).status_code == 401  # no token at all

        # Billing works with the same refresh token; outside was dropped at /auth.
        response = await rp.refresh(tokens["refresh_token"], BILLING)
        assert response.status_code == 200, response.text
        billing_at = response.json()["access_token"]
        assert _claims(billing_at)["scope"] == "read:invoices"
        invoices = await client.get(
            f"{billing.url}invoices", headers={"authorization": f"Bearer {billing_at}"}
        )
        assert invoices.status_code == 200 and invoices.json()["aud"] == BILLING
        outside = await rp.refresh(tokens["refresh_token"], OUTSIDE)
        assert outside.status_code == 400 and outside.json()["error"] == "invalid_target"

        # No resource: the first policy resource (Auth0's "default audience").
        response = await rp.refresh(tokens["refresh_token"])
        assert (
            response.status_code == 200 and _claims(response.json()["access_token"])["aud"] == API
        )

        assert [r["status"] for r in api.requests] == [200, 401]
        assert [r["status"] for r in billing.requests] == [401, 200]

        stats = idp.stats()
        assert stats["grants"] == {"authorization_code": 1, "refresh_token": 3}
        assert stats["refresh_by_resource"] == {API: 2, BILLING: 1}
        assert stats["refresh_errors"] == {"invalid_target": 1}
        assert stats["dropped_resources"] == {OUTSIDE: 1}
        assert stats["revocations"] == 0

        # Revocation kills the grant.
        revoked = await client.post(
            f"{idp.issuer}/token/revocation",
            data={
                "token": tokens["refresh_token"],
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
        )
        assert revoked.status_code == 200
        dead = await rp.refresh(tokens["refresh_token"], API)
        assert dead.status_code == 400 and dead.json()["error"] == "invalid_grant"
        stats = idp.stats()
        assert stats["revocations"] == 1
        assert stats["refresh_errors"] == {"invalid_target": 1, "invalid_grant": 1}
        idp.reset_stats()
        assert idp.stats()["grants"] == {"authorization_code": 0, "refresh_token": 0}


async def test_basic_client_and_localhost_redirect(idp: IdpProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        rp = Rp(client, idp, basic=True)
        rp.redirect_uri = rp.redirect_uri.replace("127.0.0.1", "localhost")
        tokens = await rp.login(resources=(BILLING,), username="bob")
        assert _claims(tokens["id_token"])["sub"] == "bob"
        response = await rp.refresh(tokens["refresh_token"], BILLING)
        assert response.status_code == 200, response.text
        # Not a loopback callback: rejected before any redirect.
        bad = await client.get(
            f"{idp.issuer}/auth",
            params={
                "client_id": CLIENT_ID,
                "response_type": "code",
                "redirect_uri": "http://127.0.0.1:1234/elsewhere",
                "scope": "openid",
            },
        )
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_redirect_uri"


async def test_rotation_replay_revokes_grant(idp_factory: IdpFactory) -> None:
    rotating = idp_factory(rotate=True, at_ttl=7)
    async with httpx.AsyncClient(timeout=10) as client:
        rp = Rp(client, rotating)
        tokens = await rp.login(resources=(API, BILLING))
        assert tokens["expires_in"] == 7
        first = await rp.refresh(tokens["refresh_token"], BILLING)
        assert first.status_code == 200, first.text
        newer = first.json()["refresh_token"]
        assert newer != tokens["refresh_token"]
        replay = await rp.refresh(tokens["refresh_token"], API)
        assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
        after = await rp.refresh(newer, API)  # the whole grant is gone
        assert after.status_code == 400 and after.json()["error"] == "invalid_grant"
    stats = rotating.stats()
    assert stats["grants"] == {"authorization_code": 1, "refresh_token": 1}
    assert stats["refresh_errors"] == {"invalid_grant": 2}
    assert stats["grants_revoked"] >= 1


async def test_upstream_extras(idp: IdpProcess, upstream_factory: UpstreamFactory) -> None:
    public = upstream_factory(name="public", require_auth=False)
    async with httpx.AsyncClient(timeout=10) as client:
        # SSE events arrive one by one, ~200 ms apart.
        arrivals: list[float] = []
        async with client.stream("GET", f"{public.url}sse") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())
                    assert json.loads(line[6:])["upstream"] == "public"
        assert len(arrivals) == 3
        assert arrivals[2] - arrivals[0] >= 0.3

        big = await client.get(f"{public.url}big", params={"n": 300_000})
        assert big.content == big_pattern(300_000)

        async def body() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"z" * 100_000

        upload = await client.post(f"{public.url}upload", content=body())
        assert upload.json()["body_len"] == 1_000_000

        slow_start = time.monotonic()
        slow = await client.get(f"{public.url}slow", params={"s": "0.3"})
        assert slow.status_code == 200 and time.monotonic() - slow_start >= 0.3
        teapot = await client.delete(f"{public.url}status/418", headers={"cookie": "a=b"})
        assert teapot.status_code == 418 and teapot.json()["method"] == "DELETE"
        assert (await client.get(f"{public.url}status/204")).status_code == 204

    paths = [r["path"] for r in public.requests]
    assert paths == ["/sse", "/big", "/upload", "/slow", "/status/418", "/status/204"]
    assert public.requests[4]["headers"]["cookie"] == "a=b"
    public.clear()
    assert public.requests == []


async def test_backchannel_and_rp_logout(idp_factory: IdpFactory) -> None:
    """A back-channel logout token reaches a loopback receiver (SSRF guard bypassed)."""
    received: list[str] = []

    async def backchannel(request: Request) -> Response:
        received.append(parse_qs((await request.body()).decode())["logout_token"][0])
        return Response(status_code=200)

    async def home(request: Request) -> Response:
        return PlainTextResponse(f"home {request.url.query}")

    sock = reserve_socket()
    port = sock.getsockname()[1]
    app = Starlette(
        routes=[
            Route("/auth/backchannel-logout", backchannel, methods=["POST"]),
            Route("/", home),
        ]
    )
    custom = idp_factory(backchannel_uri=f"http://localhost:{port}/auth/backchannel-logout")
    with run_asgi(app, sock=sock) as base_url:
        async with httpx.AsyncClient(timeout=10) as client:
            rp = Rp(client, custom)
            tokens = await rp.login(resources=(API,))
            sid = _claims(tokens["id_token"])["sid"]
            end_session = httpx.URL(
                f"{custom.issuer}/session/end",
                params={
                    "id_token_hint": tokens["id_token"],
                    "post_logout_redirect_uri": f"{base_url}/",
                    "state": "s1",
                },
            )
            response = await browser_logout(client, str(end_session), idp_issuer=custom.issuer)
            assert response.status_code == 200 and response.text == "home state=s1"
    assert len(received) == 1
    logout = _claims(received[0])
    assert logout["sid"] == sid and logout["sub"] == "alice" and logout["aud"] == CLIENT_ID
    assert "http://schemas.openid.net/event/backchannel-logout" in logout["events"]
    stats = custom.stats()
    assert stats["backchannel"] == {"success": 1, "error": 0} and stats["end_sessions"] == 1


async def test_browser_login_through_a_fake_gateway(idp: IdpProcess) -> None:
    """browser_login stops at the callback's redirect and keeps the app's cookie."""
    sock = reserve_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    verifier, challenge = _pkce()

    async def login(request: Request) -> Response:
        query = urlencode(
            [
                ("client_id", CLIENT_ID),
                ("response_type", "code"),
                ("redirect_uri", f"{base}/auth/callback"),
                ("scope", "openid email profile offline_access read:orders"),
                ("resource", API),
                ("prompt", "consent"),
                ("state", request.query_params["return_to"]),
                ("code_challenge", challenge),
                ("code_challenge_method", "S256"),
            ]
        )
        return Response(status_code=302, headers={"location": f"{idp.issuer}/auth?{query}"})

    async def callback(request: Request) -> Response:
        async with httpx.AsyncClient() as client:
            token = await client.post(
                f"{idp.issuer}/token",
                data={
                    "grant_type": "authorization_code",
                    "code": request.query_params["code"],
                    "redirect_uri": f"{base}/auth/callback",
                    "code_verifier": verifier,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                },
            )
        claims = _claims(token.json()["id_token"])
        response = Response(status_code=303, headers={"location": request.query_params["state"]})
        response.set_cookie(
            "gw", f"{claims['sub']}|{claims['email']}|{claims['name']}", httponly=True
        )
        return response

    app = Starlette(routes=[Route("/auth/login", login), Route("/auth/callback", callback)])
    with run_asgi(app, sock=sock):
        async with httpx.AsyncClient(timeout=10) as client:
            final = await browser_login(
                client, f"{base}/auth/login?return_to=/orders", username="carol"
            )
            assert final.status_code == 303 and final.headers["location"] == "/orders"
            assert "carol@example.com" in client.cookies["gw"]
            assert "Carol Example" in client.cookies["gw"]
            # Second login: the IdP session is reused, only consent is shown.
            again = await browser_login(
                client, f"{base}/auth/login?return_to=/x", username="ignored"
            )
            assert again.status_code == 303 and "carol" in client.cookies["gw"]


def test_parse_forms() -> None:
    html = (
        '<form id="f" method="post" action="/a"><input type="hidden" name="xsrf" value="1"/></form>'
        '<button type="submit" form="f" name="logout" value="yes">Yes</button>'
    )
    (form,) = parse_forms(html)
    assert form.action == "/a" and form.method == "post"
    assert form.fields == {"xsrf": "1"} and form.buttons == [("logout", "yes")]


async def test_run_asgi_with_lifespan() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    async def hello(request: Request) -> Response:
        await asyncio.sleep(0)
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/", hello)], lifespan=lifespan)
    with run_asgi(app) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient() as client:
            assert (await client.get(base_url + "/")).text == "hi"
    assert events == ["startup", "shutdown"]


def test_a_stalled_idp_start_is_begun_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A node process that never says it is ready is killed and the IdP started anew."""
    stall = tmp_path / "stall.cjs"  # preloaded by the first node: it blocks before listening
    stall.write_text("Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);\n")
    spawned: list[subprocess.Popen[str]] = []
    real_spawn = IdpProcess._spawn

    def spawn(self: IdpProcess, node: str, env: dict[str, str]) -> None:
        if not spawned:
            env = {**env, "NODE_OPTIONS": f"--require={stall}"}
        real_spawn(self, node, env)
        spawned.append(self._proc)

    monkeypatch.setattr(IdpProcess, "_spawn", spawn)
    with pytest.warns(IdpStartRetried, match="start 1 stalled"):
        idp = IdpProcess(startup_timeout=9.0)
    with idp:
        assert len(spawned) == 2
        assert spawned[0].poll() is not None, "the stalled process was not stopped"
        assert httpx.get(idp.discovery_url).json()["issuer"] == idp.issuer
