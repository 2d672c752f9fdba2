"""SessionCache: decoded sessions keyed by (Redis key, exact blob), bounded, handing out copies.

The Redis store's use of it (against a real Redis) is in test_redis_store.py.
"""

from __future__ import annotations

import time
from dataclasses import fields

import pytest

from gateway.sessions import Session
from gateway.sessions._session_cache import SessionCache

from .fakes import scribble_on

KEY = "gw:sess:abc"
BLOB = b"\x01ciphertext-one"
OTHER_BLOB = b"\x01ciphertext-two"


def make_session(**overrides: object) -> Session:
    now = time.time()
    fields: dict[str, object] = {
        "id": "abc",
        "sub": "auth0|alice",
        "sid": "idp-sid",
        "refresh_token": "RT-secret-refresh-token",
        "id_token": "eyJ.id-token.sig",
        "created_at": now,
        "absolute_expiry": now + 3600,
        "claims": {"email": "alice@example.com", "roles": ["admin"]},
        "last_seen": now,
    }
    fields.update(overrides)
    return Session(**fields)  # type: ignore[arg-type]


class Decoder:
    """Stands in for decrypt + parse: one Session per blob, and a count of calls."""

    def __init__(self, by_blob: dict[bytes, Session | None]) -> None:
        self.by_blob = by_blob
        self.calls: list[tuple[str, bytes]] = []

    def __call__(self, key: str, blob: bytes) -> Session | None:
        self.calls.append((key, blob))
        session = self.by_blob[blob]
        # A fresh object per decode, as Session.from_json gives.
        return None if session is None else Session.from_json(session.to_json())


def as_dict(session: Session) -> dict[str, object]:
    return {f.name: getattr(session, f.name) for f in fields(Session)}


def test_session_cache_unchanged_blob_is_decoded_once() -> None:
    original = make_session()
    decode = Decoder({BLOB: original})
    cache = SessionCache(8)
    first = cache.open(KEY, BLOB, decode)
    second = cache.open(KEY, bytes(BLOB), decode)  # an equal blob, another bytes object
    assert len(decode.calls) == 1
    assert first is not None and second is not None and first is not second
    assert as_dict(first) == as_dict(second) == as_dict(original)


def test_session_cache_changed_blob_is_decoded_again_and_replaces_the_entry() -> None:
    rotated = make_session(refresh_token="RT-rotated", rt_version=1)
    decode = Decoder({BLOB: make_session(), OTHER_BLOB: rotated})
    cache = SessionCache(8)
    cache.open(KEY, BLOB, decode)
    changed = cache.open(KEY, OTHER_BLOB, decode)
    assert changed is not None and changed.refresh_token == "RT-rotated"
    assert changed.rt_version == 1
    assert len(cache) == 1 and len(decode.calls) == 2
    again = cache.open(KEY, OTHER_BLOB, decode)
    assert again is not None and again.refresh_token == "RT-rotated"
    assert len(decode.calls) == 2


def test_session_cache_same_blob_under_another_key_is_decoded_for_that_key() -> None:
    # The key is the AES-GCM associated data: a blob moved to another key must not be served
    # from the first key's entry (there, its decode fails).
    decode = Decoder({BLOB: make_session()})
    cache = SessionCache(8)
    assert cache.open(KEY, BLOB, decode) is not None
    decode.by_blob[BLOB] = None
    assert cache.open("gw:sess:other", BLOB, decode) is None
    assert decode.calls[-1] == ("gw:sess:other", BLOB)


def test_session_cache_failed_decode_is_not_cached_and_drops_the_old_entry() -> None:
    decode = Decoder({BLOB: make_session(), OTHER_BLOB: None})
    cache = SessionCache(8)
    cache.open(KEY, BLOB, decode)
    assert cache.open(KEY, OTHER_BLOB, decode) is None
    assert len(cache) == 0
    assert cache.open(KEY, OTHER_BLOB, decode) is None
    assert len(decode.calls) == 3


def test_session_cache_evicts_the_least_recently_used_past_maxsize() -> None:
    blobs = {f"blob-{n}".encode(): make_session(id=f"s{n}") for n in range(4)}
    decode = Decoder(dict(blobs))
    cache = SessionCache(3)
    for n in range(3):
        cache.open(f"k{n}", f"blob-{n}".encode(), decode)
    cache.open("k0", b"blob-0", decode)  # k0 used again: k1 is now the oldest
    cache.open("k3", b"blob-3", decode)
    assert len(cache) == 3
    assert len(decode.calls) == 4
    for n in (0, 2, 3):  # still cached: no decode
        cache.open(f"k{n}", f"blob-{n}".encode(), decode)
    assert len(decode.calls) == 4
    cache.open("k1", b"blob-1", decode)  # evicted: decoded again
    assert len(decode.calls) == 5 and len(cache) == 3


def test_session_cache_stays_bounded_under_many_sessions() -> None:
    decode = Decoder({BLOB: make_session()})
    cache = SessionCache(100)
    for n in range(10_000):
        cache.open(f"k{n}", BLOB, decode)
    assert len(cache) == 100


def test_session_cache_copies_do_not_share_what_a_caller_may_change() -> None:
    decode = Decoder({BLOB: make_session()})
    cache = SessionCache(8)
    missed = cache.open(KEY, BLOB, decode)
    hit = cache.open(KEY, BLOB, decode)
    assert missed is not None and hit is not None
    expected = as_dict(missed)
    expected["claims"] = dict(missed.claims)
    for mine in (missed, hit):  # a copy from a decode or from the cache: neither may leak
        scribble_on(mine)
    later = cache.open(KEY, BLOB, decode)
    assert later is not None and as_dict(later) == expected
    assert len(decode.calls) == 1


def test_session_cache_copy_keeps_every_field() -> None:
    # copy_session names each field (3x faster than a generic copy): a new Session field must be
    # added there too, or copies would silently fall back to its default.
    assert {f.name for f in fields(Session)} == {
        "id",
        "sub",
        "refresh_token",
        "created_at",
        "absolute_expiry",
        "sid",
        "id_token",
        "claims",
        "last_seen",
        "rt_version",
        "dpop_jwk",
        "user_agent",
    }
    original = make_session(rt_version=4, last_seen=12.5, user_agent="Firefox")
    decode = Decoder({BLOB: original})
    cache = SessionCache(8)
    for _ in range(2):  # decoded, then cached
        copied = cache.open(KEY, BLOB, decode)
        assert copied is not None and as_dict(copied) == as_dict(original)


def test_session_cache_remember_false_looks_up_without_adding() -> None:
    decode = Decoder({BLOB: make_session()})
    cache = SessionCache(8)
    assert cache.open(KEY, BLOB, decode, remember=False) is not None
    assert len(cache) == 0
    cache.open(KEY, BLOB, decode)
    assert cache.open(KEY, BLOB, decode, remember=False) is not None
    assert len(decode.calls) == 2


def test_session_cache_discard_and_clear_forget_entries() -> None:
    decode = Decoder({BLOB: make_session()})
    cache = SessionCache(8)
    cache.open(KEY, BLOB, decode)
    cache.open("gw:sess:two", BLOB, decode)
    cache.discard(KEY)
    cache.discard("never-cached")
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_session_cache_maxsize_zero_decodes_every_time() -> None:
    decode = Decoder({BLOB: make_session()})
    cache = SessionCache(0)
    for _ in range(3):
        assert cache.open(KEY, BLOB, decode) is not None
    assert len(decode.calls) == 3 and len(cache) == 0


def test_session_cache_negative_maxsize_is_refused() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        SessionCache(-1)


def test_session_cache_repr_shows_no_session_data() -> None:
    decode = Decoder({BLOB: make_session()})
    cache = SessionCache(8)
    cache.open(KEY, BLOB, decode)
    text = repr(cache)
    assert text == "SessionCache(size=1, maxsize=8)"
    assert "RT-secret" not in text and KEY not in text
