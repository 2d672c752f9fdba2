"""ClientCache: the races of client-side caching, without Redis (time.monotonic only)."""

from __future__ import annotations

import time

import pytest

from gateway.sessions._client_cache import MISS, ClientCache


def live(maxsize: int = 8) -> ClientCache:
    cache = ClientCache(maxsize)
    cache.valid_until = time.monotonic() + 3600
    return cache


def test_client_cache_read_is_kept_and_served() -> None:
    cache = live()
    ticket = cache.begin("k")
    cache.finish("k", ticket, "v1")
    assert cache.get("k") == "v1"


def test_client_cache_absent_key_is_a_value() -> None:
    cache = live()
    cache.finish("k", cache.begin("k"), None)
    assert cache.get("k") is None


def test_client_cache_read_racing_an_invalidation_is_not_kept() -> None:
    cache = live()
    ticket = cache.begin("k")
    cache.invalidate(["k"])  # the write happened while the read was in flight
    cache.finish("k", ticket, "maybe-old")
    assert cache.get("k") is MISS
    cache.finish("k", cache.begin("k"), "new")  # the next read is kept again
    assert cache.get("k") == "new"


def test_client_cache_read_begun_before_tracking_was_confirmed_is_not_kept() -> None:
    cache = ClientCache(8)
    ticket = cache.begin("k")
    cache.valid_until = time.monotonic() + 3600
    cache.finish("k", ticket, "v")
    assert cache.get("k") is MISS


def test_client_cache_reset_drops_everything_and_reads_in_flight() -> None:
    cache = live()
    cache.finish("a", cache.begin("a"), "va")
    ticket = cache.begin("b")
    cache.reset()
    cache.valid_until = time.monotonic() + 3600  # tracking came back
    cache.finish("b", ticket, "vb")
    assert cache.get("a") is MISS and cache.get("b") is MISS


def test_client_cache_serves_nothing_past_its_lease() -> None:
    cache = live()
    cache.finish("k", cache.begin("k"), "v")
    cache.valid_until = time.monotonic() - 1
    assert cache.get("k") is MISS


def test_client_cache_is_bounded_least_recently_used_out() -> None:
    cache = live(maxsize=2)
    for key in ("a", "b"):
        cache.finish(key, cache.begin(key), key)
    assert cache.get("a") == "a"  # "b" is now the least recently used
    cache.finish("c", cache.begin("c"), "c")
    assert [cache.get(k) for k in "abc"] == ["a", MISS, "c"]


def test_client_cache_size_zero_keeps_nothing() -> None:
    cache = ClientCache(0)
    cache.valid_until = time.monotonic() + 3600
    cache.finish("k", cache.begin("k"), "v")
    assert cache.get("k") is MISS and len(cache) == 0


def test_client_cache_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        ClientCache(-1)
