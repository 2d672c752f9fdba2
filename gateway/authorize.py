"""The one per-route authorization policy: session -> CSRF -> claim rules -> token.

The proxy, forward-auth and the WebSocket handshake each read a request their own way (an ASGI
scope, a data plane's subrequest, an upgrade), then ask :meth:`Authorizer.authorize` whether
it may pass and with which bearer token. None of them keeps a copy of any step.

A route's ``auth`` mode decides what it needs:

* ``none`` needs nothing, not even the IdP: it keeps working while the IdP is down. (A
  WebSocket upgrade still has to come from an allowed origin when it names one.)
* ``user`` needs a live session from the session cookie (else 401 ``login_required``), the
  anti-CSRF proof unless the route opts out (the header plus Origin and Sec-Fetch-Site on HTTP;
  the Origin on a WebSocket upgrade, where a page cannot set a header), the route's claim rules
  (else 403 ``forbidden``) and step-up (else 401 ``step_up_required``), then the IdP's metadata
  (started on first need) and the route's access token from the broker (cached, or one exchange
  per session).
* ``client`` needs no session: the gateway's own client-credentials token for the route's
  audience (one for the whole gateway, ``client_tokens.py``).
* ``user_or_client`` and ``user_or_none`` judge a session as ``user`` does when the cookie names
  a live one; without one they pass with the client token, or with no token at all (never a
  login challenge, and no IdP needed).

A request without a session carries no ambient authority of the user's, so it needs no anti-CSRF
proof.

With DPoP (``tokens.dpop``) the token may be a ``DPoPBound`` one: each entry then asks
:meth:`Authorizer.dpop_proof` for the proof of its own request (method and upstream URL) and sends
``Authorization: DPoP`` with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .client_tokens import ClientTokenBroker
from .dpop import DPoP, DPoPBound, htu
from .errors import Forbidden, LoginRequired, StepUpRequired
from .routing import Route
from .security import check_csrf, check_websocket_origin
from .services import Services
from .session_rules import Verdict
from .sessions.base import Session
from .sessions.manager import SessionManager
from .tokens import TokenBroker

COOKIE = b"cookie"
ORIGIN = b"origin"
SEC_FETCH_SITE = b"sec-fetch-site"


# What the policy allowed: the session (None when the route or request has none) and the bearer
# token for the route's audience (None when it passes without one). A plain pair: it is built on
# every proxied request.
Grant = tuple[Session | None, str | None]
PUBLIC: Grant = (None, None)


class Authorizer:
    """Decides, for a route and a request, whether it may pass and with which token."""

    def __init__(
        self,
        *,
        services: Services,
        sessions: SessionManager,
        broker: TokenBroker,
        client_tokens: ClientTokenBroker,
        csrf_header: str,
        csrf_value: str,
        allowed_origins: list[str],
        clock: Callable[[], float] = time.time,
        dpop: DPoP | None = None,
    ) -> None:
        self._services = services
        self.dpop = dpop
        self._sessions = sessions
        self._broker = broker
        self._client_tokens = client_tokens
        self._clock = clock
        self.csrf_header = csrf_header.lower().encode()
        self._csrf_value = csrf_value
        self._allowed_origins = tuple(allowed_origins)
        # The request headers the policy reads: callers collect them in their own header pass.
        self.wanted = frozenset({COOKIE, ORIGIN, SEC_FETCH_SITE, self.csrf_header})

    @classmethod
    def from_services(cls, services: Services) -> Authorizer:
        """The policy of ``services``' settings, on its sessions and token broker."""
        settings = services.settings
        return cls(
            services=services,
            sessions=services.sessions,
            broker=services.broker,
            client_tokens=services.client_tokens,
            csrf_header=settings.csrf.header,
            csrf_value=settings.csrf.value,
            allowed_origins=settings.allowed_origins,
            dpop=services.dpop,
        )

    async def authorize(
        self,
        route: Route,
        method: str,
        headers: Mapping[bytes, str],
        *,
        login_url: str,
        websocket: bool = False,
    ) -> Grant:
        """The grant for ``route``, or raise what the client is to be answered.

        ``headers``: at least the (lower-case) names in :attr:`wanted`, each Cookie field
        joined into one value; ``login_url``: where a 401 sends the user (each entry knows
        where the user should come back to); ``websocket``: the request is an upgrade.
        """
        mode = route.mode
        if mode == "none":
            if websocket:
                check_websocket_origin(headers.get(ORIGIN), self._allowed_origins, required=False)
            return PUBLIC
        session = await self._sessions.current(headers.get(COOKIE)) if route.needs_session else None
        if session is None:
            if mode == "user":
                raise LoginRequired("no valid session", login_url=login_url)
            if websocket:
                check_websocket_origin(headers.get(ORIGIN), self._allowed_origins, required=False)
            if mode == "user_or_none":
                return PUBLIC
            if not self._services.started:  # only a token needs the IdP
                await self._services.ensure_started()
            client = self._client_tokens  # client, or user_or_client without a session
            return None, client.cached_token(route) or await client.access_token(route)
        if websocket:
            check_websocket_origin(headers.get(ORIGIN), self._allowed_origins, required=True)
        elif route.csrf:
            check_csrf(
                method=method,
                header_value=headers.get(self.csrf_header),
                expected_value=self._csrf_value,
                origin=headers.get(ORIGIN),
                sec_fetch_site=headers.get(SEC_FETCH_SITE),
                allowed_origins=self._allowed_origins,
            )
        if route.judged:
            self._judge(route, session, login_url)
        if not self._services.started:  # only a token needs the IdP
            await self._services.ensure_started()
        broker = self._broker
        dpop = self.dpop
        if dpop is not None and dpop.active and session.dpop_jwk is None:
            session = await broker.with_dpop_key(session)  # once: a session from before DPoP
        # A cache hit needs no coroutine: the proxy's hot path awaits nothing for it.
        token = broker.cached_token(session.id, route) or await broker.access_token(session, route)
        return session, token

    def verdict(self, route: Route, session: Session) -> Verdict:
        """What ``route``'s claim rules and step-up say of ``session`` (/auth/me asks too)."""
        if not route.judged:
            return Verdict.ALLOWED
        return route.rules.verdict(session.claims_dict(), self._clock())

    def _judge(self, route: Route, session: Session, login_url: str) -> None:
        verdict = self.verdict(route, session)
        if verdict is Verdict.FORBIDDEN:
            raise Forbidden(f"this session does not satisfy the claim rules of route {route.name}")
        if verdict is Verdict.STEP_UP_REQUIRED:
            raise self.step_up(route, login_url)

    @staticmethod
    def step_up(route: Route, login_url: str) -> StepUpRequired:
        """The 401 that sends the user to a login asking for ``route``'s step-up."""
        rules = route.rules
        return StepUpRequired(
            f"route {route.name} needs a stronger or more recent login",
            login_url=login_url,
            acr_values=rules.acr_values,
            max_age=None if rules.max_age is None else int(rules.max_age),
        )

    async def dpop_proof(
        self, session: Session | None, token: str, method: str, url: str, server: str
    ) -> str | None:
        """The DPoP proof to send with ``token`` to ``url`` (on ``server``, an origin), or
        None for a bearer token. A user's token is bound to the session's key, the gateway's
        client token to the gateway's; the nonce is ``server``'s latest. Signed with the
        other proofs asked for around the same time (``ProofSigner``)."""
        dpop = self.dpop
        if type(token) is not DPoPBound or dpop is None:
            return None
        if session is None:
            key = dpop.client_key
        else:
            session_key = dpop.session_key(session.id, session.dpop_jwk)
            if session_key is None:  # cannot happen: a bound token was minted with the key
                raise LoginRequired(
                    "the session has no DPoP key", login_url=self._services.login_url
                )
            key = session_key
        return await dpop.signer.proof(
            key, method, htu(url), access_token=token, nonce=dpop.nonces.get(server)
        )

    async def renewed_token(self, route: Route, session: Session | None, refused: str) -> str:
        """A new token in place of ``refused``, which the upstream answered 401
        ``invalid_token``: from the broker that minted it (single flight, as always)."""
        if session is not None:
            return await self._broker.access_token(session, route, not_this=refused)
        return await self._client_tokens.access_token(route, not_this=refused)
