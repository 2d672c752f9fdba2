"""The session store contract, shared by every backend (one contract test suite runs on each).

A session is keyed by ``Session.id``: the SHA-256 of the secret value in the browser's cookie,
so a store (or a dump of it) never holds what it takes to impersonate the user.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from ..dpop import DPoPBound


class Claims(Mapping[str, Any]):
    """ID-token claims held as compact JSON.

    Every session keeps them, but only /auth/me and forward-auth's user headers read them: as
    a dict they cost ~770 bytes per session, as JSON ~370 (the memory store's 100,000 sessions
    fit the issue's 300 MiB with this). Each read decodes; nothing on the proxy path reads
    them.
    """

    __slots__ = ("_json",)

    def __init__(self, claims: Mapping[str, Any] | None = None) -> None:
        data = dict(claims) if claims else {}
        self._json = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    def to_dict(self) -> dict[str, Any]:
        """A fresh, mutable copy."""
        data: dict[str, Any] = json.loads(self._json)
        return data

    def __getitem__(self, name: str) -> Any:
        return self.to_dict()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __repr__(self) -> str:
        return f"Claims({len(self)} claims)"


@dataclass(slots=True)
class Session:
    """One logged-in browser: the refresh token lives here and nowhere else."""

    id: str
    sub: str
    refresh_token: str
    created_at: float
    absolute_expiry: float
    sid: str | None = None
    id_token: str | None = None
    # A dict, or Claims once a store compacts them (MemorySessionStore.save): read-only.
    claims: Mapping[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0
    # Bumped on every refresh-token rotation; lets a store refuse a stale write (fencing).
    rt_version: int = 0
    # The session's DPoP private key as a JWK (tokens.dpop): only ever in this record, which
    # the Redis store encrypts; None for a session without one (DPoP off, or an older record).
    dpop_jwk: dict[str, str] | None = None
    # The browser's family at login ("Firefox", "curl"...), for the session admin's list: a
    # short fixed name (user_agent.py), never the raw header.
    user_agent: str | None = None

    def __repr__(self) -> str:
        return f"Session(id={self.id[:8]}…, sub={self.sub!r}, rt_version={self.rt_version})"

    def is_expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.absolute_expiry

    def compact(self) -> None:
        """Hold the claims as :class:`Claims` from now on (idempotent)."""
        if not isinstance(self.claims, Claims):
            self.claims = Claims(self.claims)

    def claims_dict(self) -> dict[str, Any]:
        """The claims as a fresh dict (for JSON)."""
        claims = self.claims
        return claims.to_dict() if isinstance(claims, Claims) else dict(claims)

    def to_json(self) -> bytes:
        """The Redis store's format: keep these keys and JSON types across versions."""
        data = {
            "id": self.id,
            "sub": self.sub,
            "refresh_token": self.refresh_token,
            "created_at": self.created_at,
            "absolute_expiry": self.absolute_expiry,
            "sid": self.sid,
            "id_token": self.id_token,
            "claims": self.claims_dict(),
            "last_seen": self.last_seen,
            "rt_version": self.rt_version,
        }
        if self.dpop_jwk is not None:  # absent otherwise: the record stays as it was
            data["dpop_jwk"] = self.dpop_jwk
        # Only when known: a session without it stays byte for byte what earlier versions
        # wrote. (Those versions refuse a key they do not know: a session made with it is no
        # session to them; see CHANGELOG, rolling upgrades.)
        if self.user_agent is not None:
            data["user_agent"] = self.user_agent
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Session:
        data = json.loads(raw)
        # Keys of a later version are left out rather than refused (forward compatible).
        return cls(**{k: v for k, v in data.items() if k in _SESSION_FIELDS})


_SESSION_FIELDS = frozenset(f.name for f in fields(Session))


@dataclass(slots=True, frozen=True)
class CachedToken:
    """An access token minted for one (session, audience, scopes)."""

    access_token: str
    expires_at: float
    audience: str
    scope: str = ""
    issued_at: float = 0.0

    def __repr__(self) -> str:
        return f"CachedToken(audience={self.audience!r}, expires_at={self.expires_at:.0f})"

    def to_json(self) -> bytes:
        data = asdict(self)
        if type(self.access_token) is not str:  # a DPoP-bound token (gateway/dpop.py)
            data["token_type"] = "DPoP"
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> CachedToken:
        data = json.loads(raw)
        if data.pop("token_type", None) == "DPoP":  # the token goes upstream with a proof
            data["access_token"] = DPoPBound(data["access_token"])
        return cls(**data)


class _LoadLater:
    __slots__ = ()

    def __repr__(self) -> str:
        return "LOAD_LATER"


# ``load_now``'s answer when it cannot answer without IO: the caller awaits ``load`` instead.
LOAD_LATER = _LoadLater()


class SessionStore(Protocol):
    """Where sessions, pending logins and shared access tokens live.

    Ownership differs by backend, for speed: ``load`` may hand out the store's own ``Session``
    object (the memory store: no copy on every request) or a private copy (the Redis store
    decodes one). So a caller treats a loaded session as read-only, apart from
    ``last_seen`` (which ``touch`` and SessionManager set), changes a session by saving a new
    object (``dataclasses.replace(loaded, ...)``), and leaves an object alone once saved (the
    store may keep it, and may compact its claims). What every store guarantees, and
    tests/unit/test_session_stores.py checks: a later ``save`` or ``delete`` never changes a
    session already handed out.
    """

    idle_timeout: float

    async def save(self, session: Session) -> None:
        """Create or replace; expires at min(now + idle_timeout, absolute_expiry).

        A session with ``rt_version > 0`` (a rotated refresh token) only replaces one that
        still exists: if it was deleted meanwhile (logout during an exchange), raise
        SessionEnded rather than bring it back. A session with a lower ``rt_version`` than the
        stored one (an older refresh token) never replaces it: raise SessionStoreUnavailable.
        """

    async def load(self, session_id: str) -> Session | None:
        """The live session, or None when missing, idle-expired or past its absolute expiry.

        A store that can often answer without IO may also offer ``load_now(session_id)``: the
        same answer, not a coroutine, or LOAD_LATER when it would have to wait (the memory
        store never does; the Redis store on a miss of its tracked cache). SessionManager
        reads through it. A session from ``load_now`` may be shared with other requests:
        only ``last_seen`` is ever set on it (by SessionManager, before ``touch``).
        """

    async def touch(self, session: Session) -> None:
        """Slide the idle expiry (callers rate-limit this; see SessionManager)."""

    async def delete(self, session_id: str) -> Session | None:
        """Remove the session and its cached tokens; return what was removed."""

    async def find(self, *, sub: str | None = None, sid: str | None = None) -> list[str]:
        """Ids of live sessions with this OIDC ``sub`` and/or IdP session ``sid``."""

    def refresh_lock(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """Held around a refresh-token exchange: one exchange per session at a time.

        While it is held, ``load`` and ``get_token`` of that id read the store itself, never a
        cache that an invalidation may not have reached yet (the previous holder, maybe on
        another instance, may have just rotated the refresh token)."""

    async def get_token(self, session_id: str, key: str) -> CachedToken | None:
        """A shared cached access token, or None."""

    async def put_token(self, session_id: str, key: str, token: CachedToken) -> None:
        """Share an access token until it expires (or its session ends: a token of a session
        that is gone is not stored)."""

    async def get_client_token(self, key: str) -> CachedToken | None:
        """The gateway's shared client-credentials token under ``key`` (audience and
        scopes), or None. Client tokens belong to no session: ``refresh_lock("client:" +
        key digest)`` serialises their exchange across instances."""

    async def put_client_token(self, key: str, token: CachedToken) -> None:
        """Share a client-credentials token until it expires."""

    async def put_login(self, state: str, data: dict[str, Any], ttl: float) -> None:
        """Remember a pending login (PKCE verifier, nonce, return_to) under its state.

        Anyone can start a login, so the store keeps at most ``max_pending_logins`` of them
        (across instances for a shared store): past that, raise TooManyPendingLogins and keep
        the ones already pending (review item 6; evicting them would let a flood break real
        logins).
        """

    async def pop_login(self, state: str) -> dict[str, Any] | None:
        """Take a pending login out, once: a replayed state finds nothing."""

    async def remember_jti(self, jti: str, ttl: float) -> bool:
        """Record a back-channel logout token's ``jti`` for ``ttl`` seconds; True when it was
        not seen before (replay protection that holds across gateway instances)."""

    async def get_dpop_nonce(self, server: str) -> str | None:
        """The latest DPoP nonce (RFC 9449 §8, §9) a server (an origin) sent, or None."""

    async def put_dpop_nonce(self, server: str, nonce: str) -> None:
        """Share a server's newest DPoP nonce with every instance (kept for an hour)."""

    async def ping(self) -> None:
        """Raise SessionStoreUnavailable when the backend cannot answer."""

    async def close(self) -> None:
        """Release connections."""
