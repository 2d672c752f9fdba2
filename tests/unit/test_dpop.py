"""DPoP, private_key_jwt and PAR on Auth0's wire formats (respx), the proofs, the binding
checks, the nonces, the session record and the settings."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.cli import main
from gateway.client_keys import jwk_thumbprint, parse_private_keys
from gateway.dpop import DPoP, DPoPBound, DPoPKey, ProofSigner, nonce_in, server_of
from gateway.errors import ConfigError, IdentityProviderError
from gateway.oidc import OIDCClient
from gateway.sessions import MemorySessionStore
from gateway.sessions.base import CachedToken, Session
from gateway.settings import load_settings
from gateway.tokens import checked_token

from .conftest import API, CLIENT_ID, DISCOVERY, ISSUER, access_token, jwks, make_settings

pytestmark = pytest.mark.anyio
TOKEN_URL = DISCOVERY["token_endpoint"]
PAR_URL = ISSUER + "oauth/par"
AUTH0_DISCOVERY = {
    **DISCOVERY,
    "pushed_authorization_request_endpoint": PAR_URL,
    "dpop_signing_alg_values_supported": ["ES256"],
}


def _pem(key: Any) -> str:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem.decode()


RSA_PEM = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
EC_PEM = _pem(ec.generate_private_key(ec.SECP256R1()))


def _settings(**oidc: Any) -> Any:
    return make_settings(
        oidc={
            "client_auth": "private_key_jwt",
            "client_secret": None,
            "private_key": RSA_PEM + EC_PEM,
            **oidc,
        },
        tokens={"dpop": "required"},
    )


@pytest.fixture
def auth0() -> Any:
    with respx.mock(assert_all_called=False) as router:
        router.get(ISSUER + ".well-known/openid-configuration").respond(json=AUTH0_DISCOVERY)
        router.get(ISSUER + ".well-known/jwks.json").respond(json=jwks())
        yield router


@pytest.fixture
async def oidc(auth0: respx.MockRouter) -> AsyncIterator[OIDCClient]:
    settings = _settings()
    dpop = DPoP("required", store=MemorySessionStore(idle_timeout=60), client_secret="s" * 32)
    async with httpx.AsyncClient() as http:
        yield OIDCClient(settings, http, dpop=dpop)


def _form(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode())


def _bound(key: DPoPKey, **extra: Any) -> str:
    return access_token(API, scope="read:orders", cnf={"jkt": key.jkt}, **extra)


async def test_private_key_jwt_assertion_for_auth0_names_the_issuer(
    oidc: OIDCClient, auth0: respx.MockRouter
) -> None:
    key = DPoPKey.generate()
    token = auth0.post(TOKEN_URL).respond(
        json={"access_token": _bound(key), "token_type": "DPoP", "expires_in": 60}
    )
    await oidc.refresh("rt", audience=API, scopes=[], dpop_key=key)
    form = _form(token.calls.last.request)
    assert "client_secret" not in form
    assert form["client_assertion_type"] == [
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    ]
    assertion = form["client_assertion"][0]
    header = jwt.get_unverified_header(assertion)
    signer = parse_private_keys(RSA_PEM.encode(), alg=None, source="t")[0]  # the first signs
    assert header["kid"] == signer.kid and header["alg"] == "RS256"
    claims = jwt.decode(assertion, signer.key.public_key(), algorithms=["RS256"], audience=ISSUER)
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == ISSUER and 0 < claims["exp"] - claims["iat"] <= 60
    again = await oidc.refresh("rt", audience=API, scopes=[], dpop_key=key)
    second = jwt.decode(_form(token.calls.last.request)["client_assertion"][0], **_loose())
    assert second["jti"] != claims["jti"] and isinstance(again.access_token, str)


def _loose() -> dict[str, Any]:
    return {"options": {"verify_signature": False}}


async def test_the_assertion_audience_is_the_token_endpoint_elsewhere(
    auth0: respx.MockRouter,
) -> None:
    settings = _settings(dialect="rfc8707")
    token = auth0.post(TOKEN_URL).respond(json={"access_token": "x", "expires_in": 60})
    async with httpx.AsyncClient() as http:
        await OIDCClient(settings, http).client_credentials(audience=API, scopes=[])
    claims = jwt.decode(_form(token.calls.last.request)["client_assertion"][0], **_loose())
    assert claims["aud"] == TOKEN_URL


async def test_the_token_request_carries_a_proof_and_answers_use_dpop_nonce_once(
    oidc: OIDCClient, auth0: respx.MockRouter
) -> None:
    key = DPoPKey.generate()
    token = auth0.post(TOKEN_URL).mock(
        side_effect=[
            httpx.Response(
                400,
                json={"error": "use_dpop_nonce", "error_description": "nonce required"},
                headers={"DPoP-Nonce": "n-1"},
            ),
            httpx.Response(
                200,
                json={"access_token": _bound(key), "token_type": "DPoP", "expires_in": 60},
                headers={"DPoP-Nonce": "n-2"},
            ),
        ]
    )
    answer = await oidc.refresh("rt", audience=API, scopes=[], dpop_key=key)
    assert answer.token_type == "DPoP"
    first, second = (call.request for call in token.calls)
    proof = jwt.decode(second.headers["dpop"], **_loose())
    header = jwt.get_unverified_header(second.headers["dpop"])
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256" and "d" not in header["jwk"]
    assert jwk_thumbprint(header["jwk"]) == key.jkt
    assert proof["htm"] == "POST" and proof["htu"] == TOKEN_URL and proof["nonce"] == "n-1"
    assert "nonce" not in jwt.decode(first.headers["dpop"], **_loose())
    assert oidc.dpop is not None and oidc.dpop.nonces.get("https://tenant.eu.auth0.com") == "n-2"


async def test_pushed_authorization_request_sends_the_browser_only_a_request_uri(
    oidc: OIDCClient, auth0: respx.MockRouter
) -> None:
    pushed = auth0.post(PAR_URL).respond(
        201, json={"request_uri": "urn:ietf:params:oauth:request_uri:abc", "expires_in": 60}
    )
    url = await oidc.authorize_url(state="st", nonce="no", code_challenge="cc", dpop_jkt="jkt-1")
    query = parse_qs(urlsplit(url).query)
    assert query == {
        "client_id": [CLIENT_ID],
        "request_uri": ["urn:ietf:params:oauth:request_uri:abc"],
    }
    form = _form(pushed.calls.last.request)
    assert form["dpop_jkt"] == ["jkt-1"] and form["audience"] == [API]
    assert form["state"] == ["st"] and form["code_challenge_method"] == ["S256"]
    assert "client_assertion" in form and form["client_id"] == [CLIENT_ID]


async def test_par_required_refuses_an_idp_without_the_endpoint(idp: respx.MockRouter) -> None:
    settings = make_settings(oidc={"par": "required"})
    async with httpx.AsyncClient() as http:
        with pytest.raises(IdentityProviderError, match="pushed_authorization_request"):
            await OIDCClient(settings, http).metadata()


def test_a_bound_answer_becomes_a_dpop_token_and_a_bearer_one_fails_closed() -> None:
    from gateway.oidc import TokenResponse

    key = DPoPKey.generate()

    def answer(token: str, token_type: str) -> TokenResponse:
        return TokenResponse(token, 60, None, None, "read:orders", token_type)

    common: dict[str, Any] = {"audience": API, "scopes": [], "now": time.time()}
    common["allow_opaque"] = False
    bound = checked_token(
        answer(_bound(key), "DPoP"), **common, dpop_jkt=key.jkt, dpop_required=True
    )
    assert type(bound.access_token) is DPoPBound
    other = DPoPKey.generate()
    with pytest.raises(IdentityProviderError, match=r"cnf\.jkt"):
        checked_token(answer(_bound(other), "DPoP"), **common, dpop_jkt=key.jkt)
    bearer = access_token(API, scope="read:orders")
    with pytest.raises(IdentityProviderError, match="DPoP-bound"):
        checked_token(answer(bearer, "Bearer"), **common, dpop_jkt=key.jkt, dpop_required=True)
    auto = checked_token(answer(bearer, "Bearer"), **common, dpop_jkt=key.jkt)
    assert type(auto.access_token) is str  # auto: an IdP that does not bind
    stored = CachedToken.from_json(bound.to_json())
    assert type(stored.access_token) is DPoPBound
    assert type(CachedToken.from_json(auto.to_json()).access_token) is str


def test_a_proof_has_every_claim_a_resource_server_checks() -> None:
    key = DPoPKey.generate()
    proof = key.proof("GET", "https://api.example.com/x", access_token="abc", nonce="n")
    header = jwt.get_unverified_header(proof)
    public = jwt.PyJWK(header["jwk"], algorithm="ES256").key
    claims = jwt.decode(proof, public, algorithms=["ES256"])
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"abc").digest()).rstrip(b"=").decode()
    assert claims["ath"] == digest and claims["htm"] == "GET" and claims["nonce"] == "n"
    assert claims["htu"] == "https://api.example.com/x" and abs(claims["iat"] - time.time()) < 5
    assert key.proof("GET", "https://a/x").split(".")[1] != key.proof("GET", "https://a/x")


class _CountingKey(DPoPKey):
    """A key that counts its proofs and fails for the htu ``https://fail/``."""

    __slots__ = ("signed",)

    def __init__(self) -> None:
        super().__init__(ec.generate_private_key(ec.SECP256R1()))
        self.signed: list[str] = []

    def proof(self, htm: str, htu: str, **claims: Any) -> str:
        if htu == "https://fail/":
            raise ValueError("no proof for this one")
        self.signed.append(htu)
        return super().proof(htm, htu, **claims)


def _claims(proof: str) -> dict[str, Any]:
    public = jwt.PyJWK(jwt.get_unverified_header(proof)["jwk"], algorithm="ES256").key
    decoded: dict[str, Any] = jwt.decode(proof, public, algorithms=["ES256"])
    return decoded


async def test_the_proofs_of_one_turn_are_signed_together_each_for_its_own_request() -> None:
    signer, key, other = ProofSigner(), _CountingKey(), _CountingKey()
    asks = [
        signer.proof(k, "GET", f"https://api/{i}", access_token=f"t{i}", nonce=None)
        for i, k in enumerate([key, other, key, other])
    ]
    first = asyncio.ensure_future(asks[0])
    await asyncio.sleep(0)  # the first ask waits for the turn's batch ...
    assert not first.done() and key.signed == []
    proofs = [await first, *await asyncio.gather(*asks[1:])]  # ... and the next batch signs 3
    assert key.signed == ["https://api/0", "https://api/2"]
    assert other.signed == ["https://api/1", "https://api/3"]
    claims = [_claims(proof) for proof in proofs]
    assert [c["htu"] for c in claims] == [f"https://api/{i}" for i in range(4)]
    assert len({c["jti"] for c in claims}) == 4


async def test_a_request_that_has_gone_is_not_signed_and_a_failure_is_its_own() -> None:
    signer, key = ProofSigner(), _CountingKey()
    gone = asyncio.ensure_future(
        signer.proof(key, "GET", "https://gone/", access_token="t", nonce=None)
    )
    failing = asyncio.ensure_future(
        signer.proof(key, "GET", "https://fail/", access_token="t", nonce=None)
    )
    kept = asyncio.ensure_future(
        signer.proof(key, "POST", "https://kept/", access_token="t", nonce="n")
    )
    await asyncio.sleep(0)  # all three wait in the batch
    gone.cancel()
    await asyncio.gather(gone, failing, kept, return_exceptions=True)
    assert gone.cancelled() and key.signed == ["https://kept/"]
    with pytest.raises(ValueError, match="no proof"):
        failing.result()
    assert _claims(kept.result())["nonce"] == "n"


async def test_a_proof_asked_for_from_another_event_loop_is_signed_there_and_then() -> None:
    signer, key = ProofSigner(), _CountingKey()
    waiting = asyncio.ensure_future(
        signer.proof(key, "GET", "https://here/", access_token=None, nonce=None)
    )
    await asyncio.sleep(0)  # this loop's batch is pending
    elsewhere: list[str] = []

    def other_loop() -> None:
        ask = signer.proof(key, "GET", "https://there/", access_token=None, nonce=None)
        elsewhere.append(asyncio.run(asyncio.wait_for(ask, 5)))

    thread = threading.Thread(target=other_loop)
    thread.start()
    thread.join(10)
    assert _claims(elsewhere[0])["htu"] == "https://there/"
    assert _claims(await waiting)["htu"] == "https://here/"


async def test_a_batch_left_by_a_closed_event_loop_is_dropped_not_kept() -> None:
    signer, key = ProofSigner(), _CountingKey()
    gone = asyncio.new_event_loop()  # a loop that ended while one of its proofs waited
    signer._loop = gone
    signer._pending.append((gone.create_future(), key, "GET", "https://gone/", "t", None))
    gone.close()
    proof = await signer.proof(key, "GET", "https://here/", access_token="t", nonce=None)
    assert _claims(proof)["htu"] == "https://here/" and key.signed == ["https://here/"]
    assert signer._pending == [] and signer._loop is asyncio.get_running_loop()


def test_a_server_has_one_spelling_however_its_url_is_written() -> None:
    """A nonce saved under one spelling is found under every other (yarl drops default
    ports from the URLs aiohttp hands back; a configured upstream may name them)."""
    assert {
        server_of("ws://API.example:80/ws/echo"),
        server_of("http://api.example/x?y=1"),
        server_of("HTTP://user@api.example:80"),
    } == {"http://api.example"}
    assert (
        server_of("wss://api.example:443/")
        == server_of("https://api.example")
        == ("https://api.example")
    )
    assert server_of("http://api.example:8080/") == "http://api.example:8080"
    assert server_of("https://api.example:80/") == "https://api.example:80"
    assert server_of("http://[::1]:80/") == "http://[::1]"


def test_a_session_key_survives_its_jwk_and_never_shows() -> None:
    key = DPoPKey.generate()
    again = DPoPKey.from_jwk(key.to_jwk())
    assert again.jkt == key.jkt and key.to_jwk()["d"] not in repr(key)
    assert DPoPKey.derive("s" * 32).jkt == DPoPKey.derive("s" * 32).jkt


def test_old_session_records_without_a_key_still_load() -> None:
    old: dict[str, Any] = {
        "id": "i",
        "sub": "s",
        "refresh_token": "rt",
        "created_at": 1.0,
        "absolute_expiry": 2.0,
        "sid": None,
        "id_token": None,
        "claims": {},
        "last_seen": 1.0,
        "rt_version": 0,
    }
    session = Session.from_json(json.dumps(old))
    assert session.dpop_jwk is None
    assert "dpop_jwk" not in json.loads(session.to_json())  # written as it was
    jwk = DPoPKey.generate().to_jwk()
    keyed = Session.from_json(Session(**{**old, "dpop_jwk": jwk}).to_json())
    assert keyed.dpop_jwk == jwk and jwk["d"] not in repr(keyed)


async def test_nonces_are_shared_through_the_store_and_replaced_by_newer_ones() -> None:
    store = MemorySessionStore(idle_timeout=60)
    one = DPoP("auto", store=store, client_secret="x")
    two = DPoP("auto", store=store, client_secret="x")
    await one.nonces.remember("https://api", "n-1")
    assert await two.nonces.current("https://api") == "n-1"
    await one.nonces.remember("https://api", "n-2")
    assert one.nonces.get("https://api") == "n-2" and await store.get_dpop_nonce("https://api")
    await one.nonces.remember("https://api", 'bad "nonce"')  # not an NQCHAR string
    assert one.nonces.get("https://api") == "n-2"
    assert nonce_in([(b"DPoP-Nonce", b"abc")]) == "abc" and nonce_in([]) is None


def test_auto_follows_the_discovery_document() -> None:
    dpop = DPoP("auto", store=MemorySessionStore(idle_timeout=60), client_secret="x")
    dpop.resolve(DISCOVERY)
    assert not dpop.active
    dpop.resolve(AUTH0_DISCOVERY)
    assert dpop.active and not dpop.required


def test_settings_read_the_former_name_and_need_a_key_for_private_key_jwt() -> None:
    former = make_settings(oidc={"token_endpoint_auth_method": "client_secret_basic"})
    assert former.oidc.client_auth == "client_secret_basic"
    with pytest.raises(ConfigError, match=r"oidc\.private_key"):
        load_settings(
            None,
            oidc={"issuer": ISSUER, "client_id": CLIENT_ID, "client_auth": "private_key_jwt"},
        )
    with pytest.raises(ConfigError, match="no PEM private key"):
        load_settings(
            None,
            oidc={
                "issuer": ISSUER,
                "client_id": CLIENT_ID,
                "client_auth": "private_key_jwt",
                "private_key": "not a key",
            },
        )


def test_gateway_keys_prints_the_public_jwks(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "client.pem"
    key_file.write_text(EC_PEM + RSA_PEM)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"oidc:\n  issuer: {ISSUER}\n  client_id: {CLIENT_ID}\n"
        f"  client_auth: private_key_jwt\n  private_key_file: {key_file}\n"
    )
    monkeypatch.delenv("GATEWAY_OIDC__PRIVATE_KEY", raising=False)
    assert main(["keys", "--config", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [k["alg"] for k in printed["keys"]] == ["ES256", "RS256"]
    assert all("d" not in k and k["kid"] == jwk_thumbprint(k) for k in printed["keys"])
