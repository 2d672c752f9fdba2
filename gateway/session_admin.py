"""Sessions an operator can see and end, and a user's own "log out everywhere".

The admin API (``admin.py``), ``gateway sessions list|revoke`` (``cli.py``), ``POST
/auth/logout`` with ``{"everywhere": true}`` and ``session.max_per_user`` all end sessions
here, the one way a session ends (``Services.end_session``): deleted with its cached tokens,
its refresh token revoked at the IdP, its WebSockets and streams closed on every instance.

What an operator sees of a session is its *handle*: a hash of the store key (itself a hash of
the cookie's secret), never a token or the cookie; with it one session of a user can be ended.
Each action is counted (``gateway_session_actions``) and logged with the user as the access log
shows it (a keyed hash by default), never with a secret.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .metrics import GatewayMetrics
from .sessions.base import Session, SessionStore

logger = logging.getLogger("gateway.admin")

EndSession = Callable[..., Awaitable[Session | None]]
DescribeUser = Callable[[str], str | None]


def session_handle(session_id: str) -> str:
    """What the admin API shows for a session: 16 hex characters of SHA-256 of its store key."""
    return hashlib.sha256(b"mrrt-gateway session handle v1 " + session_id.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session as an operator sees it."""

    handle: str
    created_at: float
    last_seen: float
    expires_at: float  # the earlier of the idle and the absolute expiry
    user_agent: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.handle,
            "created_at": int(self.created_at),
            "last_seen": int(self.last_seen),
            "expires_at": int(self.expires_at),
            "user_agent": self.user_agent,
        }


class SessionAdmin:
    """Lists and ends sessions by user (``sub``), IdP session (``sid``) or handle."""

    def __init__(
        self,
        *,
        store: SessionStore,
        end_session: EndSession,
        metrics: GatewayMetrics,
        idle_timeout: float,
        max_per_user: int = 0,
        describe_user: DescribeUser = lambda _sub: None,
    ) -> None:
        self._store = store
        self._end_session = end_session  # Services.end_session
        self._metrics = metrics
        self._idle_timeout = idle_timeout
        self.max_per_user = max_per_user
        self._describe_user = describe_user

    async def sessions_of(self, sub: str) -> list[Session]:
        """The user's live sessions, oldest first."""
        found: list[Session] = []
        for session_id in await self._store.find(sub=sub):
            session = await self._store.load(session_id)
            if session is not None and session.sub == sub:
                found.append(session)
        found.sort(key=lambda s: (s.created_at, s.id))
        return found

    async def list_sessions(self, sub: str) -> list[SessionInfo]:
        """What an operator sees of a user's sessions (counted as the ``list`` action)."""
        sessions = await self.sessions_of(sub)
        self._metrics.session_action("list")
        logger.info(
            "admin listed %d session(s)",
            len(sessions),
            extra={"action": "list", "user": self._describe_user(sub)},
        )
        return [self._info(s) for s in sessions]

    async def revoke(
        self, *, sub: str | None = None, sid: str | None = None, handle: str | None = None
    ) -> int:
        """End the sessions of ``sub`` (only the one of ``handle`` when given) or of the IdP
        session ``sid``, everywhere; return how many ended."""
        if sid is not None:
            ids = await self._store.find(sub=sub, sid=sid)
        elif sub is not None:
            ids = [s.id for s in await self.sessions_of(sub)]
        else:
            raise ValueError("revoke needs sub or sid")
        if handle is not None:
            ids = [i for i in ids if session_handle(i) == handle]
        ended = await self._end(ids)
        self._record("revoke", ended, sub)
        return ended

    async def logout_everywhere(self, session: Session) -> int:
        """End every session of ``session``'s user except ``session`` itself (the caller ends
        that one as a plain logout, for its RP-initiated logout URL); return how many ended."""
        ids = [s.id for s in await self.sessions_of(session.sub) if s.id != session.id]
        ended = await self._end(ids)
        self._record("logout_everywhere", ended, session.sub)
        return ended

    async def enforce_limit(self, new: Session) -> int:
        """After a login: end the user's oldest sessions past ``max_per_user`` (never ``new``)."""
        limit = self.max_per_user
        if limit <= 0:
            return 0
        sessions = [s for s in await self.sessions_of(new.sub) if s.id != new.id]
        excess = len(sessions) + 1 - limit
        if excess <= 0:
            return 0
        ended = await self._end([s.id for s in sessions[:excess]])
        self._record("max_per_user", ended, new.sub)
        return ended

    async def _end(self, ids: list[str]) -> int:
        ended = 0
        for session_id in ids:
            if await self._end_session(session_id, revoke=True) is not None:
                ended += 1
        return ended

    def _record(self, action: str, ended: int, sub: str | None) -> None:
        self._metrics.session_action(action, ended)
        logger.info(
            "%s ended %d session(s)",
            action,
            ended,
            extra={"action": action, "user": self._describe_user(sub) if sub else None},
        )

    def _info(self, session: Session) -> SessionInfo:
        last_seen = session.last_seen or session.created_at
        return SessionInfo(
            handle=session_handle(session.id),
            created_at=session.created_at,
            last_seen=last_seen,
            expires_at=min(last_seen + self._idle_timeout, session.absolute_expiry),
            user_agent=session.user_agent or "other",
        )
