"""SessionCipher: AES-256-GCM at rest and HMAC-SHA256 signatures, with key rotation."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from gateway.crypto import DecryptionFailed, SessionCipher

OLD_KEY = "old-secret-0123456789abcdefghijklmnopqrstuvwxyz"
NEW_KEY = "new-secret-0123456789abcdefghijklmnopqrstuvwxyz"
AAD = b"gw:sess:abc"
PLAINTEXT = b'{"refresh_token":"rt-secret"}'
HEADER = 1 + 4  # version byte + key id
NONCE = 12


def flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def test_cipher_encrypt_then_decrypt_roundtrips() -> None:
    cipher = SessionCipher([NEW_KEY])
    blob = cipher.encrypt(PLAINTEXT, aad=AAD)
    assert cipher.decrypt(blob, aad=AAD) == PLAINTEXT
    assert b"rt-secret" not in blob
    assert len(blob) == HEADER + NONCE + len(PLAINTEXT) + 16
    assert blob[0] == 1


def test_cipher_encrypt_uses_a_fresh_nonce_each_time() -> None:
    cipher = SessionCipher([NEW_KEY])
    first, second = (cipher.encrypt(PLAINTEXT, aad=AAD) for _ in range(2))
    assert first[:HEADER] == second[:HEADER]  # same version and key id
    assert first[HEADER : HEADER + NONCE] != second[HEADER : HEADER + NONCE]


def test_cipher_accepts_secret_str_keys() -> None:
    plain = SessionCipher([NEW_KEY]).encrypt(PLAINTEXT, aad=AAD)
    assert SessionCipher([SecretStr(NEW_KEY)]).decrypt(plain, aad=AAD) == PLAINTEXT


TAMPER_POSITIONS = {
    "version": 0,
    "key_id": 1,
    "nonce": HEADER,
    "ciphertext": HEADER + NONCE,
    "tag": -1,
}


@pytest.mark.parametrize("where", sorted(TAMPER_POSITIONS))
def test_cipher_decrypt_tampered_blob_fails(where: str) -> None:
    cipher = SessionCipher([NEW_KEY])
    blob = cipher.encrypt(PLAINTEXT, aad=AAD)
    index = TAMPER_POSITIONS[where] % len(blob)
    with pytest.raises(DecryptionFailed):
        cipher.decrypt(flip(blob, index), aad=AAD)


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01" + b"\x00" * 31, b"not a blob at all" * 4])
def test_cipher_decrypt_garbage_fails(blob: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        SessionCipher([NEW_KEY]).decrypt(blob, aad=AAD)


def test_cipher_decrypt_with_another_aad_fails() -> None:
    cipher = SessionCipher([NEW_KEY])
    blob = cipher.encrypt(PLAINTEXT, aad=b"gw:sess:victim")
    with pytest.raises(DecryptionFailed):
        cipher.decrypt(blob, aad=b"gw:sess:attacker")


def test_cipher_decrypt_with_unknown_key_fails() -> None:
    blob = SessionCipher([OLD_KEY]).encrypt(PLAINTEXT, aad=AAD)
    with pytest.raises(DecryptionFailed):
        SessionCipher([NEW_KEY]).decrypt(blob, aad=AAD)


def test_cipher_rotation_reads_old_data_and_writes_with_the_new_key() -> None:
    old = SessionCipher([OLD_KEY])
    rotated = SessionCipher([NEW_KEY, OLD_KEY])
    new_only = SessionCipher([NEW_KEY])
    written_before = old.encrypt(PLAINTEXT, aad=AAD)
    assert rotated.decrypt(written_before, aad=AAD) == PLAINTEXT
    written_after = rotated.encrypt(PLAINTEXT, aad=AAD)
    assert written_after[1:HEADER] == new_only.encrypt(b"", aad=b"")[1:HEADER]
    assert new_only.decrypt(written_after, aad=AAD) == PLAINTEXT
    with pytest.raises(DecryptionFailed):
        old.decrypt(written_after, aad=AAD)


def test_cipher_keys_differ_per_secret() -> None:
    old_id = SessionCipher([OLD_KEY]).encrypt(b"", aad=b"")[1:HEADER]
    new_id = SessionCipher([NEW_KEY]).encrypt(b"", aad=b"")[1:HEADER]
    assert old_id != new_id


def test_cipher_sign_then_verify() -> None:
    cipher = SessionCipher([NEW_KEY])
    signature = cipher.sign(b"cookie-token")
    assert cipher.verify(b"cookie-token", signature)
    assert not cipher.verify(b"cookie-tokeN", signature)
    assert "=" not in signature and len(signature) == 43  # unpadded base64url of 32 bytes


def test_cipher_signing_key_is_not_the_encryption_key() -> None:
    # Two purposes, two HKDF labels: a signature is not derivable from the AES key id.
    cipher = SessionCipher([NEW_KEY])
    assert cipher.sign(b"") != SessionCipher([OLD_KEY]).sign(b"")


def test_cipher_verify_accepts_signatures_of_every_configured_key() -> None:
    old_signature = SessionCipher([OLD_KEY]).sign(b"data")
    rotated = SessionCipher([NEW_KEY, OLD_KEY])
    assert rotated.verify(b"data", old_signature)
    assert rotated.sign(b"data") == SessionCipher([NEW_KEY]).sign(b"data")
    assert not SessionCipher([NEW_KEY]).verify(b"data", old_signature)


GARBAGE_SIGNATURES = {
    "empty": "",
    "short": "abc",
    "padded": SessionCipher([NEW_KEY]).sign(b"data") + "=",
    "non_ascii": "é" * 43,
    "not_base64": "!" * 43,
    "whitespace": " " + SessionCipher([NEW_KEY]).sign(b"data"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE_SIGNATURES))
def test_cipher_verify_rejects_garbage(name: str) -> None:
    assert not SessionCipher([NEW_KEY]).verify(b"data", GARBAGE_SIGNATURES[name])


def test_cipher_repr_shows_no_secret() -> None:
    cipher = SessionCipher([NEW_KEY, OLD_KEY])
    assert repr(cipher) == "SessionCipher(keys=2)"
    assert NEW_KEY not in repr(cipher) and OLD_KEY not in repr(cipher)


@pytest.mark.parametrize(
    ("secrets", "error"),
    [([], ValueError), (["too-short"], ValueError), ([NEW_KEY, "short"], ValueError)],
    ids=["none", "short", "second_short"],
)
def test_cipher_rejects_missing_or_short_keys(secrets: list[str], error: type[Exception]) -> None:
    with pytest.raises(error):
        SessionCipher(secrets)


def test_cipher_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        SessionCipher(NEW_KEY)
