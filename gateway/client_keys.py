"""Client-authentication keys for private_key_jwt (RFC 7523), and the JWK helpers DPoP shares.

Keys come as PEM (PKCS#8, PKCS#1 or SEC1), one or several: RSA (2048 bits or more; RS256, or
PS256 with ``oidc.private_key_alg``) or EC P-256 (ES256). Each one's ``kid`` is its RFC 7638
thumbprint. Pure apart from reading the key file; no private key ever reaches a log, an error
message or a ``repr``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?:RSA |EC )?PRIVATE KEY-----.+?-----END (?:RSA |EC )?PRIVATE KEY-----", re.S
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint: the required members, sorted, no whitespace."""
    members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def public_jwk(key: PrivateKey) -> dict[str, str]:
    """The public half of ``key`` as a JWK (without kid/alg/use)."""
    numbers = key.public_key().public_numbers()
    if isinstance(numbers, rsa.RSAPublicNumbers):
        size = (numbers.n.bit_length() + 7) // 8
        return {
            "kty": "RSA",
            "n": b64url(numbers.n.to_bytes(size, "big")),
            "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
        }
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One client-authentication key: the private key, its algorithm and its kid."""

    key: PrivateKey = field(repr=False)
    alg: str
    kid: str

    def __repr__(self) -> str:
        return f"SigningKey(alg={self.alg}, kid={self.kid})"

    def public_jwk(self) -> dict[str, str]:
        return {**public_jwk(self.key), "kid": self.kid, "alg": self.alg, "use": "sig"}


def parse_private_keys(pem: bytes, *, alg: str | None, source: str) -> list[SigningKey]:
    """Every PEM private key in ``pem`` (PKCS#8, PKCS#1 or SEC1), in order. ``alg``: RS256
    or PS256 for RSA keys (default RS256); P-256 keys sign ES256. Raises ValueError naming
    ``source``, never the key."""
    blocks = _PEM_BLOCK.findall(pem)
    if not blocks:
        raise ValueError(f"{source}: no PEM private key found")
    keys: list[SigningKey] = []
    for index, block in enumerate(blocks):
        try:
            key = serialization.load_pem_private_key(block, password=None)
        except (ValueError, TypeError):
            raise ValueError(
                f"{source}: key {index + 1} is not an unencrypted PEM private key"
            ) from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise ValueError(f"{source}: key {index + 1} is RSA below 2048 bits")
            key_alg = alg if alg in ("RS256", "PS256") else "RS256"
            if alg == "ES256":
                raise ValueError(f"{source}: key {index + 1} is RSA, private_key_alg is ES256")
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
            if alg not in (None, "ES256"):
                raise ValueError(f"{source}: key {index + 1} is P-256, private_key_alg is {alg}")
            key_alg = "ES256"
        else:
            raise ValueError(f"{source}: key {index + 1} is neither RSA nor EC P-256")
        keys.append(SigningKey(key=key, alg=key_alg, kid=jwk_thumbprint(public_jwk(key))))
    return keys


def load_private_keys(pem: str | None, path: Path | None, *, alg: str | None) -> list[SigningKey]:
    """The configured client-authentication keys: ``GATEWAY_OIDC__PRIVATE_KEY`` (``pem``,
    one or several) first, then ``oidc.private_key_file`` (``path``); empty when neither is
    set."""
    keys: list[SigningKey] = []
    if pem is not None:
        keys += parse_private_keys(pem.encode(), alg=alg, source="oidc.private_key")
    if path is not None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(
                f"oidc.private_key_file: cannot read {path} ({exc.strerror or type(exc).__name__})"
            ) from None
        keys += parse_private_keys(data, alg=alg, source="oidc.private_key_file")
    return keys


def public_jwks(keys: list[SigningKey]) -> dict[str, list[dict[str, str]]]:
    """The JWKS to register at the IdP (public keys only)."""
    return {"keys": [k.public_jwk() for k in keys]}
