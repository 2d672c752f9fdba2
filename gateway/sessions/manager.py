"""SessionManager: from a request's cookie to a live Session, and back to a Set-Cookie.

The cookie carries ``<token>.<signature>``: 256 random bits plus an HMAC, so that garbage or
tampered cookies are refused before any store lookup. The store key is SHA-256(token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..crypto import SessionCipher
from ..security import (
    cookie_name,
    format_cookie,
    is_token_shaped,
    new_secret_token,
    read_cookie,
    session_id_for,
)
from ..settings import Settings
from .base import LOAD_LATER, Session, SessionStore, _LoadLater

_MAX_COOKIE_LEN = 256
LOGIN_TTL = 600  # a login must finish within this; its cookie and pending state expire
# Cookie headers already verified -> their session id (see ``session_id_from_cookie``).
_VERIFIED_MAX = 4096
_VERIFIED_HEADER_MAX = 2048


class SessionManager:
    """Reads, creates and ends sessions; owns the cookie format."""

    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        cipher: SessionCipher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self.store = store
        self._cipher = cipher
        self._clock = clock
        https = settings.is_https
        self._https = https
        self.cookie_name = cookie_name(settings.session.cookie_name, https=https)
        self.login_cookie_name = cookie_name(settings.session.cookie_name + "_login", https=https)
        self.cookie_names = frozenset({self.cookie_name, self.login_cookie_name})
        self.cookie_names_bytes = frozenset(n.encode() for n in self.cookie_names)
        # Sliding the idle expiry costs a store write; do it at most this often per session.
        self._touch_interval = min(60.0, settings.session.idle_timeout / 10)
        self._verified: dict[str, str] = {}
        # A store that answers without IO (the memory store, the Redis store's tracked cache)
        # is read without a coroutine. (``store`` is fixed after construction.)
        self._load_now: Callable[[str], Session | _LoadLater | None] | None = getattr(
            store, "load_now", None
        )

    # -- reading ----------------------------------------------------------------------------

    def session_id_from_cookie(self, cookie_header: str | None) -> str | None:
        """The store key named by a well-formed, correctly signed cookie, else None.

        A browser sends the same ``Cookie`` header on every request: the headers that passed
        the HMAC check are remembered with their session id (a bounded dict, oldest out
        first), which spares the hot path the parse, the HMAC and the SHA-256. Only a header
        that verified is remembered, so a hit proves what the check would. The dict lookup
        is keyed by a per-process randomised hash, so its timing says nothing about secrets.
        """
        if cookie_header is None:
            return None
        known = self._verified.get(cookie_header)
        if known is not None:
            return known
        value = read_cookie(cookie_header, self.cookie_name)
        if value is None or len(value) > _MAX_COOKIE_LEN:
            return None
        token, sep, signature = value.rpartition(".")
        if not sep or not is_token_shaped(token):
            return None
        if not self._cipher.verify(token.encode(), signature):
            return None
        session_id = session_id_for(token)
        if len(cookie_header) <= _VERIFIED_HEADER_MAX:
            if len(self._verified) >= _VERIFIED_MAX:
                del self._verified[next(iter(self._verified))]
            self._verified[cookie_header] = session_id
        return session_id

    async def current(self, cookie_header: str | None, *, slide: bool = True) -> Session | None:
        """The live session of this cookie (sliding its idle expiry unless ``slide`` is
        False: a page polling /auth/me?slide=false does not keep an idle session alive), or
        None."""
        session_id = self.session_id_from_cookie(cookie_header)
        if session_id is None:
            return None
        load_now = self._load_now
        found = load_now(session_id) if load_now is not None else LOAD_LATER
        session = await self.store.load(session_id) if isinstance(found, _LoadLater) else found
        if session is None:
            return None
        now = self._clock()
        if session.is_expired(now):
            await self.store.delete(session_id)
            return None
        if slide and now - session.last_seen >= self._touch_interval:
            session.last_seen = now
            await self.store.touch(session)
        return session

    # -- writing ----------------------------------------------------------------------------

    async def create(
        self,
        *,
        sub: str,
        sid: str | None,
        refresh_token: str,
        id_token: str | None,
        claims: dict[str, Any],
        dpop_jwk: dict[str, str] | None = None,
        user_agent: str | None = None,
    ) -> tuple[Session, str]:
        """A brand-new session (new id: no fixation) and the Set-Cookie value for it."""
        token = new_secret_token()
        now = self._clock()
        session = Session(
            id=session_id_for(token),
            sub=sub,
            sid=sid,
            refresh_token=refresh_token,
            id_token=id_token,
            claims=claims,
            created_at=now,
            absolute_expiry=now + self._settings.session.absolute_timeout,
            last_seen=now,
            dpop_jwk=dpop_jwk,
            user_agent=user_agent,
        )
        await self.store.save(session)
        value = f"{token}.{self._cipher.sign(token.encode())}"
        return session, self.session_cookie(value)

    def session_cookie(self, value: str) -> str:
        return format_cookie(
            self.cookie_name,
            value,
            https=self._https,
            max_age=int(self._settings.session.absolute_timeout),
            samesite=self._settings.session.cookie_samesite,
        )

    def clear_cookie(self) -> str:
        return format_cookie(self.cookie_name, "", https=self._https, max_age=0)

    def login_cookie(self, state: str) -> str:
        # Lax, not Strict: the IdP's redirect back to /auth/callback is a cross-site navigation.
        return format_cookie(
            self.login_cookie_name,
            state,
            https=self._https,
            max_age=LOGIN_TTL,
            samesite="lax",
        )

    def clear_login_cookie(self) -> str:
        return format_cookie(self.login_cookie_name, "", https=self._https, max_age=0)
