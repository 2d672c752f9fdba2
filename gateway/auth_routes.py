"""The gateway's own endpoints under /auth: login, callback, logout, me, backchannel-logout."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from .backchannel import process_logout_token, read_logout_token
from .errors import CSRFCheckFailed, GatewayError, LoginFailed, LoginRequired
from .oidc import pkce_challenge
from .security import check_csrf, new_secret_token, tokens_equal, validate_return_to
from .sessions.manager import LOGIN_TTL

if TYPE_CHECKING:
    from .app import Gateway

logger = logging.getLogger("gateway.auth")

_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")
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
    """Starlette endpoints bound to one Gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/auth/login", self.login, methods=["GET"]),
            Route("/auth/callback", self.callback, methods=["GET"]),
            Route("/auth/logout", self.logout, methods=["GET", "POST"]),
            Route("/auth/me", self.me, methods=["GET"]),
            Route("/auth/backchannel-logout", self.backchannel_logout, methods=["POST"]),
        ]

    async def login(self, request: Request) -> Response:
        """Start authorization code + PKCE (S256) with state and nonce."""
        gw = self._gw
        await gw.ensure_started()
        return_to = validate_return_to(request.query_params.get("return_to"))
        state, nonce, verifier = (
            new_secret_token(),
            new_secret_token(),
            new_secret_token() + new_secret_token(),
        )
        await gw.store.put_login(
            state, {"nonce": nonce, "verifier": verifier, "return_to": return_to}, ttl=LOGIN_TTL
        )
        url = await gw.oidc.authorize_url(
            state=state, nonce=nonce, code_challenge=pkce_challenge(verifier)
        )
        response = RedirectResponse(url, status_code=302)
        response.headers.append("Set-Cookie", gw.sessions.login_cookie(state))
        return _no_store(response)

    async def callback(self, request: Request) -> Response:
        """Finish login: check state (single use, bound to this browser), exchange the code,
        validate the ID token, then start a brand-new session."""
        gw = self._gw
        await gw.ensure_started()
        params = request.query_params
        if "error" in params:
            reason = params["error"] if _ERROR_CODE.match(params["error"]) else "invalid_error"
            raise LoginFailed(f"the identity provider refused the login ({reason})")
        state, code = params.get("state"), params.get("code")
        if not state or not code:
            raise LoginFailed("the callback lacks state or code")
        browser_state = request.cookies.get(gw.sessions.login_cookie_name)
        if not tokens_equal(browser_state, state):
            raise LoginFailed("this login was not started in this browser")
        pending = await gw.store.pop_login(state)
        if pending is None:
            raise LoginFailed("unknown, expired or already used login state")
        tokens = await gw.oidc.exchange_code(code=code, verifier=pending["verifier"])
        if tokens.id_token is None:
            raise LoginFailed("the identity provider returned no ID token")
        claims = await gw.oidc.validate_id_token(tokens.id_token, nonce=pending["nonce"])
        if tokens.refresh_token is None:
            raise LoginFailed("the identity provider issued no refresh token (offline_access?)")
        old = gw.sessions.session_id_from_cookie(request.headers.get("cookie"))
        if old is not None:
            await gw.end_session(old)
        session, cookie = await gw.sessions.create(
            sub=str(claims["sub"]),
            sid=claims.get("sid") if isinstance(claims.get("sid"), str) else None,
            refresh_token=tokens.refresh_token,
            id_token=tokens.id_token,
            claims={k: claims[k] for k in _PUBLIC_CLAIMS if k in claims},
        )
        logger.info("login complete for session %s", session.id[:8])
        response = RedirectResponse(pending["return_to"], status_code=302)
        response.headers.append("Set-Cookie", cookie)
        response.headers.append("Set-Cookie", gw.sessions.clear_login_cookie())
        return _no_store(response)

    async def logout(self, request: Request) -> Response:
        """End the session here and at the IdP: revoke the refresh token, drop the session and
        its tokens, clear the cookie, then send the browser to the IdP's logout.

        Works while the IdP is down: the session still ends here (revocation is best effort
        and the browser then goes to post_logout_redirect_url).
        """
        gw = self._gw
        header = request.headers.get(gw.settings.csrf.header)
        if header is not None:
            check_csrf(
                method=request.method,
                header_value=header,
                expected_value=gw.csrf_value,
                origin=request.headers.get("origin"),
                sec_fetch_site=request.headers.get("sec-fetch-site"),
                allowed_origins=gw.settings.allowed_origins,
            )
        elif not _is_same_origin_navigation(request, gw.settings.allowed_origins):
            raise CSRFCheckFailed(
                "logout needs the anti-CSRF header, a same-origin form post or a top-level "
                "navigation from this origin"
            )
        session_id = gw.sessions.session_id_from_cookie(request.headers.get("cookie"))
        session = await gw.end_session(session_id, revoke=True) if session_id else None
        post_logout = gw.post_logout_redirect_url
        logout_url = (
            await gw.oidc.end_session_url(
                id_token_hint=session.id_token, post_logout_redirect_uri=post_logout
            )
            if session is not None
            else None
        ) or post_logout
        response: Response
        if header is not None:
            response = JSONResponse({"logged_out": session is not None, "logout_url": logout_url})
        else:
            response = RedirectResponse(logout_url, status_code=303)
        response.headers.append("Set-Cookie", gw.sessions.clear_cookie())
        return _no_store(response)

    async def me(self, request: Request) -> Response:
        """The user, the session's expiry and the routes the SPA may call (no IdP needed)."""
        gw = self._gw
        session = await gw.sessions.current(request.headers.get("cookie"))
        if session is None:
            raise LoginRequired("no valid session", login_url=gw.login_url)
        body: dict[str, Any] = {
            "sub": session.sub,
            "claims": session.claims_dict(),
            "session": {
                "created_at": int(session.created_at),
                "expires_at": int(session.absolute_expiry),
                "idle_timeout": int(gw.settings.session.idle_timeout),
            },
            "routes": [
                {
                    "name": r.name,
                    "prefix": r.prefix,
                    "audience": r.settings.audience,
                    "scopes": r.settings.scopes,
                }
                for r in gw.routes
                if r.needs_token
            ],
        }
        return _no_store(JSONResponse(body))

    async def backchannel_logout(self, request: Request) -> Response:
        """OIDC Back-Channel Logout 1.0: the IdP ends sessions by ``sid``/``sub``. Server to
        server, so no cookie and no CSRF check: the signed logout token is the proof."""
        gw = self._gw
        await gw.ensure_started()
        token = await read_logout_token(request)
        await process_logout_token(gw, token)
        return _no_store(Response(status_code=200))


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


__all__ = ["AuthEndpoints", "GatewayError"]
