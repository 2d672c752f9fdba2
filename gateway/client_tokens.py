"""ClientTokenBroker: the gateway's own client-credentials tokens, one per (audience, scopes).

Routes with ``auth: client`` (and ``user_or_client`` without a session) carry a token the gateway
gets for itself (RFC 6749 §4.4), for no user. Such a token is the same for every request, so it is
cached for the whole gateway, not per session: in this process, and in the session store for
every instance (Redis). The order is the user tokens' (tokens.py):

1. a token cached here and not due (``skew`` before expiry, never before half its life) is used;
2. otherwise one token in the store, then the store's lock for this (audience, scopes) (one
   exchange at a time across instances with Redis), the caches again, then one exchange;
3. the answer is checked like a user token (``aud``, ``scope``; fail closed) before it is
   cached or forwarded.

While the IdP is down, a token not yet expired is served (as for user tokens); a refusal is
remembered for a while, so that a misconfigured route does not ask on every request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from cachetools import TLRUCache

from .dpop import DPoP, DPoPKey
from .errors import (
    AudienceNotPermitted,
    GatewayError,
    IdentityProviderError,
    IdentityProviderUnavailable,
    InsufficientScope,
    LoginRequired,
)
from .idp_back_off import CLIENT, IdpBackOff
from .metrics import GatewayMetrics, exchange_outcome
from .oidc import OIDCClient
from .routing import Route
from .sessions.base import CachedToken, SessionStore
from .settings import TokenSettings
from .tokens import checked_token, due_time

logger = logging.getLogger("gateway.tokens")

_REFUSAL_TTL = 30.0
ClientKey = tuple[str, str]  # (audience, scopes space-separated)


def _store_key(key: ClientKey, jkt: str | None = None) -> str:
    return f"{key[0]} {key[1]}" if jkt is None else f"{key[0]} {key[1]} dpop:{jkt}"


def _lock_id(key: ClientKey) -> str:
    """The store's lock name for one client token: it names no session."""
    return "client:" + hashlib.sha256(_store_key(key).encode()).hexdigest()


class ClientTokenBroker:
    """Client-credentials tokens for the routes that use them, cached for the whole gateway."""

    def __init__(
        self,
        *,
        oidc: OIDCClient,
        store: SessionStore,
        settings: TokenSettings,
        clock: Callable[[], float] = time.time,
        metrics: GatewayMetrics | None = None,
        dpop: DPoP | None = None,
        back_off: IdpBackOff | None = None,
    ) -> None:
        self._oidc = oidc
        # DPoP: the gateway's own key binds client tokens (gateway/dpop.py), and the store's
        # key for a token names that key, so a token bound to another key is never shared.
        self._dpop = dpop
        self._store = store
        self._skew = settings.skew
        self._allow_opaque = settings.allow_opaque
        self._clock = clock
        self._metrics = metrics if metrics is not None else GatewayMetrics()
        # One entry per configured (audience, scopes): bounded by the route table.
        self._tokens: dict[ClientKey, tuple[CachedToken, float]] = {}
        self._refusals: TLRUCache[ClientKey, GatewayError] = TLRUCache(
            maxsize=1_000, ttu=lambda _k, _v, now: now + _REFUSAL_TTL, timer=clock
        )
        # The IdP's back-offs, shared with the session-token broker (idp_back_off.py).
        self._back_off = back_off if back_off is not None else IdpBackOff(clock)
        self.exchanges = 0  # client-credentials grants sent (observability, tests)

    def cached_token(self, route: Route) -> str | None:
        """The cached token for ``route`` if not due; not a coroutine (the hot path)."""
        entry = self._tokens.get((route.audience, route.scope_key))
        if entry is None or self._clock() >= entry[1]:
            return None
        return entry[0].access_token

    async def access_token(self, route: Route, *, not_this: str | None = None) -> str:
        """A checked client token for ``route``'s audience and scopes. ``not_this``: a token
        an upstream refused as ``invalid_token``: treated as missing wherever it is cached."""
        key: ClientKey = (route.audience, route.scope_key)
        hit = self.cached_token(route)
        if hit is not None and hit != not_this:
            return hit
        refusal = self._refusals.get(key)
        if refusal is not None:
            raise type(refusal)(refusal.message)
        shared = await self._usable(key, not_this)
        if shared is not None:
            return shared.access_token
        async with self._store.refresh_lock(_lock_id(key)):
            shared = await self._usable(key, not_this)
            if shared is not None:
                return shared.access_token
            stale = self._tokens.get(key)
            now = self._clock()
            backing_off = self._back_off.refusal(CLIENT, route.audience, now)
            try:
                if backing_off is not None:
                    raise backing_off
                token = await self._exchange(route, now)
            except IdentityProviderUnavailable as exc:
                later = self._clock()
                if exc is not backing_off:  # the IdP's own answer, not the back-off's
                    self._back_off.record(exc, CLIENT, route.audience, later)
                old = stale[0] if stale is not None else None
                if old is None or later >= old.expires_at or old.access_token == not_this:
                    # another instance's may still live
                    old = await self._store.get_client_token(self._store_key(key))
                if old is not None and later < old.expires_at and old.access_token != not_this:
                    logger.warning(
                        "identity provider unavailable; serving a cached client token for %s",
                        route.name,
                    )
                    return old.access_token
                raise
            except (AudienceNotPermitted, InsufficientScope, IdentityProviderError) as exc:
                self._refusals[key] = type(exc)(exc.message)
                raise
            self._remember(key, token)
            await self._store.put_client_token(self._store_key(key), token)
            return token.access_token

    async def _usable(self, key: ClientKey, not_this: str | None) -> CachedToken | None:
        """A token here or in the store that is neither due nor refused, remembered here."""
        now = self._clock()
        entry = self._tokens.get(key)
        if entry is not None and now < entry[1] and entry[0].access_token != not_this:
            return entry[0]
        shared = await self._store.get_client_token(self._store_key(key))
        if shared is None or shared.access_token == not_this:
            return None
        if now >= due_time(shared, self._skew):
            return None
        self._remember(key, shared)
        return shared

    def _key(self) -> DPoPKey | None:
        dpop = self._dpop
        return dpop.client_key if dpop is not None and dpop.active else None

    def _store_key(self, key: ClientKey) -> str:
        dpop_key = self._key()
        return _store_key(key, dpop_key.jkt if dpop_key is not None else None)

    def _remember(self, key: ClientKey, token: CachedToken) -> None:
        self._tokens[key] = (token, due_time(token, self._skew))

    async def _exchange(self, route: Route, now: float) -> CachedToken:
        audience = route.audience
        scopes = route.settings.scopes
        dpop_key = self._key()
        self.exchanges += 1
        try:
            try:
                answer = await self._oidc.client_credentials(
                    audience=audience, scopes=scopes, dpop_key=dpop_key
                )
            except LoginRequired as exc:  # no user to send anywhere: the client is refused
                raise IdentityProviderError(
                    f"the identity provider refused the client token for {audience} ({exc.message})"
                ) from None
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
            self._metrics.client_exchange(audience, exchange_outcome(exc))
            raise
        self._metrics.client_exchange(audience, "ok")
        return token
