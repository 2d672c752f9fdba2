"""The gateway's own endpoints under /auth: login, callback, logout, me, backchannel-logout."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from .backchannel import process_logout_token, read_logout_token
from .errors import CSRFCheckFailed, LoginFailed, LoginRequired, PayloadTooLarge
from .headers import joined_cookie
from .oidc import OIDCClient, pkce_challenge
from .routing import RouteTable
from .security import check_csrf, new_secret_token, read_cookie, tokens_equal, validate_return_to
from .services import Services
from .sessions.manager import LOGIN_TTL
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


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


class AuthEndpoints:
    """Starlette-style endpoints (Request -> Response); ``create_app`` puts each at its path
    (``own_paths``)."""

    def __init__(self, services: Services, *, oidc: OIDCClient, routes: RouteTable) -> None:
        # The services for their lifecycle (ensure_started, end_session), store and sessions.
        self._services = services
        self._oidc = oidc
        self._routes = routes
        settings = services.settings
        self._store = services.store
        self._sessions = services.sessions
        self._csrf = settings.csrf
        self._allowed_origins = settings.allowed_origins
        self._idle_timeout = settings.session.idle_timeout
        self._login_url = services.login_url
        self._post_logout_url = services.post_logout_redirect_url

    async def login(self, request: Request) -> Response:
        """Start authorization code + PKCE (S256) with state and nonce."""
        await self._services.ensure_started()
        return_to = validate_return_to(request.query_params.get("return_to"))
        state, nonce, verifier = (
            new_secret_token(),
            new_secret_token(),
            new_secret_token() + new_secret_token(),
        )
        await self._store.put_login(
            state, {"nonce": nonce, "verifier": verifier, "return_to": return_to}, ttl=LOGIN_TTL
        )
        url = await self._oidc.authorize_url(
            state=state, nonce=nonce, code_challenge=pkce_challenge(verifier)
        )
        response = RedirectResponse(url, status_code=302)
        response.headers.append("Set-Cookie", self._sessions.login_cookie(state))
        return _no_store(response)

    async def callback(self, request: Request) -> Response:
        """Finish login: check state (single use, bound to this browser), exchange the code,
        validate the ID token, then start a brand-new session."""
        await self._services.ensure_started()
        params = request.query_params
        if "error" in params:
            reason = params["error"] if _ERROR_CODE.match(params["error"]) else "invalid_error"
            raise LoginFailed(f"the identity provider refused the login ({reason})")
        state, code = params.get("state"), params.get("code")
        if not state or not code:
            raise LoginFailed("the callback lacks state or code")
        browser_state = read_cookie(
            joined_cookie(request.scope["headers"]), self._sessions.login_cookie_name
        )
        if not tokens_equal(browser_state, state):
            raise LoginFailed("this login was not started in this browser")
        pending = await self._store.pop_login(state)
        if pending is None:
            raise LoginFailed("unknown, expired or already used login state")
        tokens = await self._oidc.exchange_code(code=code, verifier=pending["verifier"])
        if tokens.id_token is None:
            raise LoginFailed("the identity provider returned no ID token")
        claims = await self._oidc.validate_id_token(tokens.id_token, nonce=pending["nonce"])
        if tokens.refresh_token is None:
            raise LoginFailed("the identity provider issued no refresh token (offline_access?)")
        old = self._sessions.session_id_from_cookie(joined_cookie(request.scope["headers"]))
        if old is not None:
            await self._services.end_session(old)
        session, cookie = await self._sessions.create(
            sub=str(claims["sub"]),
            sid=claims.get("sid") if isinstance(claims.get("sid"), str) else None,
            refresh_token=tokens.refresh_token,
            id_token=tokens.id_token,
            claims={k: claims[k] for k in _PUBLIC_CLAIMS if k in claims},
            user_agent=user_agent_family(request.headers.get("user-agent")),
        )
        logger.info("login complete for session %s", session.id[:8])
        await self._services.session_admin.enforce_limit(session)  # session.max_per_user
        response = RedirectResponse(pending["return_to"], status_code=302)
        response.headers.append("Set-Cookie", cookie)
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
        """The user, the session's expiry and the routes the SPA may call (no IdP needed)."""
        session = await self._sessions.current(joined_cookie(request.scope["headers"]))
        if session is None:
            raise LoginRequired("no valid session", login_url=self._login_url)
        body: dict[str, Any] = {
            "sub": session.sub,
            "claims": session.claims_dict(),
            "session": {
                "created_at": int(session.created_at),
                "expires_at": int(session.absolute_expiry),
                "idle_timeout": int(self._idle_timeout),
            },
            "routes": [
                {
                    "name": r.name,
                    "prefix": r.prefix,
                    "audience": r.settings.audience,
                    "scopes": r.settings.scopes,
                }
                for r in self._routes
                if r.needs_token
            ],
        }
        return _no_store(JSONResponse(body))

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
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _LOGOUT_BODY_MAX:
            raise PayloadTooLarge(f"the logout body is over {_LOGOUT_BODY_MAX} bytes")
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
