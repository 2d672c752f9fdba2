"""TokenBroker: swaps a session's refresh token for an access token per audience.

The order of operations is the product (DESIGN.md §2):
1. a token cached for (session, audience, scopes) and not due for refresh is used as is;
2. otherwise the session's refresh lock is taken (one exchange per session at a time, across
   instances with Redis), the caches are read again (a waiter usually finds the token that the
   holder just minted) and the session is reloaded (the refresh token may have rotated);
3. a rotated refresh token is saved before anything else happens with the answer;
4. the new access token is checked (``aud`` and ``scope``) before it is cached or forwarded,
   because Auth0 answers an audience outside the MRRT policy with a token for the default
   audience and silently drops scopes it does not allow (shared/MRRT.md §1.3).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import jwt
from cachetools import TLRUCache

from .dpop import DPoP, DPoPKey, bound_token
from .errors import (
    AudienceNotPermitted,
    GatewayError,
    IdentityProviderUnavailable,
    InsufficientScope,
    LoginRequired,
    RefreshTokenRejected,
    SessionEnded,
)
from .idp_back_off import IdpBackOff
from .metrics import GatewayMetrics
from .oidc import OIDCClient, TokenResponse
from .routing import Route
from .sessions.base import CachedToken, Session, SessionStore
from .settings import TokenSettings
from .tracing import Tracing

logger = logging.getLogger("gateway.tokens")

_DEFAULT_LIFETIME = 300.0  # when the IdP names no expiry and the token is opaque
_REFUSAL_TTL = 30.0  # a refused audience is not asked for again this soon

CacheKey = tuple[str, str, str]


class _TokenCache:
    """This process's access tokens: a plain dict, because it is read on every proxied request
    (~0.1 µs a lookup where cachetools' TLRUCache takes ~2 µs). Each entry keeps the time its
    token falls due (``due``, computed once per token, not per request). ``get`` hides expired
    tokens; every 1,024 writes sweep expired ones; past ``maxsize`` the oldest entry goes
    (O(1)). A per-session index makes ``forget`` (logout) cost what that session holds, not
    the cache."""

    def __init__(
        self, maxsize: int, clock: Callable[[], float], due: Callable[[CachedToken], float]
    ) -> None:
        self._tokens: dict[CacheKey, tuple[CachedToken, float]] = {}
        self._by_session: dict[str, set[CacheKey]] = {}
        self._maxsize = maxsize
        self._clock = clock
        self._due = due
        self._writes = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def fresh(self, key: CacheKey, now: float) -> CachedToken | None:
        """The token if it is not due for refresh at ``now`` (the hot path's one lookup)."""
        entry = self._tokens.get(key)
        if entry is None or now >= entry[1]:
            return None
        return entry[0]

    def get(self, key: CacheKey) -> CachedToken | None:
        entry = self._tokens.get(key)
        if entry is None or entry[0].expires_at <= self._clock():
            return None
        return entry[0]

    def put(self, key: CacheKey, token: CachedToken) -> None:
        self._tokens.pop(key, None)  # a refreshed token moves to the young end
        self._tokens[key] = (token, self._due(token))
        self._by_session.setdefault(key[0], set()).add(key)
        self._writes += 1
        if self._writes % 1024 == 0:
            now = self._clock()
            for old in [k for k, (v, _) in self._tokens.items() if v.expires_at <= now]:
                self._drop(old)
        while len(self._tokens) > self._maxsize:
            self._drop(next(iter(self._tokens)))

    def forget(self, session_id: str) -> None:
        for key in self._by_session.pop(session_id, ()):
            self._tokens.pop(key, None)

    def _drop(self, key: CacheKey) -> None:
        self._tokens.pop(key, None)
        keys = self._by_session.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_session[key[0]]


class TokenBroker:
    """Per-(session, audience, scopes) access-token cache in front of the refresh grant."""

    def __init__(
        self,
        *,
        oidc: OIDCClient,
        store: SessionStore,
        settings: TokenSettings,
        clock: Callable[[], float] = time.time,
        metrics: GatewayMetrics | None = None,
        login_url: str = "/auth/login",
        on_session_ended: Callable[[str], Awaitable[object]] | None = None,
        dpop: DPoP | None = None,
        tracing: Tracing | None = None,
        back_off: IdpBackOff | None = None,
    ) -> None:
        self._oidc = oidc
        self._dpop = dpop
        self._login_url = login_url  # named by the LoginRequired this broker raises
        # Ends a session whose refresh token the IdP rejected (Services.end_session: delete,
        # forget cached tokens, close open connections on every instance).
        self._on_session_ended = on_session_ended
        self._metrics = metrics if metrics is not None else GatewayMetrics()
        self._store = store
        self._skew = settings.skew
        self._allow_opaque = settings.allow_opaque
        self._clock = clock
        self._cache = _TokenCache(settings.cache_size, clock, self._due)
        # Refusals are remembered as a fresh copy, never as the raised exception (_remembered).
        self._refusals: TLRUCache[CacheKey, GatewayError] = TLRUCache(
            maxsize=10_000, ttu=lambda _k, _v, now: now + _REFUSAL_TTL, timer=clock
        )
        # The IdP's back-offs, shared with the client-token broker (idp_back_off.py).
        self._back_off = back_off if back_off is not None else IdpBackOff(clock)
        self._tracing = tracing  # a span per exchange (tracing.py); None: tracing off
        self.exchanges = 0  # refresh-token grants sent (observability, tests)

    def cached_token(self, session_id: str, route: Route) -> str | None:
        """This process's cached token for ``route`` if it is not due for refresh, else None
        (then :meth:`access_token`). Not a coroutine: the proxy's hot path calls it first and
        awaits nothing on a hit."""
        entry = self._cache.fresh((session_id, route.audience, route.scope_key), self._clock())
        if entry is None:
            return None
        self._metrics.cache_hit_local.inc()
        return entry.access_token

    async def access_token(
        self, session: Session, route: Route, *, not_this: str | None = None
    ) -> str:
        """A checked access token for ``route``'s audience; refreshes when due.

        ``not_this``: a token the upstream refused as ``invalid_token`` (revoked, or expired
        before its time): wherever it is cached, it counts as missing, so a new one is minted
        (still one exchange per session: requests waiting on the lock find the new one).
        """
        hit = self.cached_token(session.id, route)
        if hit is not None and hit != not_this:
            return hit
        audience = route.audience
        key: CacheKey = (session.id, audience, route.scope_key)
        now = self._clock()
        scopes = route.settings.scopes
        refusal = self._refusals.get(key)
        if refusal is not None:
            self._metrics.cache_hit_refused.inc()
            raise self._refused(refusal)
        store_key = f"{audience} {key[2]}"
        shared = await self._store.get_token(session.id, store_key)
        if shared is not None and shared.access_token == not_this:
            shared = None
        if shared is not None and now < self._due(shared):
            self._metrics.cache_hit_shared.inc()
            self._cache.put(key, shared)
            return shared.access_token
        self._metrics.cache_miss.inc()

        async with self._store.refresh_lock(session.id):
            # Whoever held the lock before us may have minted exactly this token.
            now = self._clock()
            cached = self._cache.get(key)
            if cached is None or now >= self._due(cached):
                # Another instance may have refreshed it while ours fell due (Redis store).
                cached = await self._store.get_token(session.id, store_key) or cached
            if cached is not None and cached.access_token == not_this:
                cached = None  # refused by the upstream: neither reused nor served on a 503
            if cached is not None and now < self._due(cached):
                self._metrics.token_coalesced.inc()
                self._cache.put(key, cached)
                return cached.access_token
            backing_off = self._back_off.refusal(session.id, audience, now)
            try:
                if backing_off is not None:
                    raise backing_off
                current = await self._store.load(session.id)
                if current is None:
                    raise LoginRequired("the session has ended", login_url=self._login_url)
                dpop_key = self._dpop_key(current)
                with (
                    self._tracing.token_exchange(audience, session.id, "refresh_token")
                    if self._tracing is not None
                    else contextlib.nullcontext()
                ):
                    answer = await self._exchange(current, audience, scopes, dpop_key)
                    try:
                        token = checked_token(
                            answer,
                            audience=audience,
                            scopes=scopes,
                            now=now,
                            allow_opaque=self._allow_opaque,
                            dpop_jkt=dpop_key.jkt if dpop_key is not None else None,
                            dpop_required=self._dpop is not None and self._dpop.required,
                        )
                    except GatewayError as exc:
                        self._metrics.exchange_failed(audience, exc)
                        raise
            except SessionEnded as exc:  # a logout won the race with this exchange
                raise LoginRequired("the session has ended", login_url=self._login_url) from exc
            except (AudienceNotPermitted, InsufficientScope, LoginRequired) as exc:
                # The IdP said no (or wants an interaction): do not ask again for a while.
                if not isinstance(exc, RefreshTokenRejected):
                    self._refusals[key] = _remembered(exc)
                raise
            except IdentityProviderUnavailable as exc:
                later = self._clock()  # the IdP call may have taken up to its timeout
                if exc is not backing_off:  # the IdP's own answer, not the back-off's
                    self._back_off.record(exc, session.id, audience, later)
                if cached is not None and later < cached.expires_at:
                    logger.warning(
                        "identity provider unavailable; serving a cached token for %s", route.name
                    )
                    return cached.access_token
                raise
            self._metrics.exchange_ok(audience)
            self._cache.put(key, token)
            await self._store.put_token(session.id, store_key, token)
            return token.access_token

    async def adopt(
        self,
        session_id: str,
        answer: TokenResponse,
        routes: list[Route],
        *,
        dpop_jkt: str | None = None,
    ) -> int:
        """Keep the login's own access token for ``routes`` (those of the login audience),
        after the checks an exchanged token passes (``aud``, ``scope``, the DPoP binding): the
        code exchange already paid for it, so their first requests need no refresh-token
        exchange (the minimum). A route the token fails a check for exchanges as before.
        Returns how many routes took it."""
        now = self._clock()
        adopted = 0
        for route in routes:
            key: CacheKey = (session_id, route.audience, route.scope_key)
            try:
                token = checked_token(
                    answer,
                    audience=route.audience,
                    scopes=route.settings.scopes,
                    now=now,
                    allow_opaque=self._allow_opaque,
                    dpop_jkt=dpop_jkt,
                    dpop_required=self._dpop is not None and self._dpop.required,
                )
            except GatewayError:
                continue
            self._cache.put(key, token)
            await self._store.put_token(session_id, f"{route.audience} {key[2]}", token)
            adopted += 1
        return adopted

    def _refused(self, refusal: GatewayError) -> GatewayError:
        """A remembered refusal, raised again (a new exception each time)."""
        if isinstance(refusal, LoginRequired):
            return refusal.relocated(self._login_url)
        return type(refusal)(refusal.message)

    def forget(self, session_id: str) -> None:
        """Drop this process's cached tokens of a session (logout)."""
        self._cache.forget(session_id)
        if self._dpop is not None:
            self._dpop.forget(session_id)

    def _dpop_key(self, session: Session) -> DPoPKey | None:
        """The session's DPoP key when DPoP is on (every token request then has a proof)."""
        dpop = self._dpop
        if dpop is None or not dpop.active:
            return None
        return dpop.session_key(session.id, session.dpop_jwk)

    async def with_dpop_key(self, session: Session) -> Session:
        """``session`` with a DPoP key: one made (once, under the session's lock) for a
        session that started before DPoP was on."""
        async with self._store.refresh_lock(session.id):
            current = await self._store.load(session.id)
            if current is None:
                raise LoginRequired("the session has ended", login_url=self._login_url)
            if current.dpop_jwk is None:
                current = replace(current, dpop_jwk=DPoPKey.generate().to_jwk())
                await self._store.save(current)
            return current

    async def _end_session(self, session_id: str) -> None:
        if self._on_session_ended is not None:
            await self._on_session_ended(session_id)
        else:
            await self._store.delete(session_id)
            self.forget(session_id)

    def _due(self, token: CachedToken) -> float:
        return due_time(token, self._skew)

    async def _exchange(
        self, session: Session, audience: str, scopes: list[str], key: DPoPKey | None
    ) -> TokenResponse:
        self.exchanges += 1
        try:
            answer = await self._oidc.refresh(
                session.refresh_token, audience=audience, scopes=scopes, dpop_key=key
            )
        except RefreshTokenRejected as exc:
            self._metrics.exchange_failed(audience, exc)
            # The refresh token is dead (expired, revoked, reuse detected): so is the session.
            await self._end_session(session.id)
            raise
        except GatewayError as exc:
            self._metrics.exchange_failed(audience, exc)
            raise
        if answer.refresh_token and answer.refresh_token != session.refresh_token:
            # Rotation: the old refresh token is now invalid; persist the new one before the
            # answer is used for anything, so that no request can see a dead token.
            await self._store.save(
                replace(
                    session, refresh_token=answer.refresh_token, rt_version=session.rt_version + 1
                )
            )
        return answer


def _remembered(exc: GatewayError) -> GatewayError:
    """A refusal to remember without its traceback: one raised again and again would grow it
    (and keep every frame's locals)."""
    if isinstance(exc, LoginRequired):
        return exc.relocated(exc.base_login_url)
    return type(exc)(exc.message)


def due_time(token: CachedToken, skew: float) -> float:
    """When a token is due: ``skew`` before expiry, but never before half its life, so that
    tokens living less than the skew do not cause an exchange on every request."""
    lifetime = token.expires_at - token.issued_at if token.issued_at else float("inf")
    return token.expires_at - min(skew, lifetime / 2)


def checked_token(
    answer: TokenResponse,
    *,
    audience: str,
    scopes: list[str],
    now: float,
    allow_opaque: bool,
    dpop_jkt: str | None = None,
    dpop_required: bool = False,
) -> CachedToken:
    """Fail closed on a token for another audience or without the route's scopes (user and
    client tokens alike). ``dpop_jkt``: the request carried a DPoP proof with that key, and
    the answer must be bound to it (``dpop.bound_token``)."""
    expires_at = now + (answer.expires_in if answer.expires_in is not None else _DEFAULT_LIFETIME)
    granted_scope = answer.scope
    claims = unverified_claims(answer.access_token)
    if claims is None:
        if not allow_opaque:
            raise AudienceNotPermitted(
                f"the identity provider issued an opaque token for {audience}; its audience "
                "cannot be checked (set tokens.allow_opaque to accept such tokens)"
            )
    else:
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if audience not in audiences:
            raise AudienceNotPermitted(
                f"the identity provider did not issue a token for {audience}"
            )
        exp = claims.get("exp")
        if isinstance(exp, int | float):
            expires_at = min(expires_at, float(exp))
        claimed_scope = claims.get("scope")
        if granted_scope is None and isinstance(claimed_scope, str):
            granted_scope = claimed_scope
    if scopes:
        have = set((granted_scope or "").split())
        missing = [s for s in scopes if s not in have]
        # A server that names no scope at all granted what was asked (RFC 6749 §5.1).
        if missing and granted_scope is not None:
            raise InsufficientScope(f"the token for {audience} lacks scope {' '.join(missing)}")
    if expires_at <= now:
        raise IdentityProviderUnavailable("the identity provider issued an expired token")
    access_token = answer.access_token
    if dpop_jkt is not None:
        access_token = bound_token(
            answer.token_type,
            access_token,
            claims,
            jkt=dpop_jkt,
            required=dpop_required,
            audience=audience,
        )
    return CachedToken(
        access_token=access_token,
        expires_at=expires_at,
        audience=audience,
        scope=granted_scope or "",
        issued_at=now,
    )


def unverified_claims(token: str) -> dict[str, object] | None:
    """Claims of a JWT access token, without verifying it: the gateway is not its audience and
    got it straight from the IdP over TLS; it only checks that it is the token it asked for."""
    if token.count(".") != 2:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None
