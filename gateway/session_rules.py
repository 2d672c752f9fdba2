"""What a session must show to use a route: claim rules and step-up. Pure.

A route's ``require:`` names claims (``roles``, ``app_metadata.plan`` for nesting, or a URI
such as ``https://example.com/roles``) and the values it accepts: one value, or a list meaning
"any of". A list-valued claim matches when it holds one of the values. Every rule must hold.

Step-up (``acr_values``, ``max_age``) asks how the user authenticated: the session's ``acr``
must be one of the route's, and its ``auth_time`` no older than ``max_age``. A session that
fails a claim rule is forbidden (logging in again would not change who the user is); one that
fails step-up may log in again, more strongly.

Values compare by type as well as value: ``true`` never matches ``1`` nor ``"true"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeGuard

from .settings import ClaimValue, RouteSettings

_MISSING = object()


class Verdict(Enum):
    ALLOWED = "allowed"
    FORBIDDEN = "forbidden"
    STEP_UP_REQUIRED = "step_up_required"


def claim_value(claims: Mapping[str, Any], name: str) -> Any:
    """The claim ``name``: a top-level claim of that exact name first (URIs contain dots),
    else the dotted path into nested objects; ``_MISSING`` when there is none. A URI names
    one claim, never a path (``https://example.com/roles`` is not ``com/roles`` inside a
    claim ``https://example``)."""
    if name in claims:
        return claims[name]
    if "." not in name or "://" in name:
        return _MISSING
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _same(have: object, want: ClaimValue) -> bool:
    if isinstance(want, bool) or isinstance(have, bool):
        return type(have) is type(want) and have == want
    if isinstance(want, str) or isinstance(have, str):
        return isinstance(have, str) and isinstance(want, str) and have == want
    return isinstance(have, int | float) and have == want


def _matches(have: object, wanted: tuple[ClaimValue, ...]) -> bool:
    if isinstance(have, list):
        return any(_same(item, want) for item in have for want in wanted)
    return any(_same(have, want) for want in wanted)


@dataclass(frozen=True, slots=True)
class SessionRules:
    """A route's claim rules and step-up, compiled once per route."""

    require: tuple[tuple[str, tuple[ClaimValue, ...]], ...] = ()
    acr_values: tuple[str, ...] = ()
    max_age: float | None = None

    @classmethod
    def of(cls, settings: RouteSettings) -> SessionRules:
        return cls(
            require=tuple(
                (name, tuple(want) if isinstance(want, list) else (want,))
                for name, want in settings.require.items()
            ),
            acr_values=tuple(settings.acr_values),
            max_age=settings.max_age,
        )

    @property
    def empty(self) -> bool:
        return not self.require and not self.acr_values and self.max_age is None

    def allows_claims(self, claims: Mapping[str, Any]) -> bool:
        """Every claim rule holds."""
        return all(_matches(claim_value(claims, name), wanted) for name, wanted in self.require)

    def authenticated_enough(self, claims: Mapping[str, Any], now: float) -> bool:
        """The session's ``acr`` and ``auth_time`` satisfy the route's step-up (fail closed:
        a missing or malformed claim does not)."""
        if self.acr_values and claims.get("acr") not in self.acr_values:
            return False
        if self.max_age is not None:
            auth_time = claims.get("auth_time")
            if not _is_time(auth_time):
                return False
            if now - auth_time > self.max_age:
                return False
        return True

    def verdict(self, claims: Mapping[str, Any], now: float) -> Verdict:
        if not self.allows_claims(claims):
            return Verdict.FORBIDDEN
        if not self.authenticated_enough(claims, now):
            return Verdict.STEP_UP_REQUIRED
        return Verdict.ALLOWED


def acr_satisfied(acr: object, asked: Sequence[str]) -> bool:
    """The callback's check: an ID token answering a login that asked for ``asked`` acr values
    carries one of them (nothing asked: anything goes)."""
    return not asked or (isinstance(acr, str) and acr in asked)


def auth_time_satisfied(
    auth_time: object, max_age: float | None, now: float, leeway: float
) -> bool:
    """The callback's check of ``auth_time`` against the ``max_age`` the login asked for."""
    if max_age is None:
        return True
    if not _is_time(auth_time):
        return False
    return now - auth_time <= max_age + leeway


def _is_time(value: object) -> TypeGuard[int | float]:
    """A number of seconds: not a bool, and finite (NaN and infinity compare as any age)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
