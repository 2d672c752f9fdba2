"""Which JWS algorithm may verify with which key, and what a verification can raise.

PyJWT picks its algorithm object from the token's (attacker-chosen) ``alg`` header and only
then looks at the key: an ``ES256`` token whose ``kid`` names an RSA key makes it raise
``TypeError`` instead of a ``PyJWTError`` (adversarial review, item 4). So the gateway pairs
the algorithm with the key's type first (RFC 7518 §3.1: RS*/PS* take RSA keys, ES256/384/512
the P-256/384/521 curves, EdDSA an OKP key, RFC 8037 §3.1), and still maps every exception a
verification can raise to "invalid token".
"""

from __future__ import annotations

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

# PyJWTError for what PyJWT recognises; the rest is what its algorithm objects and the
# cryptography package raise on a key or input they were not written for (a key of another
# type, a private key where a public one belongs, a malformed number).
VERIFY_ERRORS: tuple[type[Exception], ...] = (
    jwt.PyJWTError,
    ValueError,
    TypeError,
    ArithmeticError,
    LookupError,
    AttributeError,
)


def key_fits_algorithm(alg: str, key: object) -> bool:
    """True when ``key`` (a public key from the JWKS) is of the type ``alg`` verifies with."""
    if alg in _RSA_ALGORITHMS:
        return isinstance(key, rsa.RSAPublicKey)
    curve = _EC_CURVES.get(alg)
    if curve is not None:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False
