"""The IdP's Retry-After: read once, capped once (RFC 9110 §10.2.3)."""

from __future__ import annotations

import math

import pytest

from gateway.retry_after import (
    DEFAULT_RETRY_AFTER,
    MAX_RETRY_AFTER,
    cap_retry_after,
    parse_retry_after,
)

NOW = 1_767_225_600.0  # Thu, 01 Jan 2026 00:00:00 GMT

RETRY_AFTER_VALUES: dict[str, tuple[str | None, int]] = {
    "absent": (None, DEFAULT_RETRY_AFTER),
    "empty": ("", DEFAULT_RETRY_AFTER),
    "seconds": ("7", 7),
    "seconds_padded": (" 7 ", 7),
    "zero": ("0", 1),
    "at_the_cap": ("60", MAX_RETRY_AFTER),
    "over_the_cap": ("3600", MAX_RETRY_AFTER),
    "huge": ("99999999999", MAX_RETRY_AFTER),
    "5000_digits": ("9" * 5000, MAX_RETRY_AFTER),  # int() would raise ValueError on this
    "negative": ("-5", DEFAULT_RETRY_AFTER),
    "fraction": ("1.5", DEFAULT_RETRY_AFTER),
    "garbage": ("soon", DEFAULT_RETRY_AFTER),
    "non_ascii_digits": ("\u0663\u0660", DEFAULT_RETRY_AFTER),  # Arabic-Indic "30"
    "http_date_in_20s": ("Thu, 01 Jan 2026 00:00:20 GMT", 20),
    "http_date_past": ("Wed, 31 Dec 2025 23:00:00 GMT", 1),
    "http_date_far_future": ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
    "http_date_bad_month": ("Thu, 01 Foo 2026 00:00:20 GMT", DEFAULT_RETRY_AFTER),
    "long_garbage": ("Thu, " * 100, DEFAULT_RETRY_AFTER),
}


@pytest.mark.parametrize("case", sorted(RETRY_AFTER_VALUES))
def test_parse_retry_after_reads_and_caps(case: str) -> None:
    value, expected = RETRY_AFTER_VALUES[case]
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.2, 1), (1.0, 1), (1.01, 2), (59.5, 60), (61.0, 60), (math.inf, 60), (math.nan, 5)],
)
def test_cap_retry_after_rounds_up_into_range(seconds: float, expected: int) -> None:
    assert cap_retry_after(seconds) == expected
