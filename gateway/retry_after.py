"""The IdP's ``Retry-After`` (RFC 9110 §10.2.3), read and capped in one place.

Whatever the IdP asks for, the gateway waits at most ``MAX_RETRY_AFTER`` seconds before it
asks again, and tells its own clients no more than that either: a huge or malformed value
(``Retry-After: 99999999999``, an HTTP-date in the year 9999, 5,000 digits) must neither stop
token exchanges for hours nor raise while being parsed.
"""

from __future__ import annotations

import math
import time
from email.utils import mktime_tz, parsedate_tz

MAX_RETRY_AFTER = 60
DEFAULT_RETRY_AFTER = 5
_MAX_DIGITS = 9  # more than any cap: compared as text, never handed to int() unbounded


def cap_retry_after(seconds: float) -> int:
    """``seconds`` rounded up into [1, MAX_RETRY_AFTER]."""
    if math.isnan(seconds):
        return DEFAULT_RETRY_AFTER
    return max(1, min(MAX_RETRY_AFTER, math.ceil(min(seconds, MAX_RETRY_AFTER))))


def parse_retry_after(
    value: str | None, *, default: int = DEFAULT_RETRY_AFTER, now: float | None = None
) -> int:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP-date), capped by
    :func:`cap_retry_after`; ``default`` when it is absent or unreadable."""
    if not value:
        return cap_retry_after(default)
    value = value.strip()
    if value.isascii() and value.isdigit():
        return cap_retry_after(MAX_RETRY_AFTER if len(value) > _MAX_DIGITS else int(value))
    parsed = parsedate_tz(value) if len(value) <= 64 else None
    if parsed is None:
        return cap_retry_after(default)
    try:
        at = float(mktime_tz(parsed))
    except (OverflowError, ValueError):
        return cap_retry_after(default)
    return cap_retry_after(at - (time.time() if now is None else now))
