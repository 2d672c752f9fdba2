"""The gateway's own endpoints under /auth: login, callback, logout, me, backchannel-logout.

A login may ask the IdP for more than the configured defaults, each remembered with the
pending login and checked again at the callback (fail closed):

* ``acr_values`` / ``max_age``: a step-up (the login_url of a ``401 step_up_required``); the ID
  token's ``acr`` must be one of those asked, its ``auth_time`` within ``max_age``;
* ``organization`` (Auth0 Organizations): one of ``oidc.organization(s)``; the ID token's
  ``org_id`` (or ``org_name``) must name it;
* ``prompt=none``: a silent login; when the IdP has no session, the user comes back to
  ``return_to`` with ``?error=login_required`` instead of an IdP page.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from .authorize import Authorizer
from .backchannel import process_logout_token, read_logout_token
from .dpop import DPoPKey, bound_token
from .errors import (
    BadRequest,
    CSRFCheckFailed,
    GatewayError,
    LoginFailed,
    LoginRequired,
    with_query,
)
from .headers import joined_cookie
from .oidc import OIDCClient, pkce_challenge
from .request_body import read_small_body
from .routing import Route, RouteTable
from .security import check_csrf, new_secret_token, read_cookie, tokens_equal, validate_return_to
from .services import Services
from .session_rules import Verdict, acr_satisfied, auth_time_satisfied
from .sessions.base import Session
from .sessions.manager import LOGIN_TTL
from .settings import check_acr_value, check_organization
from .tokens import unverified_claims
from .user_agent import user_agent_family

logger = logging.getLogger("gateway.auth")

_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")
_LOGOUT_BODY_MAX = 1024
# ID-token claims worth showing to the SPA on /auth/me; the rest stays server side.
_PUBLIC_CLAIMS = (
    "sub",
    "name",
    "given_name",
    "family_name",
    "nickname",
    "email",
    "email_verified",
    "picture",
    "locale",
)


# Protocol claims of an ID token: checked at login, never needed again. Every other claim
# (acr, auth_time, amr, org_id, roles, custom URI claims) stays with the session for the
# routes' claim rules, step-up and /auth/me.
_PROTOCOL_CLAIMS = frozenset(
    {"iss", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash", "s_hash", "azp", "jti"}
)
_MAX_ACR_VALUES = 10
_MAX_AGE_DIGITS = 10
_PROMPTS = ("none", "login")


def _login_options(
    params: Mapping[str, str], allowed_organizations: list[str], default_organization: str | None
) -> dict[str, Any]:
    """What a login asks the IdP for beyond the defaults (400 on anything malformed)."""
    try:
        acr_values = [check_acr_value(v) for v in params.get("acr_values", "").split()]
    except ValueError as exc:
        raise BadRequest(f"acr_values: {exc}") from None
    if len(acr_values) > _MAX_ACR_VALUES:
        raise BadRequest(f"acr_values: at most {_MAX_ACR_VALUES} values")
    raw_age = params.get("max_age")
    max_age: int | None = None
    if raw_age is not None:
        if not (raw_age.isascii() and raw_age.isdigit() and len(raw_age) <= _MAX_AGE_DIGITS):
            raise BadRequest("max_age: a number of seconds")
        max_age = int(raw_age)
    prompt = params.get("prompt")
    if prompt is not None and prompt not in _PROMPTS:
        raise BadRequest("prompt: none or login")
    organization = params.get("organization") or default_organization
    if organization is not None:
        try:
            check_organization(organization)
        except ValueError as exc:
            raise BadRequest(f"organization: {exc}") from None
        # Ids exactly, names as Auth0 compares them (case-insensitively), in the configured
        # spelling.
        known = next(
            (
                org
                for org in allowed_organizations
                if org == organization
                or (not org.startswith("org_") and org.lower() == organization.lower())
            ),
            None,
        )
        if known is None:
            raise BadRequest("organization: not one this gateway's logins may ask for")
        organization = known
    return {
        "acr_values": acr_values,
        "max_age": max_age,
        "prompt": prompt,
        "organization": organization,
    }


def _check_organization(claims: Mapping[str, Any], asked: str | None, allowed: list[str]) -> None:
    """Auth0 Organizations: the ID token must name the organization the login asked for
    (``org_id`` for an id, ``org_name`` for a name, case-insensitive), or one of the allowed
    ones when none was asked."""
    org_id, org_name = claims.get("org_id"), claims.get("org_name")
    name = org_name.lower() if isinstance(org_name, str) else None

    def names(org: str) -> bool:
        return org_id == org if org.startswith("org_") else name == org.lower()

    if asked is not None:
        if not names(asked):
            raise LoginFailed("the ID token does not name the organization the login asked for")
    elif allowed and not any(names(org) for org in allowed):
        raise LoginFailed("the ID token names no organization this gateway accepts")


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


class AuthEndpoints:
    """Starlette-style endpoints (Request -> Response); ``create_app`` puts each at its path
    (``own_paths``)."""

    def __init__(
        self,
        services: Services,
        *,
        oidc: OIDCClient,
        routes: RouteTable,
        authorizer: Authorizer,
    ) -> None:
        # The services for their lifecycle (ensure_started, end_session), store and sessions.
        self._services = services
        self._oidc = oidc
        self._routes = routes
        self._authorizer = authorizer
        settings = services.settings
        self._oidc_settings = settings.oidc
        self._store = services.store
        self._sessions = services.sessions
        self._csrf = settings.csrf
        self._allowed_origins = settings.allowed_origins
        self._idle_timeout = settings.session.idle_timeout
        self._login_url = services.login_url
        self._post_logout_url = services.post_logout_redirect_url

    async def login(self, request: Request) -> Response:
        """Start authorization code + PKCE (S256) with state and nonce; the login's own
        options (step-up, organization, silent) go with the pending login."""
        oidc = self._oidc_settings
        options = _login_options(
            request.query_params,
            oidc.allowed_organizations,
            oidc.organization,
        )
        await self._services.ensure_started()
        return_to = validate_return_to(request.query_params.get("return_to"))
        state, nonce, verifier = (
            new_secret_token(),
            new_secret_token(),
            new_secret_token() + new_secret_token(),
        )
        pending = {"nonce": nonce, "verifier": verifier, "return_to": return_to, **options}
        key = DPoPKey.generate() if self._services.dpop.active else None
        if key is not None:
            # The session's DPoP key is born with the login: the code is bound to it
            # (dpop_jkt), and the pending login is encrypted at rest like the session.
            pending["dpop_jwk"] = key.to_jwk()
        await self._store.put_login(state, pending, ttl=LOGIN_TTL)
        url = await self._oidc.authorize_url(
            state=state,
            nonce=nonce,
            code_challenge=pkce_challenge(verifier),
            acr_values=tuple(options["acr_values"]),
            max_age=options["max_age"],
            organization=options["organization"],
            prompt=options["prompt"],
            dpop_jkt=key.jkt if key is not None else None,
        )
        response = RedirectResponse(url, status_code=302)
        response.headers.append("Set-Cookie", self._sessions.login_cookie(state))
        return _no_store(response)

    async def callback(self, request: Request) -> Response:
        """Finish login: check state (single use, bound to this browser), exchange the code,
        validate the ID token and what the login asked for, then start a brand-new session."""
        await self._services.ensure_started()
        params = request.query_params
        state, code = params.get("state"), params.get("code")
        browser_state = read_cookie(
            joined_cookie(request.scope["headers"]), self._sessions.login_cookie_name
        )
        if "error" in params:
            reason = params["error"] if _ERROR_CODE.match(params["error"]) else "invalid_error"
            silent = await self._silent_login_answer(state, browser_state, reason)
            if silent is not None:
                return silent
            raise LoginFailed(f"the identity provider refused the login ({reason})")
        if not state or not code:
            raise LoginFailed("the callback lacks state or code")
        if not tokens_equal(browser_state, state):
            raise LoginFailed("this login was not started in this browser")
        pending = await self._store.pop_login(state)
        if pending is None:
            raise LoginFailed("unknown, expired or already used login state")
        dpop_jwk = pending.get("dpop_jwk")
        key = DPoPKey.from_jwk(dpop_jwk) if isinstance(dpop_jwk, dict) else None
        tokens = await self._oidc.exchange_code(
            code=code, verifier=pending["verifier"], dpop_key=key
        )
        access_token = tokens.access_token
        if key is not None:
            try:
                access_token = bound_token(
                    tokens.token_type,
                    access_token,
                    unverified_claims(access_token),
                    jkt=key.jkt,
                    required=self._services.dpop.required,
                    audience="the login",
                )
            except GatewayError as exc:
                raise LoginFailed(exc.message) from None
        if tokens.id_token is None:
            raise LoginFailed("the identity provider returned no ID token")
        claims = await self._oidc.validate_id_token(tokens.id_token, nonce=pending["nonce"])
        self._check_asked(claims, pending)
        if tokens.refresh_token is None:
            raise LoginFailed("the identity provider issued no refresh token (offline_access?)")
        kept = {k: v for k, v in claims.items() if k not in _PROTOCOL_CLAIMS}
        if self._oidc_settings.userinfo:
            userinfo = await self._oidc.userinfo(access_token, dpop_key=key)
            if userinfo.get("sub") != claims["sub"]:  # OIDC Core §5.3.2
                raise LoginFailed("the userinfo answer is about another user")
            kept = {**userinfo, **kept}  # the signed ID token's claims win
        old = self._sessions.session_id_from_cookie(joined_cookie(request.scope["headers"]))
        if old is not None:
            # Whoever was logged in here (another user, or this one less strongly) is logged
            # out first: nothing of that session goes on.
            await self._services.end_session(old)
        session, cookie = await self._sessions.create(
            sub=str(claims["sub"]),
            sid=claims.get("sid") if isinstance(claims.get("sid"), str) else None,
            refresh_token=tokens.refresh_token,
            id_token=tokens.id_token,
            claims=kept,
            dpop_jwk=dpop_jwk if key is not None else None,
            user_agent=user_agent_family(request.headers.get("user-agent")),
        )
        login_audience = self._services.settings.oidc.login_audience
        if login_audience:  # the login's access token is that audience's (auth0 dialect)
            await self._services.broker.adopt(
                session.id,
                tokens,
                [r for r in self._routes if r.needs_session and r.audience == login_audience],
                dpop_jkt=key.jkt if key is not None else None,
            )
        logger.info("login complete for session %s", session.id[:8])
        await self._services.session_admin.enforce_limit(session)  # session.max_per_user
        response = RedirectResponse(pending["return_to"], status_code=302)
        response.headers.append("Set-Cookie", cookie)
        response.headers.append("Set-Cookie", self._sessions.clear_login_cookie())
        return _no_store(response)

    def _check_asked(self, claims: Mapping[str, Any], pending: Mapping[str, Any]) -> None:
        """The ID token answers what this login asked for, or the login fails."""
        asked_acr = pending.get("acr_values") or []
        if not acr_satisfied(claims.get("acr"), asked_acr):
            raise LoginFailed(
                "the identity provider authenticated the user more weakly than the login "
                f"asked for (acr_values {' '.join(asked_acr)})"
            )
        max_age = pending.get("max_age")
        if not auth_time_satisfied(
            claims.get("auth_time"), max_age, time.time(), self._oidc_settings.clock_leeway
        ):
            raise LoginFailed(
                f"the identity provider did not authenticate the user within max_age {max_age}"
            )
        _check_organization(
            claims, pending.get("organization"), self._oidc_settings.allowed_organizations
        )

    async def _silent_login_answer(
        self, state: str | None, browser_state: str | None, reason: str
    ) -> Response | None:
        """A silent login (``prompt=none``) the IdP could not finish without the user: back
        to ``return_to`` with ``?error=<reason>``, never an error page. None for any other
        refused login (this browser's, with a known state, is the only one answered so)."""
        if not state or not tokens_equal(browser_state, state):
            return None
        pending = await self._store.pop_login(state)
        if pending is None or pending.get("prompt") != "none":
            return None
        target = with_query(pending["return_to"], [("error", reason)])
        response = RedirectResponse(target, status_code=302)
        response.headers.append("Set-Cookie", self._sessions.clear_login_cookie())
        return _no_store(response)

    async def logout(self, request: Request) -> Response:
        """End the session here and at the IdP: revoke the refresh token, drop the session and
        its tokens, clear the cookie, then send the browser to the IdP's logout.

        Works while the IdP is down: the session still ends here (revocation is best effort
        and the browser then goes to post_logout_redirect_url).
        """
        header = request.headers.get(self._csrf.header)
        if header is not None:
            check_csrf(
                method=request.method,
                header_value=header,
                expected_value=self._csrf.value,
                origin=request.headers.get("origin"),
                sec_fetch_site=request.headers.get("sec-fetch-site"),
                allowed_origins=self._allowed_origins,
            )
        elif not _is_same_origin_navigation(request, self._allowed_origins):
            raise CSRFCheckFailed(
                "logout needs the anti-CSRF header, a same-origin form post or a top-level "
                "navigation from this origin"
            )
        everywhere = await _wants_everywhere(request)
        session_id = self._sessions.session_id_from_cookie(joined_cookie(request.scope["headers"]))
        session = await self._services.end_session(session_id, revoke=True) if session_id else None
        ended_elsewhere = 0
        if everywhere and session is not None:
            ended_elsewhere = await self._services.session_admin.logout_everywhere(session)
        post_logout = self._post_logout_url
        logout_url = (
            await self._oidc.end_session_url(
                id_token_hint=session.id_token, post_logout_redirect_uri=post_logout
            )
            if session is not None
            else None
        ) or post_logout
        response: Response
        if header is not None:
            body: dict[str, Any] = {"logged_out": session is not None, "logout_url": logout_url}
            if everywhere:
                body["ended_elsewhere"] = ended_elsewhere
            response = JSONResponse(body)
        else:
            response = RedirectResponse(logout_url, status_code=303)
        response.headers.append("Set-Cookie", self._sessions.clear_cookie())
        return _no_store(response)

    async def me(self, request: Request) -> Response:
        """The user, the session's expiry and what the session may do on each route (no IdP
        needed). ``?slide=false`` reads without extending the idle timeout."""
        slide = request.query_params.get("slide", "true").lower() not in ("false", "0", "no")
        session = await self._sessions.current(joined_cookie(request.scope["headers"]), slide=slide)
        if session is None:
            # The 401 of every endpoint, plus each route's status: an app can show what works
            # without a login (auth none, client, user_or_*) before the user logs in.
            refusal = LoginRequired("no valid session", login_url=self._login_url)
            return _no_store(
                JSONResponse(
                    {
                        "error": refusal.error,
                        "message": refusal.message,
                        "login_url": self._login_url,
                        "routes": [self._route_status(route, None) for route in self._routes],
                    },
                    status_code=refusal.status_code,
                )
            )
        claims = session.claims_dict()
        body: dict[str, Any] = {
            "sub": session.sub,
            "claims": {k: claims[k] for k in _PUBLIC_CLAIMS if k in claims},
            "session": {
                "created_at": int(session.created_at),
                "expires_at": int(session.absolute_expiry),
                "idle_timeout": int(self._idle_timeout),
            },
            "routes": [self._route_status(route, session) for route in self._routes],
        }
        organization = {
            key: claims[claim]
            for key, claim in (("id", "org_id"), ("name", "org_name"))
            if isinstance(claims.get(claim), str)
        }
        if organization:
            body["organization"] = organization
        return _no_store(JSONResponse(body))

    def _route_status(self, route: Route, session: Session | None) -> dict[str, Any]:
        """One route as /auth/me shows it: what this session (or a request without one) may
        do there. Without a session, no audience or scopes: anyone may ask, and the APIs'
        identifiers are the logged-in app's business."""
        entry: dict[str, Any] = {"name": route.name, "prefix": route.prefix, "auth": route.mode}
        if session is not None:
            entry["audience"] = route.settings.audience
            entry["scopes"] = route.settings.scopes
        if session is None or route.mode != "user":
            entry["status"] = "login_required" if route.mode == "user" else "allowed"
            return entry
        verdict = self._authorizer.verdict(route, session)
        entry["status"] = verdict.value
        if verdict is Verdict.STEP_UP_REQUIRED:
            step_up = self._authorizer.step_up(route, self._login_url)
            entry["login_url"] = step_up.extra["login_url"]
        return entry

    async def backchannel_logout(self, request: Request) -> Response:
        """OIDC Back-Channel Logout 1.0: the IdP ends sessions by ``sid``/``sub``. Server to
        server, so no cookie and no CSRF check: the signed logout token is the proof."""
        await self._services.ensure_started()
        token = await read_logout_token(request)
        await process_logout_token(self._services, token)
        return _no_store(Response(status_code=200))


async def _wants_everywhere(request: Request) -> bool:
    """A logout POSTed with the JSON body ``{"everywhere": true}`` (at most 1 KiB): end every
    session of the user, not only this browser's."""
    if request.method != "POST":
        return False
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return False
    body = await read_small_body(request, _LOGOUT_BODY_MAX)
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("everywhere") is True


def _is_same_origin_navigation(request: Request, allowed_origins: list[str]) -> bool:
    """A logout the user asked for on our own pages, without the anti-CSRF header: a form
    posted from an allowed Origin, or a top-level navigation (a link) from this origin.

    Same-origin is not enough (adversarial review, item 3): an ``<img src="/auth/logout">``
    in any HTML an upstream serves is a same-origin GET too. Fetch Metadata tells them apart:
    a link the user follows is ``Sec-Fetch-Mode: navigate`` with ``Sec-Fetch-Dest: document``;
    an image, script, fetch() or frame is not (W3C Fetch Metadata Request Headers §2).
    """
    headers = request.headers
    origin = headers.get("origin")
    site = headers.get("sec-fetch-site")
    if request.method == "POST" and origin is not None:
        return origin in allowed_origins and site in (None, "same-origin")
    return (
        site == "same-origin"
        and headers.get("sec-fetch-mode") == "navigate"
        and headers.get("sec-fetch-dest") == "document"
    )


__all__ = ["AuthEndpoints"]
