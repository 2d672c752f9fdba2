"""An upstream's ``WWW-Authenticate`` challenge, read for what the gateway acts on. Pure.

Two answers of a resource server change what the gateway does with a ``401``:

* ``Bearer error="invalid_token"`` (RFC 6750 §3.1): the token was revoked or expired early;
  the gateway drops it, mints another and sends the request once more (when it can);
* ``Bearer error="insufficient_user_authentication"`` with ``acr_values`` / ``max_age``
  (RFC 9470 §3): the user must log in again, more strongly; the gateway answers
  ``401 step_up_required`` with a login URL asking for exactly that.

The parser follows RFC 9110 §11.6.1 (a scheme, then ``name=token`` or ``name="quoted"``
parameters, several challenges separated by commas) and reads only the ``Bearer`` challenge.
Anything it cannot parse yields no challenge: the upstream's answer then passes as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .settings import check_acr_value

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:({_TOKEN})|"((?:[^"\\]|\\.)*)")\s*(,|$)', re.ASCII)
# A scheme ends at a space, at the comma of a challenge without parameters, or at the end.
_SCHEME = re.compile(rf"\s*({_TOKEN})(?=[\s,]|$)\s*", re.ASCII)
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*\s*(,|$)", re.ASCII)
_MAX_HEADER = 4096
_MAX_AGE_LIMIT = 10 * 365 * 86400


@dataclass(frozen=True, slots=True)
class BearerChallenge:
    error: str | None
    acr_values: tuple[str, ...] = ()
    max_age: int | None = None

    @property
    def invalid_token(self) -> bool:
        return self.error == "invalid_token"

    @property
    def step_up(self) -> bool:
        """An RFC 9470 challenge naming what it wants: one without ``acr_values`` or
        ``max_age`` would send the user through a login that changes nothing (and, with a
        session at the IdP, straight back), so it is relayed as the upstream's own 401."""
        return self.error == "insufficient_user_authentication" and bool(
            self.acr_values or self.max_age is not None
        )


def _challenges(value: str) -> Iterable[tuple[str, dict[str, str]]]:
    """(scheme, params) of each challenge in one header value."""
    pos = 0
    while pos < len(value):
        scheme = _SCHEME.match(value, pos)
        if scheme is None:
            return
        pos = scheme.end()
        params: dict[str, str] = {}
        token68 = _TOKEN68.match(value, pos)  # Negotiate <token68>: no parameters
        if token68 is not None:
            pos = token68.end()
        while token68 is None and pos < len(value):
            param = _PARAM.match(value, pos)
            if param is None:
                break
            name, bare, quoted, _sep = param.groups()
            params.setdefault(
                name.lower(), bare if bare is not None else re.sub(r"\\(.)", r"\1", quoted)
            )
            pos = param.end()
        yield scheme.group(1).lower(), params
        if pos < len(value) and value[pos] == ",":
            pos += 1


def bearer_challenge(values: Iterable[str]) -> BearerChallenge | None:
    """The Bearer challenge among ``WWW-Authenticate`` header values, or None."""
    for value in values:
        if len(value) > _MAX_HEADER:
            continue
        for scheme, params in _challenges(value):
            if scheme != "bearer":
                continue
            acr_values: tuple[str, ...] = ()
            try:
                acr_values = tuple(
                    check_acr_value(v) for v in params.get("acr_values", "").split()[:16]
                )
            except ValueError:
                acr_values = ()
            max_age: int | None = None
            raw_age = params.get("max_age", "")
            if raw_age.isascii() and raw_age.isdigit() and len(raw_age) <= 10:
                max_age = min(int(raw_age), _MAX_AGE_LIMIT)
            return BearerChallenge(params.get("error"), acr_values, max_age)
    return None
