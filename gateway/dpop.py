"""DPoP (RFC 9449): the keys, the proofs and the servers' nonces.

Where the keys live:

* one ES256 key pair per session, created at login (its thumbprint goes on the authorization
  request as ``dpop_jkt``, §10) and kept only inside the session record, which the Redis store
  encrypts at rest: every instance can sign for the session, and the key never reaches a log,
  a trace, ``/auth/me`` or the browser;
* one key for the gateway's own client-credentials tokens, which belong to no session and are
  shared by every instance through the store: it is derived from the first
  ``session.secret_key`` (HKDF), so every instance holds the same one without storing it, and
  a new secret key means a new key (and, as the token store's key names the thumbprint, new
  client tokens).

Every request with a DPoP-bound token carries a fresh proof: ``typ: dpop+jwt``, the public
``jwk``, and ``jti`` (random), ``htm``, ``htu`` (without query and fragment, §4.2), ``iat``,
``ath`` (the token's SHA-256, §4.3) and the server's latest ``nonce``. What does not change per
request is built once per key: the signing key object and the proof's encoded header.

The proofs of forwarded requests are signed in batches, one per two turns of the event loop
(:class:`ProofSigner`): a lone ES256 signature between two requests costs about twice what it
costs back to back, as the rest of a request pushes OpenSSL's P-256 tables out of the CPU's
caches.

Nonces (§8, §9) are remembered per server (an origin) in this process and shared through the
session store, and a newer ``DPoP-Nonce`` on any answer replaces the stored one; so a nonce
rotation costs one retry, and a steady state none.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .client_keys import b64url, jwk_thumbprint, public_jwk
from .errors import IdentityProviderError

logger = logging.getLogger("gateway.dpop")

ALGORITHM = "ES256"
NONCE_HEADER = b"dpop-nonce"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ECDSA = ec.ECDSA(hashes.SHA256())
_KEY_MEMO_MAX = 10_000  # session keys kept as key objects (~1 KB each); a miss re-reads one
_NONCE_MAX_LENGTH = 512

Mode = Literal["off", "auto", "required"]


class DPoPBound(str):
    """An access token bound to a DPoP key (``token_type: DPoP``): it goes upstream as
    ``Authorization: DPoP <token>`` with a proof, never as a bearer token. A ``str``, so a
    token is compared, cached and stored as any other; its type is decided once, when the
    token is minted (or read back from the store), not per request."""

    __slots__ = ()


def _b64int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


class DPoPKey:
    """One ES256 key pair and the parts of its proofs that never change."""

    __slots__ = ("_header", "_key", "jkt")

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        jwk = public_jwk(key)
        self.jkt = jwk_thumbprint(jwk)
        header = {"typ": "dpop+jwt", "alg": ALGORITHM, "jwk": jwk}
        self._header = b64url(json.dumps(header, separators=(",", ":")).encode()) + "."

    def __repr__(self) -> str:
        return f"DPoPKey(jkt={self.jkt})"

    @classmethod
    def generate(cls) -> DPoPKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def derive(cls, secret: str) -> DPoPKey:
        """The key every instance derives from the same secret (HKDF-SHA256)."""
        material = HKDF(
            algorithm=hashes.SHA256(), length=48, salt=None, info=b"mrrt-gateway dpop client v1"
        ).derive(secret.encode())
        scalar = int.from_bytes(material, "big") % (_P256_ORDER - 1) + 1
        return cls(ec.derive_private_key(scalar, ec.SECP256R1()))

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> DPoPKey:
        """A key from its private JWK (the session record's form)."""
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise ValueError("not a P-256 key")
        public = ec.EllipticCurvePublicNumbers(_b64int(jwk["x"]), _b64int(jwk["y"]), ec.SECP256R1())
        key = ec.EllipticCurvePrivateNumbers(_b64int(jwk["d"]), public).private_key()
        return cls(key)

    def to_jwk(self) -> dict[str, str]:
        """The private JWK, for the (encrypted) session record only."""
        scalar = self._key.private_numbers().private_value
        return {**public_jwk(self._key), "d": b64url(scalar.to_bytes(32, "big"))}

    def proof(
        self,
        htm: str,
        htu: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        now: float | None = None,
    ) -> str:
        """A fresh proof for one request (its own jti, iat and signature).

        The claims are written as JSON by hand: ``htm`` is a method token, ``jti`` base64url,
        a nonce NQCHAR (no quote, no backslash: ``_valid_nonce``), so only ``htu`` needs JSON
        escaping. ``ath`` is remembered per token (a token serves many requests)."""
        iat = int(time.time() if now is None else now)
        claims = (
            f'{{"jti":"{secrets.token_urlsafe(16)}","htm":"{htm}",'
            f'"htu":{_json_string(htu)},"iat":{iat}'
        )
        if access_token is not None:
            claims += f',"ath":"{_ath(access_token)}"'
        if nonce is not None:
            claims += f',"nonce":"{nonce}"'
        signing_input = self._header + b64url((claims + "}").encode())
        r, s = decode_dss_signature(self._key.sign(signing_input.encode("ascii"), _ECDSA))
        return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


class ProofSigner:
    """Signs the proofs asked for during two turns of the event loop back to back, at the end
    of the second, and hands each to its request.

    Why: measured on the benchmark machine, a proof signed inline between two requests costs
    about 50 µs of CPU, of which the signature alone costs 27 µs in a loop: the rest of a
    request (interpreter, sockets, kernel) pushes OpenSSL's P-256 code and 150 KB comb table out
    of the core's caches, and each signature fetches them again. Signed back to back the
    batch's first proof pays that once. Under load two turns gather the proofs of many requests
    (about 15 at 16 connections; one turn gathered 8 and left the DPoP route at 0.79 of the
    bearer one's req/s against 0.82 with two, 0.69 inline); a lone request waits two turns
    (microseconds).

    A request that gives up meanwhile (its future cancelled) is not signed. The batch belongs
    to one event loop: a proof asked for from another loop is signed inline, unless that loop
    has closed, and then its batch is dropped."""

    __slots__ = ("_loop", "_pending")

    def __init__(self) -> None:
        self._pending: list[
            tuple[asyncio.Future[str], DPoPKey, str, str, str | None, str | None]
        ] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def proof(
        self, key: DPoPKey, htm: str, htu: str, *, access_token: str | None, nonce: str | None
    ) -> str:
        loop = asyncio.get_running_loop()
        pending = self._pending
        if pending and self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                return key.proof(htm, htu, access_token=access_token, nonce=nonce)
            pending.clear()  # a closed loop's batch: nobody waits for it any more
        if not pending:
            self._loop = loop
            loop.call_soon(self._next_turn, loop)
        future: asyncio.Future[str] = loop.create_future()
        pending.append((future, key, htm, htu, access_token, nonce))
        return await future

    def _next_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon(self._sign_batch)  # the requests of this turn join the batch too

    def _sign_batch(self) -> None:
        pending, self._pending = self._pending, []
        for future, key, htm, htu, access_token, nonce in pending:
            if future.done():  # cancelled: the request has gone
                continue
            try:
                future.set_result(key.proof(htm, htu, access_token=access_token, nonce=nonce))
            except Exception as exc:  # one bad proof fails its own request only
                future.set_exception(exc)


_ATH_MEMO_MAX = 4096
_ath_memo: dict[str, str] = {}


def _ath(access_token: str) -> str:
    """The token's hash for a proof's ``ath`` (RFC 9449 §4.2), remembered for the last few
    thousand tokens (oldest out first): hashing an 800-character token on every request cost
    more than the lookup. The dict is keyed by the token (its hash is cached on the string)."""
    ath = _ath_memo.get(access_token)
    if ath is None:
        ath = b64url(hashlib.sha256(access_token.encode("ascii")).digest())
        if len(_ath_memo) >= _ATH_MEMO_MAX:
            del _ath_memo[next(iter(_ath_memo))]
        _ath_memo[access_token] = ath
    return ath


def bound_token(
    token_type: str,
    access_token: str,
    claims: Mapping[str, object] | None,
    *,
    jkt: str,
    required: bool,
    audience: str,
) -> str:
    """The token of an answer to a request that carried a proof with the key ``jkt``:
    ``token_type: DPoP`` and (a JWT's) ``cnf.jkt`` naming that key make it a
    :class:`DPoPBound`; a Bearer answer is refused when DPoP is ``required`` (fail closed)
    and otherwise passes as a bearer token (``auto``: an IdP or API that does not bind)."""
    if token_type.lower() != "dpop":
        if required:
            raise IdentityProviderError(
                f"the identity provider issued a {token_type[:16]} token for {audience}, "
                "not a DPoP-bound one (tokens.dpop is required)"
            )
        return access_token
    if claims is not None:
        cnf = claims.get("cnf")
        if not isinstance(cnf, dict) or cnf.get("jkt") != jkt:
            raise IdentityProviderError(
                f"the identity provider's DPoP token for {audience} is not bound to the "
                "gateway's key (cnf.jkt)"
            )
    return DPoPBound(access_token)


def htu(url: str) -> str:
    """A request URL as a proof's ``htu``: without query and fragment (RFC 9449 §4.2)."""
    return url.partition("?")[0].partition("#")[0]


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def server_of(url: str) -> str:
    """The server a nonce belongs to: the URL's origin, one spelling for every way of writing
    it (``ws`` as ``http``, lower case, no default port: yarl drops it from the URLs aiohttp
    hands back, a configured upstream may name it)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    netloc = parts.netloc.rpartition("@")[2].lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None and netloc.endswith(default):
        netloc = netloc.removesuffix(default)
    return f"{scheme}://{netloc}"


def nonce_in(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The ``DPoP-Nonce`` of an answer's raw headers, or None."""
    for name, value in headers:
        if len(name) == 10 and name.lower() == NONCE_HEADER:
            return _valid_nonce(value.decode("latin-1"))
    return None


def _valid_nonce(value: str | None) -> str | None:
    # RFC 9449 §8.1: NQCHAR (printable ASCII without space, quote and backslash).
    if not value or len(value) > _NONCE_MAX_LENGTH:
        return None
    if not all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in value):
        return None
    return value


class NonceStore(Protocol):
    async def get_dpop_nonce(self, server: str) -> str | None: ...

    async def put_dpop_nonce(self, server: str, nonce: str) -> None: ...


class DPoPNonces:
    """The latest nonce of each server: read on the hot path from this process's dict, read
    from the store once per server (another instance may know it), written to the store when
    it changes. Bounded by the configuration: the IdP plus the routes' upstreams."""

    def __init__(self, store: NonceStore) -> None:
        self._store = store
        self._nonces: dict[str, str] = {}
        self._asked: set[str] = set()

    def get(self, server: str) -> str | None:
        return self._nonces.get(server)

    async def current(self, server: str) -> str | None:
        """The nonce, asking the store the first time this process meets ``server``."""
        nonce = self._nonces.get(server)
        if nonce is None and server not in self._asked:
            self._asked.add(server)
            try:
                shared = _valid_nonce(await self._store.get_dpop_nonce(server))
            except Exception as exc:  # a nonce is an optimisation: one retry without it
                logger.warning("reading a DPoP nonce failed: %s", type(exc).__name__)
                shared = None
            if shared is not None:
                nonce = self._nonces.setdefault(server, shared)
        return nonce

    async def remember(self, server: str, value: str | None) -> None:
        """A ``DPoP-Nonce`` the server sent: replaces the one held, here and in the store."""
        nonce = _valid_nonce(value)
        if nonce is None or self._nonces.get(server) == nonce:
            return
        self._nonces[server] = nonce
        self._asked.add(server)
        try:
            await self._store.put_dpop_nonce(server, nonce)
        except Exception as exc:
            logger.warning("sharing a DPoP nonce failed: %s", type(exc).__name__)


class DPoP:
    """The gateway's DPoP state: mode, the session keys in use, the client key, the nonces."""

    def __init__(self, mode: Mode, *, store: NonceStore, client_secret: str) -> None:
        self.mode = mode
        self.required = mode == "required"
        self.active = mode == "required"  # auto: decided by the discovery document
        self.nonces = DPoPNonces(store)
        self.signer = ProofSigner()
        self._client_secret = client_secret
        self._client_key: DPoPKey | None = None
        self._keys: dict[str, DPoPKey] = {}

    def resolve(self, metadata: Mapping[str, Any]) -> None:
        """``auto``: on when the IdP lists ES256 in ``dpop_signing_alg_values_supported``."""
        if self.mode == "auto":
            algorithms = metadata.get("dpop_signing_alg_values_supported")
            self.active = isinstance(algorithms, list) and ALGORITHM in algorithms

    @property
    def client_key(self) -> DPoPKey:
        """The key of the gateway's own client-credentials tokens."""
        if self._client_key is None:
            self._client_key = DPoPKey.derive(self._client_secret)
        return self._client_key

    def session_key(self, session_id: str, jwk: Mapping[str, Any] | None) -> DPoPKey | None:
        """The key object of a session (its record's JWK), memoised by session id: a
        session's key never changes once it has one."""
        key = self._keys.get(session_id)
        if key is None and jwk is not None:
            key = DPoPKey.from_jwk(jwk)
            if len(self._keys) >= _KEY_MEMO_MAX:
                del self._keys[next(iter(self._keys))]
            self._keys[session_id] = key
        return key

    def forget(self, session_id: str) -> None:
        self._keys.pop(session_id, None)
