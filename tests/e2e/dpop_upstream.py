"""An upstream API that accepts only DPoP-bound tokens and checks each proof as a resource
server must (RFC 9449 §4.3, §7.1, §9): the token (signature by the IdP, audience), the proof's
``typ``, signature with its embedded public key, ``htm``, ``htu`` (this request's URL without
query), ``iat`` window, a ``jti`` never seen before, ``ath`` (the token's hash), the token's
``cnf.jkt`` equal to the proof key's thumbprint, and its own nonce echoed. A refusal is ``401``
with ``WWW-Authenticate: DPoP error="..."`` (and ``DPoP-Nonce`` for ``use_dpop_nonce``).

HTTP on every path (a JSON record of the request), WebSocket on ``/ws/...`` (echo).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from typing import Any

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from demo.apis import JwksCache
from gateway.client_keys import jwk_thumbprint

from .servers import ServerThread

IAT_WINDOW = 60


class ProofRefused(Exception):
    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error


def _b64_sha256(value: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(value.encode()).digest()).rstrip(b"=").decode()


class DPoPUpstream:
    """See the module docstring. ``rotate_nonce()`` makes every nonce issued so far stale;
    ``announce_nonce()`` sends a new one on every successful answer (RFC 9449 §8.2) while the
    current one still passes, and ``adopt_announced()`` then makes the new one the only one;
    ``nonce_challenges`` counts its ``use_dpop_nonce`` answers, ``refusals`` every refusal by
    error, ``accepted`` every request it served (with the proof's jti and the token)."""

    def __init__(
        self, *, issuer: str, audience: str, name: str = "dpop", require_nonce: bool = True
    ) -> None:
        self.name = name
        self.require_nonce = require_nonce  # False: behind forward-auth, which cannot relay one
        self.audience = audience
        self._jwks = JwksCache(issuer)
        self._lock = threading.Lock()
        self._seen_jti: set[str] = set()
        self.nonce = secrets.token_urlsafe(16)
        self.announced: str | None = None
        self.nonce_challenges = 0
        self.refusals: list[str] = []
        self.accepted: list[dict[str, Any]] = []
        self._server = ServerThread(self._build_app(), ws="websockets-sansio")
        self.base_url = self._server.base_url
        self.url = f"{self.base_url}/"

    def rotate_nonce(self) -> None:
        with self._lock:
            self.nonce = secrets.token_urlsafe(16)

    def announce_nonce(self) -> None:
        with self._lock:
            self.announced = secrets.token_urlsafe(16)

    def adopt_announced(self) -> None:
        with self._lock:
            assert self.announced is not None
            self.nonce, self.announced = self.announced, None

    def _announcement(self) -> dict[str, str]:
        """The headers of a successful answer: the announced nonce, if any."""
        with self._lock:
            return {"dpop-nonce": self.announced} if self.announced else {}

    async def verify(self, method: str, url: str, headers: Any) -> dict[str, Any]:
        """The token's claims when the request passes, else raise :class:`ProofRefused`."""
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "dpop" or not token:
            raise ProofRefused("invalid_token", "not a DPoP token")
        proofs = [v for k, v in headers.items() if k.lower() == "dpop"]
        if len(proofs) != 1:
            raise ProofRefused("invalid_dpop_proof", "exactly one DPoP proof is required")
        proof = proofs[0]
        try:
            signing_key = await self._jwks.key_for(jwt.get_unverified_header(token).get("kid"))
            claims: dict[str, Any] = jwt.decode(
                token,
                key=signing_key.key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=self._jwks.issuer,
            )
        except Exception as exc:
            raise ProofRefused("invalid_token", f"token: {type(exc).__name__}") from None
        try:
            header = jwt.get_unverified_header(proof)
            jwk = header.get("jwk")
            if header.get("typ") != "dpop+jwt" or header.get("alg") != "ES256":
                raise ProofRefused("invalid_dpop_proof", "typ or alg")
            if not isinstance(jwk, dict) or "d" in jwk:
                raise ProofRefused("invalid_dpop_proof", "jwk")
            payload: dict[str, Any] = jwt.decode(
                proof,
                key=jwt.PyJWK(jwk, algorithm="ES256").key,
                algorithms=["ES256"],
                options={"require": ["iat", "jti", "htm", "htu"], "verify_iat": False},
            )
        except ProofRefused:
            raise
        except Exception as exc:
            raise ProofRefused("invalid_dpop_proof", f"proof: {type(exc).__name__}") from None
        if payload["htm"] != method:
            raise ProofRefused("invalid_dpop_proof", "htm")
        if payload["htu"] != url.partition("?")[0]:
            raise ProofRefused("invalid_dpop_proof", f"htu {payload['htu']} != {url}")
        if abs(time.time() - payload["iat"]) > IAT_WINDOW:
            raise ProofRefused("invalid_dpop_proof", "iat")
        if payload.get("ath") != _b64_sha256(token):
            raise ProofRefused("invalid_dpop_proof", "ath")
        cnf = claims.get("cnf")
        if not isinstance(cnf, dict) or cnf.get("jkt") != jwk_thumbprint(jwk):
            raise ProofRefused("invalid_token", "cnf.jkt")
        with self._lock:
            if payload["jti"] in self._seen_jti:
                raise ProofRefused("invalid_dpop_proof", "jti replayed")
            self._seen_jti.add(payload["jti"])
            nonces = {self.nonce, self.announced} - {None}
            if self.require_nonce and payload.get("nonce") not in nonces:
                self.nonce_challenges += 1
                raise ProofRefused("use_dpop_nonce", "nonce")
            self.accepted.append(
                {"jti": payload["jti"], "token": token, "url": url, "nonce": payload.get("nonce")}
            )
        return claims

    def _refusal(self, refused: ProofRefused) -> JSONResponse:
        with self._lock:
            self.refusals.append(refused.error)
            headers = {"www-authenticate": f'DPoP algs="ES256", error="{refused.error}"'}
            if refused.error == "use_dpop_nonce":
                headers["dpop-nonce"] = self.nonce
        return JSONResponse(
            {"error": refused.error, "detail": str(refused)}, status_code=401, headers=headers
        )

    def _build_app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            try:
                claims = await self.verify(request.method, str(request.url), request.headers)
            except ProofRefused as refused:
                return self._refusal(refused)
            body = await request.body()
            return JSONResponse(
                {
                    "upstream": self.name,
                    "method": request.method,
                    "path": request.url.path,
                    "sub": claims.get("sub"),
                    "aud": claims.get("aud"),
                    "body_len": len(body),
                },
                headers=self._announcement(),
            )

        async def websocket(ws: WebSocket) -> None:
            url = "http" + str(ws.url)[2:]  # the handshake's HTTP URL
            try:
                claims = await self.verify("GET", url, ws.headers)
            except ProofRefused as refused:
                await ws.send_denial_response(self._refusal(refused))
                return
            announced = self._announcement()
            await ws.accept(headers=[(k.encode(), v.encode()) for k, v in announced.items()])
            await ws.send_text(f"hello {claims.get('sub')}")
            async for message in ws.iter_text():
                await ws.send_text(message)

        methods = ["GET", "POST", "PUT", "DELETE"]
        return Starlette(
            routes=[
                WebSocketRoute("/ws/{path:path}", websocket),
                Route("/{path:path}", handle, methods=methods),
            ]
        )

    def stop(self) -> None:
        self._server.stop()
