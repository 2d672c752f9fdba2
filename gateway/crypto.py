"""Encryption at rest and signing, derived from ``session.secret_key`` (a list: first one writes).

Every secret yields two independent keys through HKDF-SHA256 (RFC 5869), one per purpose, so
the AES key that protects sessions in Redis is never the HMAC key that signs cookies.

Ciphertext layout (AES-256-GCM, NIST SP 800-38D)::

    version (1) | key id (4) | nonce (12) | ciphertext + tag (16)

The key id lets ``decrypt`` pick the right key after a rotation without trial decryption; the
header and the caller's ``aad`` (the Redis key name) are authenticated, so a blob copied to
another key, or a flipped header byte, fails like any other tampering.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

__all__ = ["DecryptionFailed", "SessionCipher"]

MIN_SECRET_LENGTH = 32
_VERSION = 1
_ENCRYPTION_INFO = b"mrrt-gateway session encryption v1"
_SIGNING_INFO = b"mrrt-gateway cookie signing v1"
_KEY_ID_LABEL = b"mrrt-gateway key id v1:"
_KEY_ID_SIZE = 4
_NONCE_SIZE = 12
_TAG_SIZE = 16
_HEADER_SIZE = 1 + _KEY_ID_SIZE
_MIN_BLOB = _HEADER_SIZE + _NONCE_SIZE + _TAG_SIZE


class DecryptionFailed(ValueError):
    """The blob was tampered with, bound to another ``aad``, or written with an unknown key."""


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


class _Key:
    __slots__ = ("aead", "key_id", "signing_key")

    def __init__(self, secret: str) -> None:
        raw = secret.encode()
        encryption_key = _derive(raw, _ENCRYPTION_INFO)
        self.aead = AESGCM(encryption_key)
        self.key_id = hashlib.sha256(_KEY_ID_LABEL + encryption_key).digest()[:_KEY_ID_SIZE]
        self.signing_key = _derive(raw, _SIGNING_INFO)

    def __repr__(self) -> str:
        return f"_Key(id={self.key_id.hex()})"


class SessionCipher:
    """AES-256-GCM for data at rest and HMAC-SHA256 for cookies, with key rotation."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: Sequence[str | SecretStr]) -> None:
        if isinstance(secrets, str | SecretStr):
            raise TypeError("secrets must be a list of keys, not a single key")
        if not secrets:
            raise ValueError("at least one secret key is required")
        keys = []
        for index, secret in enumerate(secrets):
            value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
            if len(value) < MIN_SECRET_LENGTH:
                raise ValueError(
                    f"secret key #{index} must be at least {MIN_SECRET_LENGTH} characters"
                )
            keys.append(_Key(value))
        self._keys: tuple[_Key, ...] = tuple(keys)

    def __repr__(self) -> str:
        return f"SessionCipher(keys={len(self._keys)})"

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """Encrypt with the first (current) key, binding the result to ``aad``."""
        key = self._keys[0]
        header = bytes([_VERSION]) + key.key_id
        nonce = os.urandom(_NONCE_SIZE)
        return header + nonce + key.aead.encrypt(nonce, plaintext, header + aad)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        """Decrypt a blob from :meth:`encrypt` under any configured key; else DecryptionFailed."""
        if len(blob) < _MIN_BLOB or blob[0] != _VERSION:
            raise DecryptionFailed("not a ciphertext of a supported version")
        header = blob[:_HEADER_SIZE]
        key_id = header[1:]
        nonce = blob[_HEADER_SIZE : _HEADER_SIZE + _NONCE_SIZE]
        body = blob[_HEADER_SIZE + _NONCE_SIZE :]
        # The matching id first; the others only in case two 4-byte ids collide.
        candidates = sorted(self._keys, key=lambda k: k.key_id != key_id)
        for key in candidates:
            try:
                return key.aead.decrypt(nonce, body, header + aad)
            except InvalidTag:
                continue
        raise DecryptionFailed("tampered data, wrong aad or unknown key")

    def sign(self, data: bytes) -> str:
        """An unpadded base64url HMAC-SHA256 of ``data`` under the first key."""
        return _mac(self._keys[0], data)

    def verify(self, data: bytes, signature: str) -> bool:
        """Whether ``signature`` is :meth:`sign` of ``data`` under any configured key."""
        if not isinstance(signature, str) or not signature.isascii():
            return False
        valid = False
        for key in self._keys:
            # Check every key (no early exit) so timing does not reveal which key matched.
            valid |= hmac.compare_digest(_mac(key, data), signature)
        return valid


def _mac(key: _Key, data: bytes) -> str:
    digest = hmac.new(key.signing_key, data, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
