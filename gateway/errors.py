"""The gateway's exception tree and the one renderer of it.

Every failure a client can see is one of these classes; each carries its HTTP status and a
machine-readable ``error`` code as class attributes (the werkzeug pattern), and the message
never contains a token, cookie or code.

    GatewayError                     500 internal_error
    ├── ConfigError                  startup only -> exit 2
    ├── BadRequest                   400 bad_request
    │   ├── InvalidPath              400 invalid_path
    │   ├── LoginFailed              400 login_failed (bad state, IdP error at callback)
    │   └── InvalidLogoutToken       400 invalid_request (back-channel logout, §2.8)
    ├── LoginRequired                401 login_required (+ login_url, set where raised)
    │   ├── RefreshTokenRejected     invalid_grant: the session is ended first
    │   └── StepUpRequired           401 step_up_required: log in again, more strongly (acr,
    │                                max_age; a route's rule, the IdP's mfa_required or an
    │                                upstream's RFC 9470 challenge); login_url asks for it
    ├── SessionEnded                 401 login_required: a store refused a write for an ended
    │                                session (the token broker turns it into LoginRequired)
    ├── Forbidden                    403 forbidden
    │   ├── CSRFCheckFailed          403 csrf_failed
    │   ├── AudienceNotPermitted     403 audience_not_permitted
    │   ├── InsufficientScope        403 insufficient_scope
    │   └── CallerRefused            403 forbidden (forward-auth: not the data plane)
    ├── NotFound                     404 not_found
    ├── MethodNotAllowed             405 method_not_allowed (+ Allow)
    ├── RequestBodyTimeout           408 request_timeout (+ Connection: close)
    ├── PayloadTooLarge              413 payload_too_large
    ├── HeadersTooLarge              431 headers_too_large
    ├── IdentityProviderError        502 idp_error (IdP refused us: misconfiguration)
    ├── IdentityProviderUnavailable  503 idp_unavailable + Retry-After
    │   └── IdentityProviderRateLimited  the IdP's 429: backs off one session's audience only
    ├── SessionStoreUnavailable      503 session_store_unavailable + Retry-After
    ├── TooManyPendingLogins         503 too_many_pending_logins + Retry-After
    ├── UpstreamError                502 upstream_unavailable
    │   ├── UpstreamTimeout          504 upstream_timeout
    │   └── UpstreamBusy             503 upstream_busy + Retry-After
    └── ClientDisconnected           499, never rendered: the client went away mid-request

A 5xx is logged by :func:`as_gateway_error` from every entry (proxy, own endpoints, forward-auth,
WebSocket handshake), naming the route and never the path.
"""

from __future__ import annotations

import logging
from typing import ClassVar
from urllib.parse import quote, urlencode

from starlette.responses import JSONResponse, Response

logger = logging.getLogger("gateway.error")


class GatewayError(Exception):
    """Base of every error the gateway renders."""

    status_code: ClassVar[int] = 500
    error: ClassVar[str] = "internal_error"

    def __init__(self, message: str = "", **extra: str) -> None:
        super().__init__(message or self.error)
        self.message = message or self.error
        self.extra = extra

    def headers(self) -> dict[str, str]:
        """Response headers this error adds (e.g. Retry-After)."""
        return {}


class ConfigError(GatewayError):
    """Invalid configuration; raised at startup only."""

    error = "config_error"


class BadRequest(GatewayError):
    status_code = 400
    error = "bad_request"


class InvalidPath(BadRequest):
    error = "invalid_path"


class LoginFailed(BadRequest):
    error = "login_failed"


class InvalidLogoutToken(BadRequest):
    """OIDC Back-Channel Logout 1.0 §2.8: a logout token that fails validation is answered
    400 ``invalid_request``."""

    error = "invalid_request"


class LoginRequired(GatewayError):
    """No usable session: the SPA should send the user to ``login_url``, which whoever raises
    it names (the proxy: the login endpoint; forward-auth: login and back to the original URI)."""

    status_code = 401
    error = "login_required"

    def __init__(self, message: str = "", *, login_url: str, **extra: str) -> None:
        super().__init__(message, login_url=login_url, **extra)
        self.base_login_url = login_url  # without what a subclass adds to it

    def relocated(self, login_url: str) -> LoginRequired:
        """The same refusal sending the user to ``login_url`` (an entry's own: forward-auth
        comes back to the original URI)."""
        return type(self)(self.message, login_url=login_url)


def with_query(url: str, params: list[tuple[str, str]]) -> str:
    """``url`` with ``params`` appended to its query (it may have one already)."""
    if not params:
        return url
    return url + ("&" if "?" in url else "?") + urlencode(params, quote_via=quote)


class StepUpRequired(LoginRequired):
    """The session authenticated too weakly or too long ago for what it asks: ``login_url``
    (the entry's own, plus ``acr_values`` / ``max_age``) runs a login that asks for more."""

    error = "step_up_required"

    def __init__(
        self,
        message: str = "",
        *,
        login_url: str,
        acr_values: tuple[str, ...] = (),
        max_age: int | None = None,
    ) -> None:
        self.acr_values = acr_values
        self.max_age = max_age
        params = [("acr_values", " ".join(acr_values))] if acr_values else []
        if max_age is not None:
            params.append(("max_age", str(max_age)))
        super().__init__(message, login_url=with_query(login_url, params))
        self.base_login_url = login_url

    def relocated(self, login_url: str) -> StepUpRequired:
        return StepUpRequired(
            self.message, login_url=login_url, acr_values=self.acr_values, max_age=self.max_age
        )


class RefreshTokenRejected(LoginRequired):
    """The IdP answered ``invalid_grant``: the refresh token is dead, so is the session."""


class SessionEnded(GatewayError):
    """A store refused to write a session that has ended meanwhile (logout won the race)."""

    status_code = 401
    error = "login_required"


class Forbidden(GatewayError):
    status_code = 403
    error = "forbidden"


class CSRFCheckFailed(Forbidden):
    error = "csrf_failed"


class AudienceNotPermitted(Forbidden):
    error = "audience_not_permitted"


class InsufficientScope(Forbidden):
    error = "insufficient_scope"


class CallerRefused(Forbidden):
    """The forward-auth caller is not the configured data plane (secret or source address)."""


class NotFound(GatewayError):
    status_code = 404
    error = "not_found"


class MethodNotAllowed(GatewayError):
    status_code = 405
    error = "method_not_allowed"

    def __init__(self, message: str = "", *, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


class RequestBodyTimeout(GatewayError):
    """The client's request body sent nothing for longer than ``limits.body_idle_timeout``.

    The rest of the body will not be read, so the connection cannot carry another request:
    the answer closes it (RFC 9110 §15.5.9)."""

    status_code = 408
    error = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class PayloadTooLarge(GatewayError):
    status_code = 413
    error = "payload_too_large"


class HeadersTooLarge(GatewayError):
    status_code = 431
    error = "headers_too_large"


class IdentityProviderError(GatewayError):
    """The IdP answered with an error the gateway cannot act on (misconfiguration)."""

    status_code = 502
    error = "idp_error"


class _Unavailable(GatewayError):
    status_code = 503

    def __init__(self, message: str = "", *, retry_after: int = 5, **extra: str) -> None:
        super().__init__(message, **extra)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class IdentityProviderUnavailable(_Unavailable):
    error = "idp_unavailable"


class IdentityProviderRateLimited(IdentityProviderUnavailable):
    """The IdP answered 429: same answer to the client, but the back-off covers only the
    session and audience that were refused, not every session (review item 5)."""


class SessionStoreUnavailable(_Unavailable):
    error = "session_store_unavailable"


class TooManyPendingLogins(_Unavailable):
    """``session.max_pending_logins`` logins are already waiting for their callback: what
    unauthenticated clients can make the gateway store is bounded (review item 6)."""

    error = "too_many_pending_logins"


class UpstreamError(GatewayError):
    status_code = 502
    error = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    error = "upstream_timeout"


class ClientDisconnected(GatewayError):
    """The client went away while its request was read: nothing is answered."""

    status_code = 499
    error = "client_closed_request"


class UpstreamBusy(UpstreamError, _Unavailable):
    """No upstream connection became free within ``upstream_pool.acquire_timeout``."""

    status_code = 503
    error = "upstream_busy"


def render_error(exc: GatewayError) -> Response:
    """Render ``exc`` as the JSON body every client of the gateway can rely on."""
    body: dict[str, str] = {"error": exc.error, "message": exc.message, **exc.extra}
    headers = {"Cache-Control": "no-store", **exc.headers()}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def as_gateway_error(exc: Exception, route: str) -> GatewayError:
    """What to answer for ``exc`` raised while serving ``route``; a 5xx is logged here, the same
    way for every entry: the route's name and the error's message, never the request path (an
    API path can carry a secret) and never an unexpected exception's arguments."""
    if not isinstance(exc, GatewayError):
        logger.error("unhandled %s on route %s", type(exc).__name__, route)
        return GatewayError("unexpected error")
    if exc.status_code >= 500:
        logger.warning("%s on route %s: %s", exc.error, route, exc.message)
    return exc
