"""Sender-constrained tokens end to end: the test IdP's client ``bff-pkjwt`` authenticates with
private_key_jwt (no secret), requires pushed authorization requests and DPoP-bound tokens with
nonces; the upstreams accept only DPoP tokens and check each proof as a resource server must
(``dpop_upstream.py``), with nonces of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect

from gateway import create_app
from gateway.client_keys import parse_private_keys, public_jwks
from gateway.dpop import DPoPKey
from gateway.settings import Settings

from .dpop_upstream import DPoPUpstream
from .gateway_harness import CSRF
from .login import browser_login
from .servers import API, BILLING, PKJWT_CLIENT_ID, IdpProcess, reserve_socket, run_asgi, start_idp

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SECRET = "e2e-forward-auth-secret-e2e-forward-auth-secret"


@dataclass
class Stack:
    idp: IdpProcess
    api: DPoPUpstream
    billing: DPoPUpstream
    base_url: str
    app: Any

    @property
    def services(self) -> Any:
        return self.app.state.services

    def idp_nonce_errors(self, grant_type: str) -> int:
        errors: dict[str, int] = self.idp.stats()["grant_errors"].get(grant_type, {})
        return errors.get("use_dpop_nonce", 0)


def _private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    pem = _private_key_pem()
    jwks = public_jwks(parse_private_keys(pem.encode(), alg=None, source="test"))
    with start_idp(at_ttl=60, pkjwt_jwks=jwks) as idp:
        api = DPoPUpstream(issuer=idp.issuer, audience=API, name="api")
        billing = DPoPUpstream(issuer=idp.issuer, audience=BILLING, name="billing")
        sock = reserve_socket()
        port = int(sock.getsockname()[1])
        settings = Settings(
            public_url=f"http://127.0.0.1:{port}",
            oidc={
                "issuer": idp.issuer,
                "client_id": PKJWT_CLIENT_ID,
                "client_auth": "private_key_jwt",
                "private_key": pem,
                "par": "required",
                "dialect": "rfc8707",
                "prompt": "consent",
            },
            session={"secret_key": ["e2e-secret-key-e2e-secret-key-e2e-secret-key"]},
            tokens={"skew": 10, "dpop": "required"},
            log={"level": "warning"},
            forward_auth={"enabled": True, "secret": SECRET},
            routes=[
                {"prefix": "/api/", "upstream": api.url, "audience": API},
                {"prefix": "/billing/", "upstream": billing.url, "audience": BILLING},
                {"prefix": "/client/", "upstream": api.url, "audience": API, "auth": "client"},
                {
                    "prefix": "/ws/",
                    "upstream": api.url + "ws/",
                    "audience": API,
                    "websocket": True,
                },
            ],
        )
        app = create_app(settings)
        try:
            options = {"proxy_headers": False, "ws": "websockets-sansio"}
            with run_asgi(app, sock=sock, **options) as base_url:
                yield Stack(idp, api, billing, base_url, app)
        finally:
            api.stop()
            billing.stop()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        response = await browser_login(
            http, f"{stack.base_url}/auth/login?return_to=/", idp_issuer=stack.idp.issuer
        )
        assert response.status_code == 302, response.text
        yield http


def _session(stack: Stack, client: httpx.AsyncClient) -> Any:
    manager = stack.services.sessions
    return manager.store.load_now(
        manager.session_id_from_cookie(
            f"{manager.cookie_name}={client.cookies[manager.cookie_name]}"
        )
    )


async def test_login_pushes_the_request_with_a_key_and_binds_the_session(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    stats = stack.idp.stats()
    assert stats["pushed_authorization_requests"] >= 1
    session = _session(stack, client)
    assert session is not None and session.dpop_jwk is not None
    me = await client.get("/auth/me")
    assert me.status_code == 200
    assert '"d"' not in me.text and "dpop" not in me.text.lower()  # never to the browser
    answer = await client.get("/api/orders", headers=CSRF)
    assert answer.status_code == 200, answer.text
    assert answer.json()["sub"] == "alice"
    token = stack.api.accepted[-1]["token"]
    cnf = jwt.decode(token, options={"verify_signature": False})["cnf"]
    assert cnf["jkt"] == DPoPKey.from_jwk(session.dpop_jwk).jkt


async def test_a_steady_state_needs_no_nonce_retry(stack: Stack, client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/first", headers=CSRF)).status_code == 200
    challenges, refusals = stack.api.nonce_challenges, len(stack.api.refusals)
    for n in range(5):
        assert (await client.get(f"/api/steady/{n}", headers=CSRF)).status_code == 200
    assert stack.api.nonce_challenges == challenges
    assert len(stack.api.refusals) == refusals


async def test_the_upstreams_nonce_rotation_costs_one_retry(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/api/warm", headers=CSRF)).status_code == 200
    stack.api.rotate_nonce()
    before = stack.api.nonce_challenges
    posted = await client.post("/api/orders", headers=CSRF, json={"n": 1})  # a small body
    assert posted.status_code == 200, posted.text
    assert posted.json()["body_len"] > 0
    assert stack.api.nonce_challenges == before + 1
    assert (await client.get("/api/again", headers=CSRF)).status_code == 200
    assert stack.api.nonce_challenges == before + 1


async def test_the_idps_nonce_rotation_costs_one_retry(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/api/warm", headers=CSRF)).status_code == 200  # a nonce is known
    stack.idp.rotate_dpop_nonce()
    before = stack.idp_nonce_errors("refresh_token")
    answer = await client.get("/billing/invoices", headers=CSRF)  # a new token: one exchange
    assert answer.status_code == 200, answer.text
    assert stack.idp_nonce_errors("refresh_token") == before + 1


async def test_a_replayed_proof_is_refused(stack: Stack, client: httpx.AsyncClient) -> None:
    captured: dict[str, str] = {}
    original = stack.api.verify

    async def capture(method: str, url: str, headers: Any) -> dict[str, Any]:
        captured.update(authorization=headers["authorization"], dpop=headers["dpop"], url=url)
        return await original(method, url, headers)

    stack.api.verify = capture  # type: ignore[method-assign]
    try:
        assert (await client.get("/api/replay", headers=CSRF)).status_code == 200
    finally:
        stack.api.verify = original  # type: ignore[method-assign]
    async with httpx.AsyncClient(timeout=10) as attacker:
        replayed = await attacker.get(
            captured["url"],
            headers={"Authorization": captured["authorization"], "DPoP": captured["dpop"]},
        )
    assert replayed.status_code == 401
    assert replayed.json()["detail"] == "jti replayed"


async def test_a_token_from_the_upstreams_log_is_useless_without_the_key(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/api/leak", headers=CSRF)).status_code == 200
    leaked = stack.api.accepted[-1]["token"]
    url = f"{stack.api.base_url}/orders"
    thief = DPoPKey.generate()
    async with httpx.AsyncClient(timeout=10) as attacker:
        as_bearer = await attacker.get(url, headers={"Authorization": f"Bearer {leaked}"})
        own_proof = await attacker.get(
            url,
            headers={
                "Authorization": f"DPoP {leaked}",
                "DPoP": thief.proof("GET", url, access_token=leaked, nonce=stack.api.nonce),
            },
        )
    assert as_bearer.status_code == 401
    assert own_proof.status_code == 401
    assert own_proof.json()["detail"] == "cnf.jkt"


async def test_a_client_token_is_bound_to_the_gateways_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as anonymous:
        answer = await anonymous.get("/client/status")
    assert answer.status_code == 200, answer.text
    token = stack.api.accepted[-1]["token"]
    cnf = jwt.decode(token, options={"verify_signature": False})["cnf"]
    assert cnf["jkt"] == stack.services.dpop.client_key.jkt
    assert stack.idp.stats()["client_credentials_by_resource"].get(API, 0) >= 1


async def test_forward_auth_answers_a_proof_for_the_original_request(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/api/warm", headers=CSRF)).status_code == 200  # nonce known
    answer = await client.get(
        "/auth/forward",
        headers={
            "X-Forward-Auth-Secret": SECRET,
            "X-Forwarded-Uri": "/api/orders/7?full=1",
            "X-Forwarded-Method": "DELETE",
            **CSRF,
            "Origin": stack.base_url,
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["authorization"].startswith("DPoP ")
    async with httpx.AsyncClient(timeout=10) as data_plane:  # passes both headers on
        forwarded = await data_plane.delete(
            f"{stack.api.base_url}/orders/7?full=1",
            headers={
                "Authorization": answer.headers["authorization"],
                "DPoP": answer.headers["dpop"],
            },
        )
    assert forwarded.status_code == 200, forwarded.text
    assert forwarded.json()["method"] == "DELETE"


def _echo_websocket(stack: Stack, client: httpx.AsyncClient) -> Any:
    """The browser's WebSocket to /ws/echo, with its session cookie and the gateway's origin."""
    name = stack.services.sessions.cookie_name
    return connect(
        "ws" + stack.base_url[4:] + "/ws/echo",
        additional_headers={"Cookie": f"{name}={client.cookies[name]}"},
        origin=stack.base_url,  # type: ignore[arg-type]
        open_timeout=10,
        close_timeout=5,
    )


async def test_a_websocket_upgrade_carries_a_proof(stack: Stack, client: httpx.AsyncClient) -> None:
    stack.api.rotate_nonce()  # the upgrade meets a stale nonce: one more upgrade
    async with _echo_websocket(stack, client) as websocket:
        assert await websocket.recv() == "hello alice"
        await websocket.send("ping")
        assert await websocket.recv() == "ping"


async def test_a_nonce_announced_on_a_websocket_upgrade_serves_the_next_request(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    """RFC 9449 §8.2: a new nonce may come on any answer, a 101 included."""
    assert (await client.get("/api/before", headers=CSRF)).status_code == 200
    stack.api.announce_nonce()
    announced = stack.api.announced
    async with _echo_websocket(stack, client) as websocket:
        assert await websocket.recv() == "hello alice"
    stack.api.adopt_announced()  # from now on only the announced nonce passes
    before = stack.api.nonce_challenges
    assert (await client.get("/api/after", headers=CSRF)).status_code == 200
    assert stack.api.nonce_challenges == before, "the 101's nonce was not remembered"
    assert stack.api.accepted[-1]["nonce"] == announced
