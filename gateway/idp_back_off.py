"""When the gateway stops asking the IdP's token endpoint for a while.

One object for both kinds of exchange (a session's refresh grant, the gateway's client
credentials): they go to the same endpoint, so a failure either of them meets holds both back.

* A failure of the IdP itself (unreachable, timed out, 5xx) stops every exchange until its
  ``Retry-After`` (capped, ``retry_after.py``) has passed: queued requests answer 503, or use a
  token that is still valid, instead of each timing out in turn.
* A 429 refuses what was asked, not everybody (review item 5): only the exchanges of that one
  subject (a session, or the gateway's own client) for that audience wait it out.

A back-off is recorded from the IdP's own answers only: a 503 raised *because* of a back-off
must not be recorded again, or it would renew itself and never end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from cachetools import TLRUCache

from .errors import IdentityProviderRateLimited, IdentityProviderUnavailable
from .retry_after import cap_retry_after

CLIENT = ""  # the subject of the gateway's own client-credentials exchanges (no session id)
_LIMITED_MAX = 10_000  # (subject, audience) pairs waiting out a 429, oldest out first


class IdpBackOff:
    """The IdP-wide back-off and the 429s per (subject, audience)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._down_until = 0.0
        self._down_message = ""
        # Value: (until, message); an entry lives until its own ``until``.
        self._limited: TLRUCache[tuple[str, str], tuple[float, str]] = TLRUCache(
            maxsize=_LIMITED_MAX, ttu=lambda _k, value, _now: value[0], timer=clock
        )

    def refusal(
        self, subject: str, audience: str, now: float
    ) -> IdentityProviderUnavailable | None:
        """The 503 to answer instead of asking the IdP, while a back-off covers this exchange;
        record nothing from it (see the module docstring)."""
        if now < self._down_until:
            return IdentityProviderUnavailable(
                self._down_message, retry_after=math.ceil(self._down_until - now)
            )
        limited = self._limited.get((subject, audience))
        if limited is not None and now < limited[0]:
            return IdentityProviderRateLimited(limited[1], retry_after=math.ceil(limited[0] - now))
        return None

    def record(
        self, exc: IdentityProviderUnavailable, subject: str, audience: str, now: float
    ) -> None:
        """The IdP's answer ``exc`` to this exchange: a 429 holds back this subject's
        exchanges for this audience, anything else every exchange."""
        until = now + cap_retry_after(exc.retry_after)
        if isinstance(exc, IdentityProviderRateLimited):
            self._limited[(subject, audience)] = (until, exc.message)
            return
        self._down_until = max(self._down_until, until)
        self._down_message = exc.message
